"""The step-size-rule benchmark runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    output = tmp_path / "step_size_rule.json"
    stdout, report = run_tiny("step_size_rule.py", output)
    assert "Part A" in stdout and "Part B" in stdout
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
