"""The step-size-rule benchmark runs in its tiny configuration."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    output = tmp_path / "step_size_rule.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "step_size_rule.py"),
         "--tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Part A" in proc.stdout and "Part B" in proc.stdout
    report = json.loads(output.read_text())
    assert report["benchmark"] == "step_size_rule"
    kinds = {(row["embedding"], row["step_size_rule"])
             for row in report["accuracy"]}
    assert kinds == {("float32", None), ("lpt", None), ("alpt", "rowwise"),
                     ("alpt", "adam")}
    for row in report["accuracy"]:
        assert 0.5 < row["test_auc"] <= 1.0
        if row["embedding"] != "float32":
            assert 0.0 <= row["codes_changed_by_1e-6_perturbation"] <= 1.0
    assert len(report["replicas"]) == 2
    for row in report["replicas"]:
        assert 0.0 <= row["codes_differ"] <= 1.0
