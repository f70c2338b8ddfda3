"""`alpt-train` end to end, and resuming after being killed."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

# Synthetic data where every id is seen often, so the hidden click model's
# AUC is reachable (on the Criteo-like default, ids seen once or twice carry
# hidden signal no model can learn from CI-sized data).
SMALL = ["--num-examples", "100000", "--num-fields", "4", "--vocab-size",
         "300", "--zipf-exponent", "0", "--batch-size", "512", "--epochs",
         "2", "--hidden-units", "32", "--learning-rate", "5e-3"]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env  # keeps TF_USE_LEGACY_KERAS of this pytest pass


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "alpt_keras.cli"] + args,
                          env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _report(directory):
    with open(os.path.join(directory, "report.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_float32_and_alpt8_end_to_end(tmp_path):
    reports = {}
    for kind in ("float32", "alpt"):
        out = str(tmp_path / kind)
        export = ["--export-dir", str(tmp_path / "serving")] \
            if kind == "alpt" else []
        proc = _run(SMALL + ["--embedding", kind, "--output-dir", out]
                    + export)
        assert "test AUC" in proc.stdout
        reports[kind] = _report(out)
    hidden = reports["float32"]["data"]["hidden_model_test"]["auc"]
    fp32 = reports["float32"]["metrics"]["test_auc"]
    alpt = reports["alpt"]["metrics"]["test_auc"]
    assert fp32 >= hidden - 0.03, (fp32, hidden)  # the float32 floor
    assert abs(alpt - fp32) <= 0.01, (alpt, fp32)
    # Calibrated, not only well ranked: the test logloss is near the hidden
    # model's (issue 14 item 9: BatchNorm's unconverged moving statistics
    # once put the default job's at 0.65 against 0.51).
    hidden_loss = reports["float32"]["data"]["hidden_model_test"]["logloss"]
    for kind, r in reports.items():
        loss = r["metrics"]["test_logloss"]
        print(kind, loss, hidden_loss)
        assert loss <= hidden_loss + 0.03, (kind, loss, hidden_loss)
    report = reports["alpt"]
    assert report["config"]["embedding"] == "alpt"
    assert report["config"]["bits"] == 8
    assert report["epochs_completed"] == 2
    b = report["bytes"]
    # 8-bit codes + per-row Δ + two per-row accumulators = 28 of 192 bytes.
    ratio = (b["tables"] + b["optimizer_state"]) / (
        b["float32_tables"] + b["float32_adam_state"])
    assert 0.14 < ratio < 0.15, ratio
    fp = reports["float32"]["bytes"]
    assert fp["tables"] == fp["float32_tables"]
    assert fp["optimizer_state"] == fp["float32_adam_state"]
    assert "alpt/saturated" in report["history"]
    assert os.path.exists(tmp_path / "alpt" / "model.weights.h5")
    # --export-dir: a served version whose tables are ~0.31x float32.
    export = report["export"]
    assert export["path"] == str(tmp_path / "serving" / "ctr" / "1")
    assert os.path.exists(os.path.join(export["path"], "saved_model.pb"))
    assert os.path.exists(os.path.join(
        export["path"], "assets.extra", "tf_serving_warmup_requests"))
    assert len(export["tables"]) == 4
    for table in export["tables"].values():
        assert table["bytes"] <= 0.32 * table["float32_bytes"]
    # alpt-export: the saved .keras model becomes version 2.
    proc = subprocess.run(
        [sys.executable, "-m", "alpt_keras.export.cli",
         str(tmp_path / "alpt" / "model.keras"), str(tmp_path / "serving")],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(
        tmp_path / "serving" / "ctr" / "2")
    assert "whole export:" in proc.stdout


def _weights(path):
    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return values


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    args = ["--num-examples", "30000", "--batch-size", "512",
            "--hidden-units", "16", "--epochs", "4", "--verbose", "2"]
    straight = str(tmp_path / "straight")
    _run(args + ["--output-dir", straight])

    resumed = str(tmp_path / "resumed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpt_keras.cli"] + args
        + ["--output-dir", resumed], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            # "Epoch 3/4" is printed after epoch 2 ended and was backed up.
            if line.startswith("Epoch 3/4") or time.time() > deadline:
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(resumed, "report.json"))

    _run(args + ["--output-dir", resumed])
    report = _report(resumed)
    assert report["epochs_completed"] == 4
    assert report["resumed_from_epoch"] in (2, 3)  # 0-based: work was kept
    # The whole history: the killed run's epochs and the rerun's.
    assert len(report["history"]["loss"]) == 4
    a = _weights(os.path.join(straight, "model.weights.h5"))
    b = _weights(os.path.join(resumed, "model.weights.h5"))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_devices_2_trains_under_mirrored_strategy(tmp_path):
    out = str(tmp_path / "two")
    _run(["--num-examples", "20000", "--batch-size", "512",
          "--hidden-units", "16", "--devices", "2", "--output-dir", out])
    report = _report(out)
    assert report["replicas"] == 2
    assert report["metrics"]["test_auc"] > 0.6


def _criteo_file(path, rows=3000, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(rows):
        user = int(rng.integers(0, 50))
        label = int(rng.random() < (0.8 if user % 2 else 0.2))
        numerics = [str(int(rng.integers(0, 100))) if rng.random() > 0.1
                    else "" for _ in range(13)]
        cats = [f"u{user}"] + [f"{j}_{int(rng.integers(0, 20))}"
                               for j in range(25)]
        lines.append("\t".join([str(label)] + numerics + cats))
    lines.insert(7, "not\ta\tcriteo\tline")  # reported, skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["criteo", "movielens"])
def test_real_dataset_paths(tmp_path, dataset):
    out = str(tmp_path / dataset)
    args = ["--dataset", dataset, "--model", "deepfm", "--hidden-units",
            "16", "--output-dir", out]
    if dataset == "criteo":  # 2,400 training rows: small steps, 3 epochs
        args += ["--data-path", _criteo_file(tmp_path / "train.txt"),
                 "--batch-size", "64", "--epochs", "3", "--learning-rate",
                 "5e-3"]
    else:
        args += ["--batch-size", "512"]
    _run(args)
    report = _report(out)
    assert report["data"]["dataset"] == dataset
    # Criteo: C1 (the user) decides the click; MovieLens: users and items.
    assert report["metrics"]["test_auc"] > 0.65, report["metrics"]
    if dataset == "criteo":
        assert report["data"]["malformed_lines"] == 1
        assert report["data"]["malformed_examples"][0]["line"] == 8
        with open(os.path.join(out, "vocabulary.json"),
                  encoding="utf-8") as f:
            vocabulary = json.load(f)
        assert len(vocabulary["fields"]) == 39


@pytest.mark.slow
def test_stacked_and_separate_tables_report_the_same_digests(tmp_path):
    reports = {}
    for flag in ("--stack-tables", "--no-stack-tables"):
        out = str(tmp_path / flag)
        _run(SMALL + ["--epochs", "1", "--output-dir", out, flag])
        reports[flag] = _report(out)
    stacked, separate = reports["--stack-tables"], reports["--no-stack-tables"]
    assert len(stacked["table_digests"]) == 4  # per logical table
    assert stacked["table_digests"] == separate["table_digests"]
    assert stacked["metrics"] == separate["metrics"]


def test_a_backup_of_the_other_table_layout_is_refused(tmp_path):
    from alpt_keras.cli.train import LAYOUT_FILE, check_backup_layout

    backup = str(tmp_path / "backup")
    check_backup_layout(backup, True)  # a new backup records its layout
    with open(os.path.join(backup, LAYOUT_FILE), encoding="utf-8") as f:
        assert json.load(f) == {"stack_tables": True}
    check_backup_layout(backup, False)  # nothing to resume yet: fine
    open(os.path.join(backup, "training_metadata.json"), "w").close()
    check_backup_layout(backup, False)  # the layout of the marker
    with pytest.raises(SystemExit, match="--no-stack-tables to resume"):
        check_backup_layout(backup, True)
    os.remove(os.path.join(backup, LAYOUT_FILE))  # a backup from before
    with pytest.raises(SystemExit, match="separate ALPT tables"):
        check_backup_layout(backup, True)
    check_backup_layout(backup, False)


def test_diverging_run_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    """A learning rate of 1e38 overflows the weights in one step; every
    later step is skipped for NaN/Inf gradients, so the run stops after
    --max-skipped-steps of them (also for float32 tables), and nothing
    with NaN weights is saved or exported."""
    for kind in ("float32", "alpt"):
        out, serving = tmp_path / kind, tmp_path / f"serving-{kind}"
        proc = subprocess.run(
            [sys.executable, "-m", "alpt_keras.cli", "--num-examples",
             "4000", "--batch-size", "100", "--learning-rate", "1e38",
             "--embedding", kind, "--max-skipped-steps", "3", "--verbose",
             "0", "--output-dir", str(out), "--export-dir", str(serving)],
            env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("alpt-train: 3 consecutive training steps "
                               "were skipped"), last
        assert "Traceback" not in proc.stderr
        assert not (out / "model.keras").exists()
        assert not (out / "report.json").exists()
        assert not serving.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "has no data line: it is empty or holds only a header"),
    (b"x\ty\n", "has no data line: every one of its 1 lines is malformed"),
    ("\t".join(["1"] + ["1"] * 13 + ["a"] * 26).encode() + b"\n",
     "too few data lines to train and evaluate"),
])
def test_unusable_data_files_are_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "alpt_keras.cli", "--dataset", "criteo",
         "--data-path", str(path), "--output-dir", str(out)],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"alpt-train: --data-path {path}: "), last
    assert message in last
    assert not out.exists()  # nothing left behind
    if b"\t1\t" in content:  # a fixed file then trains into the same dir
        path.write_bytes(content * 40)
        rerun = subprocess.run(
            [sys.executable, "-m", "alpt_keras.cli", "--dataset", "criteo",
             "--data-path", str(path), "--output-dir", str(out),
             "--batch-size", "8", "--verbose", "0"],
            env=_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_malformed_lines_are_reported_on_the_console(tmp_path):
    from alpt_keras.cli.train import _load_data, parse_args

    path = _criteo_file(tmp_path / "train.txt", rows=200)
    args = parse_args(["--dataset", "criteo", "--data-path", path])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the run's summary, not stderr
        _, _, info, _ = _load_data(args, dict(embedding_dim=4))
    assert ("alpt-train: skipped 1 malformed line(s) of 201 (line 8: "
            "expected 40 tab-separated columns, found 4)") in out.getvalue()
    assert sum(info["rows"].values()) == 200


def test_sub_8_bit_tables_are_packed_by_default(tmp_path):
    """`--storage auto` packs codes below 8 bits: a 4-bit run's codes take
    half the bytes of an 8-bit run's (Δ, one float per row, is the same),
    and the size line names the storage."""
    tiny = ["--num-examples", "3000", "--num-fields", "3", "--vocab-size",
            "64", "--embedding-dim", "16", "--hidden-units", "8",
            "--batch-size", "256", "--verbose", "0"]
    reports, lines = {}, {}
    for bits in (8, 4):
        out = str(tmp_path / f"b{bits}")
        proc = _run(tiny + ["--bits", str(bits), "--output-dir", out])
        lines[bits] = [x for x in proc.stdout.splitlines()
                       if x.startswith("tables")][0]
        reports[bits] = _report(out)
    assert reports[8]["config"]["storage"] == "int8"
    assert reports[4]["config"]["storage"] == "packed"
    assert "(8-bit codes, int8 storage)" in lines[8]
    assert "(4-bit codes, packed storage)" in lines[4]
    codes8 = reports[8]["bytes"]["tables"]
    codes4 = reports[4]["bytes"]["tables"]
    rows = 2 * (codes8 - codes4) // 16  # the difference is V·D/2 bytes
    assert 0 < rows <= 3 * 64
    assert codes8 == rows * 16 + rows * 4  # 1 B per code + float Δ per row
    assert codes4 == rows * 16 // 2 + rows * 4  # half a byte per code
