"""`alpt-evaluate` (issue 14, item 6): a model or an export, scored on data
through the training run's pipeline and vocabulary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alpt_keras.cli.evaluate import main
from tests.cli.test_alpt_train import _criteo_file

TINY = ["--num-examples", "4000", "--num-fields", "4", "--vocab-size", "50",
        "--zipf-exponent", "0", "--batch-size", "256", "--hidden-units", "8",
        "--epochs", "2", "--verbose", "0"]


def _train(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "alpt_keras.cli"] + args,
                          env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _evaluate(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    path = argv[argv.index("--output") + 1]
    with open(path, encoding="utf-8") as f:
        return json.load(f), out


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    run = str(base / "run")
    _train(TINY + ["--output-dir", run, "--export-dir",
                   str(base / "serving")])
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return run, str(base / "serving" / "ctr"), report


@pytest.mark.slow
def test_a_run_and_its_export_score_the_test_split_again(synthetic_run,
                                                         tmp_path, capsys):
    run, export, report = synthetic_run
    keras_result, out = _evaluate([run, "--output",
                                   str(tmp_path / "k.json")], capsys)
    assert "split test; keras" in out
    export_result, _ = _evaluate([export, "--run", run, "--output",
                                  str(tmp_path / "e.json")], capsys)
    assert keras_result["split"] == export_result["split"] == "test"
    assert keras_result["examples"] == 400  # the 8:1:1 split of 4,000
    assert export_result["kind"] == "export"
    # The same examples through the model and through the SavedModel:
    # float32 predictions, equal to rounding (1e-6).
    for key in ("auc", "logloss", "mean_prediction"):
        np.testing.assert_allclose(export_result[key], keras_result[key],
                                   rtol=1e-6, err_msg=key)
    # alpt-train's own test logloss (Keras: float32 mean, same clipping).
    np.testing.assert_allclose(keras_result["logloss"],
                               report["metrics"]["test_logloss"], rtol=1e-5)
    # Keras' AUC interpolates over 200 thresholds; ours is exact.
    assert abs(keras_result["auc"] - report["metrics"]["test_auc"]) < 0.02
    assert keras_result["auc"] > 0.6  # the model did learn something


@pytest.mark.slow
def test_a_new_criteo_file_goes_through_the_saved_vocabulary(tmp_path,
                                                              capsys):
    train = _criteo_file(tmp_path / "train.txt")
    run = str(tmp_path / "run")
    _train(["--dataset", "criteo", "--data-path", train, "--model", "dnn",
            "--hidden-units", "16", "--batch-size", "64", "--epochs", "3",
            "--learning-rate", "5e-3", "--verbose", "0", "--output-dir", run,
            "--export-dir", str(tmp_path / "serving")])
    # The export takes the raw Criteo columns; its warm-up requests too.
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tmp_path / "serving" / "ctr" / "1"))
    assert set(loaded.signatures) == {"serving_default", "serving_ids"}
    raw_inputs = loaded.signatures["serving_default"] \
        .structured_input_signature[1]
    assert raw_inputs["I1"].dtype == tf.string and len(raw_inputs) == 39
    # Another day: other rows (seed 1), same click rule (C1 decides).
    day2 = _criteo_file(tmp_path / "day2.txt", rows=1500, seed=1)
    result, out = _evaluate([os.path.join(run, "model.keras"), "--data-path",
                             day2, "--output", str(tmp_path / "d2.json")],
                            capsys)
    assert "scoring every example of the new data (--split all)" in out
    assert result["split"] == "all"
    assert result["examples"] == 1500  # its malformed line 8 is skipped
    assert result["data"]["data_path"] == day2
    assert result["auc"] > 0.7, result  # the user id carries the click
    # The training file again, its test split: alpt-train's logloss.
    again, _ = _evaluate([run, "--output", str(tmp_path / "t.json")],
                         capsys)
    with open(os.path.join(run, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert again["split"] == "test"
    np.testing.assert_allclose(again["logloss"],
                               report["metrics"]["test_logloss"], rtol=1e-5)
    # The export (its id signature), on the new file: the model's numbers.
    served, _ = _evaluate([str(tmp_path / "serving" / "ctr"), "--run", run,
                           "--data-path", day2, "--output",
                           str(tmp_path / "s.json")], capsys)
    for key in ("auc", "logloss"):
        np.testing.assert_allclose(served[key], result[key], rtol=1e-6)


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alpt-evaluate: "), err
    return err[0]


def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert "MODEL must be an existing file or folder. Received: " \
        f"{missing} (not found)" in _refused([missing], capsys)
    text = tmp_path / "model.txt"
    text.write_text("x")
    assert "(a file, not .keras)" in _refused([str(text)], capsys)
    assert "a folder with none of these" in _refused([str(tmp_path)],
                                                     capsys)
    keras_file = tmp_path / "m.keras"
    keras_file.write_text("x")  # resolved, never loaded: flags fail first
    assert "--dataset criteo needs the training run's vocabulary" in \
        _refused([str(keras_file), "--dataset", "criteo", "--data-path",
                  str(text)], capsys)
    assert "--data-path does not apply to --dataset synthetic" in \
        _refused([str(keras_file), "--data-path", str(text)], capsys)
    assert "--run must be an alpt-train output folder" in \
        _refused([str(keras_file), "--run", str(tmp_path)], capsys)
    assert "--split: invalid choice: 'x'" in \
        _refused([str(keras_file), "--split", "x"], capsys)
