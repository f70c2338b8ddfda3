"""Smoke tests: each benchmark runs once in its tiny configuration."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run_tiny(script, output):
    """Runs `benchmarks/<script> --tiny`; returns (stdout, JSON report)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(output, encoding="utf-8") as f:
        return proc.stdout, json.load(f)
