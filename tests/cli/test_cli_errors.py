"""`alpt-train`'s flags: every mistake is one line on stderr and exit
status 2, before any data is built; README's usage block is `--help`'s."""

import os
import re
import subprocess
import sys

import pytest

from alpt_keras.cli.train import _parser, parse_args
from tests.cli.test_alpt_train import _env

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("alpt-train: "), err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--bits", "9"], "--bits: invalid choice: 9"),
    (["--bits", "1"], "--bits: invalid choice: 1"),
    (["--bits", "0"], "--bits: invalid choice: 0"),
    (["--model", "foo"], "--model: invalid choice: 'foo'"),
    (["--embedding-optimizer", "foo"],
     "--embedding-optimizer: invalid choice: 'foo'"),
    (["--step-size-optimizer", "foo"],
     "--step-size-optimizer: invalid choice: 'foo'"),
    (["--learning-rate", "-1"], "--learning-rate must be a finite number > "
     "0. Received: -1.0"),
    (["--embedding-learning-rate", "0"], "--embedding-learning-rate must be"),
    (["--step-size-learning-rate", "inf"], "--step-size-learning-rate must"),
    (["--num-examples", "5"], "--num-examples must be >= 100"),
    (["--epochs", "0"], "--epochs must be >= 1. Received: 0"),
    (["--batch-size", "-3"], "--batch-size must be >= 1. Received: -3"),
    (["--min-count", "0"], "--min-count must be >= 1"),
    (["--hidden-units", "32,x"], "--hidden-units must be integers"),
    (["--hidden-units", "32,0"], "--hidden-units must be positive"),
    (["--dataset", "criteo"], "--dataset criteo needs --data-path"),
    (["--dataset", "criteo", "--data-path", "/nonexistent/train.txt"],
     "--data-path must be an existing file. Received: "
     "/nonexistent/train.txt (not found)"),
    (["--dataset", "avazu", "--data-path", "/tmp"],
     "--data-path must be an existing file. Received: /tmp (a directory)"),
    (["--data-path", "x.txt"], "--data-path does not apply to --dataset "
     "synthetic"),
    (["--storage", "packed", "--embedding", "float32"],
     "--storage packed does not apply to --embedding float32"),
    (["--verbose", "5"], "--verbose: invalid choice: 5"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    line = _refused(argv, capsys)
    assert message in line, line


def test_a_file_where_a_directory_belongs(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    for flag in ("--export-dir", "--output-dir"):
        line = _refused([flag, str(path)], capsys)
        assert f"{flag} must be a directory. Received: {path} (a file)" \
            in line


def test_no_traceback_and_no_data_built_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alpt_keras.cli", "--bits", "9",
         "--output-dir", str(tmp_path / "out")], env=_env(),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "alpt-train: argument --bits: invalid choice: 9 (choose from 2, 3, "
        "4, 5, 6, 7, 8)")
    assert not (tmp_path / "out").exists()


def test_help_lists_choices_and_defaults():
    text = " ".join(_parser().format_help().split())  # unwrapped
    for expected in ("{dnn,dcn,deepfm,ipnn,dlrm,wide_deep}", "{2..8}",
                     "{rowwise_adagrad,adagrad,sgd,lazy_adam}",
                     "(default: dnn)", "(default: 8)",
                     "(default: rowwise_adagrad)", "(default: 0.001)"):
        assert expected in text, expected


def test_readme_usage_block_is_the_usage_of_help():
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## `alpt-train`"):]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1).strip()
    assert block == _parser().format_usage().strip()
