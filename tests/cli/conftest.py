"""CLI tests run in their own empty working directory: `alpt-train`
without `--output-dir` creates `runs/...` there, not in the checkout."""

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
