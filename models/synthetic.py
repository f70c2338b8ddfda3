"""Learnable synthetic CTR data whose labels depend only on the ids.

Each of `num_fields` categorical fields draws ids from a power law (or
uniformly), every id carries a hidden weight, and a click is drawn with
probability `sigmoid(bias + Σ_f weight_f[id_f])`. The hidden click
probabilities are returned too, so the best achievable AUC is known.
"""

import dataclasses

import numpy as np

from alpt_keras.models.metrics import auc, logloss


@dataclasses.dataclass
class SyntheticCTR:
    """`ids` int64 `[N, F]`, `labels` float32 `[N]`, `probabilities` `[N]`."""

    ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    vocab_size: int

    def hidden_metrics(self):
        """AUC and logloss of the hidden click model: the best achievable.

        AUC by the rank-sum formula (ties get average ranks).
        """
        return {"auc": auc(self.labels, self.probabilities),
                "logloss": logloss(self.labels, self.probabilities)}

    def features(self, names=None):
        """The ids as a dict `f0, f1, ...` (or `names`) -> int64 `[N]`."""
        names = names or [f"f{i}" for i in range(self.ids.shape[1])]
        return {n: self.ids[:, i] for i, n in enumerate(names)}

    def split(self, fraction):
        """Returns `(head, tail)` with `fraction` of the rows in `head`."""
        cut = int(len(self.labels) * fraction)
        head = SyntheticCTR(self.ids[:cut], self.labels[:cut],
                            self.probabilities[:cut], self.vocab_size)
        tail = SyntheticCTR(self.ids[cut:], self.labels[cut:],
                            self.probabilities[cut:], self.vocab_size)
        return head, tail


def make_synthetic_ctr(
    num_examples,
    num_fields=4,
    vocab_size=1000,
    weight_scale=1.0,
    zipf_exponent=None,
    seed=0,
):
    """Draws a synthetic CTR data set (same seed, same data).

    Args:
        num_examples: int > 0.
        num_fields: int > 0. Categorical fields per example.
        vocab_size: int > 1, or a list of `num_fields` of them (Criteo-like
            mixes of small and large fields). Ids of field `f` are in
            `[0, vocab_size[f])`.
        weight_scale: float > 0. Std of the hidden per-id weights; larger
            makes the task easier (higher best AUC).
        zipf_exponent: `None` for uniform ids, or a float > 1 for power-law
            id frequencies (`zipf(a) - 1`, folded into the vocabulary).
        seed: int.
    """
    for name, value, low in (("num_examples", num_examples, 1),
                             ("num_fields", num_fields, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"`{name}` must be an integer >= {low}. "
                f"Received: {name}={value!r}"
            )
    sizes = ([vocab_size] * num_fields if np.isscalar(vocab_size)
             else list(vocab_size))
    if len(sizes) != num_fields or any(
            not isinstance(v, (int, np.integer)) or v < 2 for v in sizes):
        raise ValueError(
            "`vocab_size` must be an integer >= 2 or a list of `num_fields` "
            f"of them. Received: vocab_size={vocab_size!r}"
        )
    if zipf_exponent is not None and not zipf_exponent > 1:
        raise ValueError(
            "`zipf_exponent` must be None or > 1. "
            f"Received: zipf_exponent={zipf_exponent!r}"
        )
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, dtype=np.int64)
    shape = (num_examples, num_fields)
    if zipf_exponent is None and np.isscalar(vocab_size):
        # Kept as first written: fixed seeds reproduce earlier data sets.
        ids = rng.integers(0, vocab_size, size=shape)
    elif zipf_exponent is None:
        ids = rng.integers(0, sizes[None, :], size=shape)
    else:
        ids = (rng.zipf(zipf_exponent, size=shape) - 1) % sizes[None, :]
    weights = rng.normal(0.0, weight_scale, size=(num_fields,
                                                  int(sizes.max())))
    logits = -0.2 + weights[np.arange(num_fields)[None, :], ids].sum(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = (rng.random(num_examples) < probabilities).astype(np.float32)
    return SyntheticCTR(ids.astype(np.int64), labels,
                        probabilities.astype(np.float32),
                        vocab_size if np.isscalar(vocab_size)
                        else [int(v) for v in sizes])


def criteo_like_synthetic(num_examples, seed, num_fields=26, vocab_size=None,
                          zipf_exponent=1.2):
    """The built-in default data of `alpt-train`: by default Criteo-like,
    26 fields with vocabularies from 10 to ~30,000 ids, power-law id
    frequencies and a hidden logistic click model.

    Args:
        num_examples: int, rows to draw.
        seed: int.
        num_fields: int, categorical fields.
        vocab_size: int (every field) or `None` for the Criteo-like sizes
            `10^1 … 10^4.5`.
        zipf_exponent: float > 1, or `0`/`None` for uniform ids.
    """
    if vocab_size is None:
        vocab_size = [int(round(10 ** e))
                      for e in np.linspace(1.0, 4.5, num_fields)]
    return make_synthetic_ctr(
        num_examples, num_fields=num_fields, vocab_size=vocab_size,
        weight_scale=0.35 * (26 / num_fields) ** 0.5,
        zipf_exponent=zipf_exponent or None, seed=seed)
