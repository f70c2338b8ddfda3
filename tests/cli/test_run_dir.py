"""`alpt-train`'s output directory under faults (issue 13, item 4): kills
at every phase lose no finished epoch, and runs never mix."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from alpt_keras.cli import run_dir
from tests.cli.test_alpt_train import _env, _report

TINY = ["--num-examples", "6000", "--num-fields", "4", "--vocab-size", "50",
        "--zipf-exponent", "0", "--batch-size", "256", "--hidden-units", "8",
        "--epochs", "2", "--verbose", "0"]


def _train(args, fault=None, timeout=600):
    env = _env()
    if fault:
        env[run_dir.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "alpt_keras.cli"] + args,
                          env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), run_dir.atomic_file(str(path)) as tmp:
        assert tmp.endswith("model.weights.h5")  # Keras checks the suffix
        assert os.path.dirname(tmp) == str(tmp_path)  # same file system
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.weights.h5"]
    with run_dir.atomic_file(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.weights.h5"]


def test_a_second_run_into_a_locked_directory_fails_at_once(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; "
         "from alpt_keras.cli import run_dir; run_dir.lock(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _train(TINY + ["--output-dir", str(out)], timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last == (f"alpt-train: --output-dir {out} is in use by "
                        f"another alpt-train (pid {holder.pid}); wait for "
                        "it to finish or choose another --output-dir."), last
        assert sorted(os.listdir(out)) == [run_dir.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # The OS released the lock with the process: the directory is free.
    run_dir.lock(str(out))


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "out")
    first = _train(TINY + ["--output-dir", out], fault="after_fit")
    assert first.returncode == -signal.SIGKILL
    proc = _train(TINY + ["--output-dir", out, "--bits", "4"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    # --storage auto resolves to packed below 8 bits: both are named.
    assert last.startswith(f"alpt-train: --output-dir {out} holds a run "
                           "with other settings: --bits 8 (there) vs 4 "
                           "(now), --storage int8 (there) vs packed (now). "
                           "Rerun with its settings"), last
    assert "Traceback" not in proc.stderr
    # --epochs and output-only flags do not change what a run computes.
    proc = _train(TINY + ["--output-dir", out, "--epochs", "3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _report(out)["epochs_completed"] == 3


def _digests_and_weights(directory):
    report = _report(directory)
    with h5py.File(os.path.join(directory, "model.weights.h5"), "r") as f:
        weights = {}
        f.visititems(lambda name, obj: weights.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
    return report, weights


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["backup_written", "after_fit",
                                   "during_save", "after_export"])
def test_a_kill_at_any_phase_then_a_rerun_matches_an_uninterrupted_run(
        tmp_path, fault):
    """SIGKILL at a precise phase, then the same command again: the rerun
    finishes without retraining a finished epoch, and ends with the tables
    and weights of an uninterrupted run, one export version, the whole
    history, and no temporary or resume file left."""
    straight = str(tmp_path / "straight")
    proc = _train(TINY + ["--output-dir", straight])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, serving = str(tmp_path / "out"), str(tmp_path / "serving")
    args = TINY + ["--output-dir", out, "--export-dir", serving]
    killed = _train(args, fault=fault)
    if fault == "backup_written" and run_dir_is_tf_keras():
        assert killed.returncode == 0  # tf_keras: no such phase
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not os.path.exists(os.path.join(out, "report.json")) or \
            fault == "after_export"
        rerun = _train(args)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    want, want_weights = _digests_and_weights(straight)
    got, got_weights = _digests_and_weights(out)
    if killed.returncode == -signal.SIGKILL:
        # Killed after fit: both epochs were backed up and none is
        # retrained. Killed writing epoch 1's backup: it restarts at 0.
        assert got["resumed_from_epoch"] == (
            0 if fault == "backup_written" else 2)
    assert got["table_digests"] == want["table_digests"]
    assert got_weights.keys() == want_weights.keys()
    for name, value in want_weights.items():
        if "optimizer" not in name:
            np.testing.assert_array_equal(got_weights[name], value, name)
    assert len(got["history"]["loss"]) == 2  # both epochs, resumed or not
    assert got["train_seconds"] > 0
    assert os.listdir(os.path.join(serving, "ctr")) == ["1"]
    left = sorted(os.listdir(out))
    assert left == sorted([".alpt-train.lock", "model.keras",
                           "model.weights.h5", "report.json", "run.json"])


def run_dir_is_tf_keras():
    from alpt_keras import IS_KERAS_3

    return not IS_KERAS_3
