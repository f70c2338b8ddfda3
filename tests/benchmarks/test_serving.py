"""benchmarks/serving.py runs, and its ratios are computed from its own
float32 rows."""

import pytest

from tests.benchmarks import run_tiny


@pytest.mark.slow
def test_serving_benchmark_tiny(tmp_path):
    stdout, report = run_tiny("serving.py", tmp_path / "serving.json")
    assert "b1 p50 ms" in stdout
    rows = {(r["layout"], r["variant"]): r for r in report["results"]}
    # 3 variants x 2 layouts, and the criteo-like tables unstacked.
    assert len(rows) == 7
    for (layout, _variant), r in rows.items():
        ref = rows[(layout, "float32")]
        assert r["export_ratio"] == pytest.approx(
            r["export_bytes"] / ref["export_bytes"])
        for batch in ("batch1", "batch256"):
            assert 0 < r[batch]["p50_ms"] <= r[batch]["p99_ms"]
    # Table bytes: int8 codes + per-row Δ = 20 of 64 bytes per 16-wide row;
    # 4-bit packed codes (8 B) + Δ = 12 of 64.
    for layout in ("criteo_like", "one_big_table"):
        assert rows[(layout, "alpt8")]["table_ratio"] == pytest.approx(
            20 / 64)
        assert rows[(layout, "alpt4_packed")]["table_ratio"] == \
            pytest.approx(12 / 64)
    assert rows[("criteo_like", "alpt8_unstacked")]["table_ratio"] == \
        pytest.approx(20 / 64)
