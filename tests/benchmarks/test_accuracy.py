"""The accuracy-matrix benchmark: its bootstrap statistics, and a tiny run."""

import importlib
import os
import sys

import numpy as np
import pytest

from tests.benchmarks import ROOT, run_tiny


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        yield importlib.import_module("accuracy")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _pairwise_auc(labels, scores):
    """AUC by its definition: P(score_pos > score_neg) + P(tie) / 2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return greater + 0.5 * ties


def test_auc_and_weighted_auc_match_the_definition(accuracy):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    # Rounded scores: many ties, which both formulas must count as half.
    scores = np.round(rng.random(300) + 0.3 * labels, 1).astype(np.float32)
    want = _pairwise_auc(labels, scores)
    assert accuracy.auc(labels, scores) == pytest.approx(want, abs=1e-12)
    ones = np.ones((1, 300), np.float32)
    assert accuracy._weighted_auc(labels, scores, ones)[0] == \
        pytest.approx(want, abs=1e-12)
    # Integer weights = the data set with repeated examples.
    counts = rng.integers(0, 4, (3, 300))
    for row in range(3):
        repeat = np.repeat(np.arange(300), counts[row])
        assert accuracy._weighted_auc(
            labels, scores, counts[row:row + 1].astype(np.float32))[0] == \
            pytest.approx(_pairwise_auc(labels[repeat], scores[repeat]),
                          abs=1e-12)
        assert accuracy._weighted_logloss(
            labels, scores, counts[row:row + 1].astype(np.float32))[0] == \
            pytest.approx(accuracy.logloss(labels[repeat], scores[repeat]),
                          rel=1e-6)


def test_paired_bootstrap_interval(accuracy):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    base = rng.random(2000) + 0.5 * labels
    # Same model: zero difference, zero-width interval.
    same = accuracy.paired_bootstrap(labels, [base], [base], 200, seed=0)
    assert same["d_auc"] == 0.0 and same["d_auc_ci"] == [0.0, 0.0]
    # A clearly better model: the interval excludes 0 and holds the point.
    better = base + 0.5 * labels
    result = accuracy.paired_bootstrap(labels, [better], [base], 200, seed=0)
    low, high = result["d_auc_ci"]
    assert 0 < low <= result["d_auc"] <= high
    assert result["d_logloss_ci"][1] >= result["d_logloss_ci"][0]


@pytest.mark.slow
def test_tiny_matrix_writes_json_and_plot(tmp_path):
    output = tmp_path / "accuracy.json"
    stdout, report = run_tiny("accuracy.py", output)
    assert "dAUC [95% CI]" in stdout
    assert report["benchmark"] == "accuracy"
    methods = {r["method"] for r in report["summary"]}
    assert methods == {"float32", "lpt_dr", "lpt_sr", "alpt", "alpt_2pass"}
    # 2 seeds x (float32 + 4 low-precision methods x 2 bit widths).
    assert len(report["runs"]) == 2 * (1 + 4 * 2)
    for run in report["runs"]:
        assert 0.5 < run["auc"] <= 1.0 and run["logloss"] > 0
    for row in report["summary"]:
        if row["method"] == "float32":
            # The reference itself must learn: floor well above chance.
            assert row["auc_mean"] > 0.65
            continue
        low, high = row["d_auc_ci"]
        assert low <= high
        assert row["seeds"] == 2
    assert {g["goal"].split(":")[0] for g in report["goals"]} == {
        "alpt8", "2-bit mean AUC"}
    with open(tmp_path / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_interval_includes_seed_noise(accuracy):
    """Two seeds that disagree (one better, one worse than the base) give an
    interval spanning both; one seed alone would not."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 4000)
    base = rng.random(4000) + 0.5 * labels
    better, worse = base + 0.3 * labels, base - 0.2 * labels
    both = accuracy.paired_bootstrap(labels, [better, worse], [base, base],
                                     400, seed=0)
    low, high = both["d_auc_ci"]
    assert low < 0 < high
    alone = accuracy.paired_bootstrap(labels, [better], [base], 400, seed=0)
    assert alone["d_auc_ci"][0] > 0
