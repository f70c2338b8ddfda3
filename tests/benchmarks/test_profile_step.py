"""The op-chain profile runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny

PIECES = {"full_step", "forward_backward", "apply", "id_check",
          "gather_dequantize", "unique", "segment_sum", "sorted_segment_sum",
          "gather_rows", "row_math", "hash_noise", "scatter_writes",
          "scatter_packed", "raw_chain"}


@pytest.mark.slow
def test_tiny_profile_writes_every_piece(tmp_path):
    stdout, report = run_tiny("profile_step.py", tmp_path / "profile.json")
    assert "Keras/wrapper overhead" in stdout
    pieces = {r["piece"]: r for r in report["results"]}
    fused = report["fused_kernel"]
    if "error" in fused:  # no compiler here: the stock pieces only
        assert set(pieces) == PIECES
    else:
        assert set(pieces) == PIECES | {"fused_row_math", "fused_chain"}
        # Same math in another summation order: a code may flip only where
        # w'/Δ' sits on a rounding threshold (rare); a wrong kernel would
        # change most of them.
        assert fused["fused_codes_differ"] <= 0.001 * fused["codes_compared"]
        assert "codes differ from the stock ops'" in stdout
    assert pieces["full_step"]["share_of_full_step"] == 1.0
    for r in pieces.values():
        assert r["median_seconds"] > 0
    assert report["unique_ids_per_step"] > 0
