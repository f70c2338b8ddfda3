"""Exact test metrics in NumPy: AUC (ties count half) and logloss.

Shared by the synthetic data's hidden-model metrics and the accuracy
benchmark, which bootstraps them.
"""

import numpy as np

_EPS = 1e-7


def auc(labels, scores):
    """Rank-sum AUC, ties given average ranks: `P(s_pos > s_neg) +
    P(tie) / 2`. NaN when `labels` hold a single class.

    >>> auc([0, 1, 0, 1], [0.1, 0.9, 0.5, 0.5])
    0.875
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def logloss(labels, scores):
    """Mean binary cross-entropy, probabilities clipped to
    `[1e-7, 1 - 1e-7]`."""
    p = np.clip(np.asarray(scores, np.float64).reshape(-1), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64).reshape(-1)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
