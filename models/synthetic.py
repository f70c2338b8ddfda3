"""Learnable synthetic CTR data whose labels depend only on the ids.

Each of `num_fields` categorical fields draws ids from a power law (or
uniformly), every id carries a hidden weight, and a click is drawn with
probability `sigmoid(bias + Σ_f weight_f[id_f])`. The hidden click
probabilities are returned too, so the best achievable AUC is known.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class SyntheticCTR:
    """`ids` int64 `[N, F]`, `labels` float32 `[N]`, `probabilities` `[N]`."""

    ids: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    vocab_size: int

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
        vocab_size: int > 1. Ids per field are in `[0, vocab_size)`.
        weight_scale: float > 0. Std of the hidden per-id weights; larger
            makes the task easier (higher best AUC).
        zipf_exponent: `None` for uniform ids, or a float > 1 for power-law
            id frequencies (`zipf(a) - 1`, folded into the vocabulary).
        seed: int.
    """
    for name, value, low in (("num_examples", num_examples, 1),
                             ("num_fields", num_fields, 1),
                             ("vocab_size", vocab_size, 2)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"`{name}` must be an integer >= {low}. "
                f"Received: {name}={value!r}"
            )
    if zipf_exponent is not None and not zipf_exponent > 1:
        raise ValueError(
            "`zipf_exponent` must be None or > 1. "
            f"Received: zipf_exponent={zipf_exponent!r}"
        )
    rng = np.random.default_rng(seed)
    shape = (num_examples, num_fields)
    if zipf_exponent is None:
        ids = rng.integers(0, vocab_size, size=shape)
    else:
        ids = (rng.zipf(zipf_exponent, size=shape) - 1) % vocab_size
    weights = rng.normal(0.0, weight_scale, size=(num_fields, vocab_size))
    logits = -0.2 + weights[np.arange(num_fields)[None, :], ids].sum(axis=1)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = (rng.random(num_examples) < probabilities).astype(np.float32)
    return SyntheticCTR(ids.astype(np.int64), labels,
                        probabilities.astype(np.float32), vocab_size)
