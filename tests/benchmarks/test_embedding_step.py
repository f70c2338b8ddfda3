"""The embedding-step benchmark runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    output = tmp_path / "embedding_step.json"
    stdout, report = run_tiny("embedding_step.py", output)
    assert "vs fastest float32" in stdout
    assert report["benchmark"] == "embedding_step"
    setups = {r["setup"]: r for r in report["results"]}
    assert set(setups) == {"alpt", "alpt_packed", "alpt4_packed",
                           "float32_sgd", "float32_adam"}
    assert report["fastest_float32"] in ("float32_sgd", "float32_adam")
    for r in setups.values():
        assert r["examples_per_second"] > 0 and r["steps"] == 3
    fastest = setups[report["fastest_float32"]]
    assert fastest["ratio_to_fastest_float32"] == 1.0
