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
    assert set(setups) == {"alpt", "alpt_stock", "alpt_packed",
                           "alpt4_packed", "float32_sgd", "float32_adam"}
    assert isinstance(report["native_kernels"], bool)
    # Bytes and bandwidth: the ALPT step's traffic and a memory copy.
    assert len(report["memory_copy_gb_per_s"]) == 2
    assert all(b > 0 for b in report["memory_copy_gb_per_s"])
    for name in ("alpt", "alpt_stock"):
        moved = setups[name]["step_bytes"]
        assert moved["read"] > 0 and moved["written"] > 0
        assert setups[name]["achieved_gb_per_s"] > 0
    assert "step_bytes" not in setups["float32_sgd"]
    assert report["fastest_float32"] in ("float32_sgd", "float32_adam")
    for r in setups.values():
        assert r["examples_per_second"] > 0 and r["steps"] == 3
    fastest = setups[report["fastest_float32"]]
    assert fastest["ratio_to_fastest_float32"] == 1.0


PEER_STANDIN = '''#!{python}
"""Stands in for an interpreter with the `peer` extra: answers like
peer_fbgemm.py with fixed step times (the real peer needs torch)."""
import json, sys
argv = sys.argv[2:]
out = argv[argv.index("--json") + 1]
precisions = argv[argv.index("--precisions") + 1:]
steps = int(argv[argv.index("--steps") + 1])
results = []
for p in precisions:
    if p == "INT8":
        results.append({{"setup": "fbgemm_int8", "supported": False,
                         "error": "NotImplementedError: not for Byte"}})
    else:
        results.append({{"setup": "fbgemm_" + p.lower(), "supported": True,
                         "step_seconds": [0.002 if p == "FP32" else 0.004]
                         * steps}})
json.dump({{"torch": "stand-in", "fbgemm_gpu": "stand-in", "threads": 2,
           "results": results}}, open(out, "w"))
'''


@pytest.mark.slow
def test_peer_turns_are_merged_into_the_table(tmp_path):
    """`--peer-python`: the peer's FP32/FP16 step times join the results;
    what it cannot train is reported, not dropped."""
    import subprocess
    import sys

    from tests.benchmarks import ROOT

    standin = tmp_path / "peer-python"
    standin.write_text(PEER_STANDIN.format(python=sys.executable))
    standin.chmod(0o755)
    output = tmp_path / "embedding_step.json"
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/benchmarks/embedding_step.py", "--tiny",
         "--setups", "alpt", "float32_sgd", "--peer-python", str(standin),
         "--pair", "alpt", "float32_sgd", "--output", str(output)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(output.read_text())
    setups = {r["setup"]: r for r in report["results"]}
    assert set(setups) == {"alpt", "float32_sgd", "fbgemm_fp32",
                           "fbgemm_fp16"}
    assert setups["fbgemm_fp32"]["examples_per_second"] == \
        pytest.approx(256 / 0.002)
    assert setups["fbgemm_fp32"]["steps"] == 3
    # The baseline stays the fastest TensorFlow float32 setup.
    assert report["fastest_float32"] == "float32_sgd"
    assert "fbgemm_int8" in report["peer"]["unsupported"]
    assert "cannot train: fbgemm_int8" in proc.stdout
    # Per-round medians (1 round in --tiny), and --pair's ratio from them.
    assert setups["fbgemm_fp32"]["round_median_seconds"] == [0.002]
    pair = report["pair"]
    expected = (setups["float32_sgd"]["round_median_seconds"][0]
                / setups["alpt"]["round_median_seconds"][0])
    assert pair["round_ratios"] == pytest.approx([expected])
    assert pair["median"] == pytest.approx(expected)
    assert "alpt vs float32_sgd" in proc.stdout
    bad = subprocess.run(
        [sys.executable, f"{ROOT}/benchmarks/embedding_step.py", "--tiny",
         "--setups", "alpt", "--pair", "alpt", "float32_sgd",
         "--output", str(output)], capture_output=True, text=True,
        timeout=600)
    assert bad.returncode == 2
    assert "--pair ['alpt', 'float32_sgd']: ['float32_sgd'] not among" \
        in bad.stderr
