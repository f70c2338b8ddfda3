"""The full-model throughput benchmark runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    stdout, report = run_tiny("model_step.py", tmp_path / "model_step.json")
    assert "vs fastest f32" in stdout
    assert report["benchmark"] == "model_step"
    by_name = {r["setup"]: r for r in report["results"]}
    assert set(by_name) == {"alpt", "alpt_stock", "alpt_2pass", "float32_sgd",
                            "float32_adam"}
    assert report["fastest_float32"] in ("float32_sgd", "float32_adam")
    fastest = by_name[report["fastest_float32"]]
    assert fastest["ratio_to_fastest_float32"] == 1.0
    assert by_name["float32_adam"]["ratio_to_float32_adam"] == 1.0
    for r in report["results"]:
        assert r["examples_per_second"] > 0 and r["steps"] == 2
        assert r["ratio_to_fastest_float32"] <= 1.0 or \
            r["setup"].startswith("alpt")
