"""A new user's `alpt-train` (issue 14): results kept by default, a quiet
console that says where everything went, TensorBoard that works."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

TINY = ["--num-examples", "3000", "--num-fields", "4", "--vocab-size", "50",
        "--zipf-exponent", "0", "--batch-size", "256", "--hidden-units", "8",
        "--epochs", "2"]


def _train(args, cwd):
    # As a user runs it: no TF_CPP_MIN_LOG_LEVEL from the test setup.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "alpt_keras.cli"] + args,
                          env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _noise(text):
    """Lines of TensorFlow C++ logs or Python warnings."""
    return [line for line in text.splitlines()
            if line[:5] in ("I0000", "W0000", "E0000")
            or "WARNING" in line or "Warning" in line]


@pytest.mark.slow
def test_a_default_run_is_quiet_and_keeps_its_results(tmp_path):
    proc = _train(TINY + ["--export-dir", "serving"], cwd=tmp_path)
    # Zero lines on stderr: no TF start-up banner, no cuInit error, no
    # Grappler warning from the id checks, no Keras warning.
    assert proc.stderr == "", proc.stderr
    assert _noise(proc.stdout) == [], proc.stdout
    runs = glob.glob(str(tmp_path / "runs" / "synthetic-dnn-alpt8-*"))
    assert len(runs) == 1, runs
    name = os.path.relpath(runs[0], tmp_path)
    out = proc.stdout
    assert f"writing to {name}/ (to resume this run after a kill, rerun " \
        f"with --output-dir {name})" in out
    assert "data: synthetic, train 2,400 / validation 300 / test 300 " \
        "examples, 4 features" in out
    assert "model: dnn, " in out and " parameters, ALPT 8-bit tables " \
        "(stacked, int8 storage)" in out
    assert "trained 2 epoch(s) in " in out
    assert f"files in {name}/:" in out
    for listed in ("model.keras", "model.weights.h5", "report.json",
                   "run.json"):
        assert os.path.isfile(os.path.join(runs[0], listed))
        assert f"\n  {listed} " in out
    assert "TF Serving export: serving/ctr/1" in out
    with open(os.path.join(runs[0], "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["data"]["rows"] == {"train": 2400, "validation": 300,
                                      "test": 300}


@pytest.mark.slow
def test_verbose_shows_the_hidden_start_up_lines(tmp_path):
    # The control for the test above: TensorFlow does print at start-up
    # here, and --verbose gives it back.
    proc = _train(TINY + ["--epochs", "1", "--verbose", "2",
                          "--output-dir", "out"], cwd=tmp_path)
    assert _noise(proc.stderr), proc.stderr


def _scalars(logdir):
    """{tag: [values by step]} of the event files under `logdir`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                else:  # tf.summary v2: a tensor (the graph is a string)
                    array = tf.make_ndarray(value.tensor)
                    if array.dtype.kind != "f" or array.size != 1:
                        continue
                    number = float(array)
                out.setdefault(value.tag, []).append(number)
    return out


@pytest.mark.slow
def test_tensorboard_logs_keras_metrics_and_alpt_figures(tmp_path):
    _train(TINY + ["--tensorboard", "--output-dir", "out"], cwd=tmp_path)
    logdir = tmp_path / "out" / "tensorboard"
    train = _scalars(str(logdir / "train"))
    validation = _scalars(str(logdir / "validation"))
    with open(tmp_path / "out" / "report.json", encoding="utf-8") as f:
        history = json.load(f)["history"]
    for key in ("loss", "auc", "alpt/step_size_mean", "alpt/step_size_min",
                "alpt/step_size_max", "alpt/saturated",
                "alpt_skipped_steps"):
        assert f"epoch_{key}" in train, sorted(train)
        # One value per epoch, equal to the History's (float32 summaries).
        np.testing.assert_allclose(train[f"epoch_{key}"], history[key],
                                   rtol=1e-6, err_msg=key)
    assert validation["epoch_auc"] and validation["epoch_loss"]
    assert history["alpt/step_size_min"][-1] <= \
        history["alpt/step_size_mean"][-1] <= \
        history["alpt/step_size_max"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_mixed_precision_runs(tmp_path, compute):
    """`--mixed-precision`: the model computes in bfloat16/float16 (float16
    with loss scaling outside ALPTOptimizer), tables stay int8 + float32 Δ,
    and the run learns as much as a float32-compute run of the same data."""
    small = ["--num-examples", "20000", "--num-fields", "4", "--vocab-size",
             "100", "--zipf-exponent", "0", "--batch-size", "256",
             "--hidden-units", "16", "--learning-rate", "5e-3",
             "--verbose", "0"]
    reports = {}
    for mode in ("none", compute):
        out = tmp_path / mode
        proc = _train(small + ["--mixed-precision", mode, "--output-dir",
                               str(out)], cwd=tmp_path)
        with open(out / "report.json", encoding="utf-8") as f:
            reports[mode] = json.load(f)
    assert f", {compute} compute" in proc.stdout
    mixed, full = reports[compute], reports["none"]
    assert mixed["config"]["mixed_precision"] == compute
    # The reference must learn, and mixed precision must keep up with it.
    assert full["metrics"]["test_auc"] > 0.7, full["metrics"]
    assert mixed["metrics"]["test_auc"] >= full["metrics"]["test_auc"] - \
        0.02, (mixed["metrics"], full["metrics"])
    assert mixed["bytes"] == full["bytes"]  # int8 codes, float32 Δ, state
    assert mixed["history"]["alpt_skipped_steps"][-1] == 0.0
