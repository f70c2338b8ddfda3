"""The mixed-precision benchmark runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    stdout, report = run_tiny("mixed_precision.py",
                              tmp_path / "mixed_precision.json")
    assert "vs f32 compute" in stdout
    assert report["benchmark"] == "mixed_precision"
    by_name = {r["setup"]: r for r in report["results"]}
    assert set(by_name) == {"alpt8", "alpt8_bfloat16", "alpt8_float16",
                            "float32", "float32_bfloat16"}
    for name, row in by_name.items():
        assert row["mixed_precision"] in ("none", "bfloat16", "float16")
        assert len(row["train_seconds"]) == report["rounds"] == 1
        assert 0.5 < row["test_auc_mean"] <= 1.0, row
        assert row["time_ratio_to_float32_compute"] > 0
        # ALPT vs float32 tables at the same compute, where both ran.
        assert (row["time_ratio_to_float32_tables"] is not None) == (
            name in ("alpt8", "alpt8_bfloat16")), row
        if row["mixed_precision"] == "none":  # its own baseline
            assert row["baseline"] == name
            assert row["time_ratio_to_float32_compute"] == 1.0
            assert row["auc_minus_float32_compute_mean"] == 0.0
