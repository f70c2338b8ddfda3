"""The embedding-step benchmark runs in its tiny configuration."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.slow
def test_tiny_run_writes_complete_json(tmp_path):
    output = tmp_path / "embedding_step.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "embedding_step.py"),
         "--tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vs fastest float32" in proc.stdout
    report = json.loads(output.read_text())
    assert report["benchmark"] == "embedding_step"
    setups = {r["setup"]: r for r in report["results"]}
    assert set(setups) == {"alpt", "float32_sgd", "float32_adam"}
    assert report["fastest_float32"] in ("float32_sgd", "float32_adam")
    for r in setups.values():
        assert r["examples_per_second"] > 0 and r["steps"] == 3
    fastest = setups[report["fastest_float32"]]
    assert fastest["ratio_to_fastest_float32"] == 1.0
