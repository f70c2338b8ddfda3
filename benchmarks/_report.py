"""What every benchmark records: the machine, and its JSON report."""

import json
import os
import platform

import tensorflow as tf

from alpt_keras import _keras


def machine_info():
    return {"processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tensorflow": tf.__version__,
            "keras_flavour": "keras3" if _keras.IS_KERAS_3 else "tf_keras"}


def default_output(name):
    """benchmarks/results/<name>.json."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "results", f"{name}.json")


def write_report(path, report):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
