"""The README's Python blocks and the docstring examples run as written."""

import doctest
import os
import re
import subprocess
import sys

import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import (
    _keras,
    callbacks,
    embedding,
    group,
    optimizer,
    quantizers,
)
from alpt_keras.models import criteo, feature_embedding, layers, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = _readme_blocks()


def test_readme_has_the_expected_examples():
    # Keras 3, TFRS, models, group in TFRS, Mirrored, two-pass, load and
    # continue, export
    assert len(BLOCKS) == 8


@pytest.mark.slow
@pytest.mark.skipif(not alpt_keras.IS_KERAS_3, reason=(
    "each README block runs in its own subprocess with its own flavour; "
    "the Keras 3 pass runs them all once"))
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    code = BLOCKS[index]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # blocks that need it set it
    script = tmp_path / f"block_{index}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "MirroredStrategy" in code:
        assert proc.stdout.strip().splitlines()[-1] == "True"
    if "table.codes.dtype" in code:
        assert "int8" in proc.stdout
    if "tfrs" in code:
        assert "'auc'" in proc.stdout
    if "load_model" in code:  # continued from the saved optimizer state
        assert proc.stdout.split() == ["16", "serving/ctr/1"], proc.stdout
    if "ALPTEmbeddingGroup" in code:
        assert "(0, 1000, 1500, 1550)" in proc.stdout
    if "two_pass(model)" in code:
        assert proc.stdout.strip().splitlines()[-1] == "True"
    if "export_for_serving" in code and "load_model" not in code:
        assert proc.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("module",
                         [quantizers, embedding, group, optimizer, callbacks,
                          feature_embedding, layers, criteo, metrics])
def test_docstring_examples(module):
    result = doctest.testmod(
        module, extraglobs={"tf": tf, "keras": _keras.keras},
        optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0
