"""The op-chain profile runs in its tiny configuration."""

import pytest

from tests.benchmarks import run_tiny

PIECES = {"full_step", "forward_backward", "apply", "id_check",
          "gather_dequantize", "unique", "segment_sum", "gather_rows",
          "row_math", "hash_noise", "scatter_writes", "raw_chain"}
NATIVE = {"full_step_stock", "forward_backward_stock", "apply_stock",
          "native_gather_dequantize", "native_unique_segment_sum",
          "native_table_step", "native_chain"}


@pytest.mark.slow
def test_tiny_profile_writes_every_piece(tmp_path):
    stdout, report = run_tiny("profile_step.py", tmp_path / "profile.json")
    assert "Keras/wrapper overhead" in stdout
    pieces = {r["piece"]: r for r in report["results"]}
    if report["native_kernels"] == "built":
        assert set(pieces) == PIECES | NATIVE
    else:  # no compiler here: the stock pieces only, and why
        assert set(pieces) == PIECES
        assert "native kernels not measured" in stdout
    assert pieces["full_step"]["share_of_full_step"] == 1.0
    for r in pieces.values():
        assert r["median_seconds"] > 0
    assert report["unique_ids_per_step"] > 0
