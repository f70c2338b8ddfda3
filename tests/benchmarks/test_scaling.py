"""The scaling benchmark runs in its tiny configuration."""

import pytest

from alpt_keras import IS_KERAS_3
from tests.benchmarks import run_tiny

D = 16


@pytest.mark.slow
def test_tiny_sweep_writes_complete_json(tmp_path):
    stdout, report = run_tiny("scaling.py", tmp_path / "scaling.json")
    assert "step time at the largest size" in stdout
    assert [r["rows"] for r in report["results"]] == [2**10, 2**12]
    for row in report["results"]:
        v = row["rows"]
        setups = row["setups"]
        assert set(setups) == {"alpt", "float32_sgd", "float32_adam"}
        # Exact bytes: int8 codes + Δ + row-wise Adagrad accumulator + Δ
        # accumulator; float32 table (+ Adam's two moments).
        assert setups["alpt"]["table_and_state_bytes"] == alpt_bytes(v)
        # tf_keras SGD keeps a [V, D] momentum slot even at momentum 0.
        sgd_slots = 0 if IS_KERAS_3 else 1
        assert setups["float32_sgd"]["table_and_state_bytes"] == \
            4 * v * D * (1 + sgd_slots)
        assert setups["float32_adam"]["table_and_state_bytes"] == \
            12 * v * D
        for r in setups.values():
            assert r["examples_per_second"] > 0
    assert set(report["step_time_growth"]) == {"alpt", "float32_sgd",
                                               "float32_adam"}


def alpt_bytes(v):  # noqa: N802
    return v * D + 3 * 4 * v
