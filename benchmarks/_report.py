"""What every benchmark records: the machine, and its JSON report."""

import os
import platform
import time

import numpy as np
import tensorflow as tf

from alpt_keras import compat
from alpt_keras.cli import run_dir


def machine_info():
    return {"processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tensorflow": tf.__version__,
            "keras_flavour": "keras3" if compat.IS_KERAS_3 else "tf_keras"}


def default_output(name):
    """benchmarks/results/<name>.json."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "results", f"{name}.json")


def write_report(path, report):
    """Writes `report` as JSON to `path` atomically (a kill leaves the old
    report or the new one, never half of one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    run_dir.write_json(path, report)
    print(f"wrote {path}")


def add_workload_arguments(parser, rows=2**20):
    """The embedding workload of issue 6: a table of `--rows` x `--dim`,
    batches of `--batch` examples x `--features` ids (`rows=None`: the
    script chooses the table sizes itself)."""
    if rows is not None:
        parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--features", type=int, default=26)


def workload_ids(batch, features, rows, count=1):
    """`numpy.random.default_rng(0).zipf(1.2, size=(count * batch,
    features)) % rows`: the workload's ids, the same in every script."""
    return np.random.default_rng(0).zipf(
        1.2, size=(count * batch, features)) % rows


def interleaved_times(functions, steps, warmup, rounds, after_round=None,
                      turn_warmup=1):
    """Seconds per call of each function in `functions` (name -> callable
    returning tensors): after `warmup` calls each, the functions take turns,
    `steps` calls per turn for `rounds` rounds, so drifting machine load
    hits all of them alike. `after_round(round_index, times)` may add its
    own entries (e.g. an out-of-process peer's turn).

    Two artifacts of interleaving, which a training run never sees, are
    kept out:
    - the order rotates by one setup per round: the turn right after the
      FBGEMM peer's subprocess is slower for whoever takes it
      (criteo-like: the stacked group measured 0.81x one table there,
      1.05x with the two swapped);
    - each turn starts with `turn_warmup` untimed calls: the first step
      after another setup pays for that setup's cache footprint (5.35 vs
      5.0 ms for the stacked criteo-like step after float32's); the peer
      likewise warms up in each of its turns.
    """

    def call(function):
        tf.nest.map_structure(lambda t: t.numpy(), function())  # wait

    for function in functions.values():
        for _ in range(warmup):
            call(function)
    times = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            function = functions[name]
            for _ in range(turn_warmup):
                call(function)
            for _ in range(steps):
                start = time.perf_counter()
                call(function)
                times[name].append(time.perf_counter() - start)
        if after_round is not None:
            after_round(round_index, times)
    return times
