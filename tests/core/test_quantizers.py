"""Quantizer functions against the NumPy reference, and noise statistics."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import quantizers
from tests import reference as ref


@pytest.mark.parametrize(
    "bits, expected", [(2, (-2, 1)), (4, (-8, 7)), (8, (-128, 127))]
)
def test_code_range(bits, expected):
    assert quantizers.code_range(bits) == expected


@pytest.mark.parametrize("bad, error", [
    (1, ValueError), (9, ValueError), (0, ValueError), (4.0, TypeError),
    ("8", TypeError), (None, TypeError), (True, TypeError)])
def test_num_bits_validation_quotes_value(bad, error):
    with pytest.raises(error, match=r"num_bits=" + repr(bad)[:3]):
        quantizers.validate_num_bits(bad)


def test_num_bits_accepts_numpy_integers():
    assert quantizers.validate_num_bits(np.int64(4)) == 4
    assert quantizers.code_range(np.int8(2)) == (-2, 1)


def test_round_half_up_table():
    # Inputs and expected outputs, including the float32 trap 0.49999997
    # (floor(x + 0.5) in float32 gives 1) and halves (tf.round gives even).
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.50000006,
                  3.2, -3.7], np.float32)
    expected = np.array([-2, -1, 0, 1, 2, 3, 0, -1, 3, -4], np.float32)
    np.testing.assert_array_equal(quantizers.round_half_up(x).numpy(),
                                  expected)
    np.testing.assert_array_equal(ref.round_half_up(x), expected)


def test_hash_noise_matches_numpy_bit_for_bit():
    rows = np.array([0, 1, 2, 7, 123456789, 2**40 + 3, 2**62], np.int64)
    for seed, salt, step in [(0, 0, 0), (1, 2, 3), (2**31 - 1, 0xDEADBEEF,
                                                      2**32 - 1)]:
        tf_noise = quantizers.hash_uniform(seed, salt, step, rows, 16).numpy()
        np_noise = ref.hash_uniform(seed, salt, step, rows, 16)
        np.testing.assert_array_equal(tf_noise, np_noise)
        assert tf_noise.min() >= 0.0 and tf_noise.max() < 1.0


def test_hash_noise_is_uniform_and_uncorrelated():
    # 200,000 draws: 20,000 rows x 10 columns.
    rows = np.arange(20_000, dtype=np.int64)
    u = ref.hash_uniform(7, 11, 5, rows, 10).astype(np.float64)
    n = u.size
    # Mean 1/2 and variance 1/12 within 5 standard errors.
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    # Histogram of 16 bins: chi-square with 15 dof below its 99.99% quantile.
    counts, _ = np.histogram(u, bins=16, range=(0, 1))
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
    assert chi2 < 44.3
    # Correlation between neighbouring columns, rows, steps, tables, seeds:
    # |r| below 5 / sqrt(N) (5 standard errors of r under independence).
    bound = 5 / np.sqrt(u.shape[0])
    other = {
        "next column": u[:, 1:2].ravel(),
        "next row": np.roll(u[:, 0], -1),
        "next step": ref.hash_uniform(7, 11, 6, rows, 10)[:, 0],
        "other table salt": ref.hash_uniform(7, 12, 5, rows, 10)[:, 0],
        "other seed": ref.hash_uniform(8, 11, 5, rows, 10)[:, 0],
    }
    for name, values in other.items():
        r = np.corrcoef(u[:, 0], values)[0, 1]
        assert abs(r) < bound, (name, r)
        # Different streams, not shifted copies of one another.
        assert np.mean(u[:, 0] == values) < 1e-3, name


def test_stochastic_rounding_is_unbiased():
    # For each x, 100,000 draws (rows) of R_S(x): the mean is within 5
    # standard errors sqrt(f(1-f)/N) of x, f = frac(x).
    n = 100_000
    rows = np.arange(n, dtype=np.int64)
    noise = quantizers.hash_uniform(3, 5, 0, rows, 1)
    for x in [-1.75, -0.3, 0.01, 0.5, 2.9, 100.37]:
        values = tf.fill([n, 1], tf.constant(x, tf.float32))
        rounded = quantizers.stochastic_round(values, noise).numpy()
        frac = x - np.floor(x)
        assert set(np.unique(rounded)) <= {np.floor(x), np.floor(x) + 1}
        stderr = np.sqrt(max(frac * (1 - frac), 1e-12) / n)
        assert abs(rounded.mean() - x) < 5 * stderr + 1e-6, x


def test_quantize_matches_reference_and_clips():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (64, 8)).astype(np.float32) * 5
    step = np.full((64, 1), 0.05, np.float32)
    rows = np.arange(64, dtype=np.int64)
    for bits in (2, 4, 8):
        noise = ref.hash_uniform(1, 2, 3, rows, 8)
        for rounding in ("deterministic", "stochastic"):
            got = quantizers.quantize(w, step, bits, rounding,
                                      None if rounding == "deterministic"
                                      else noise).numpy()
            want = ref.quantize(w, step, bits, rounding, noise)
            np.testing.assert_array_equal(got, want)
            lo, hi = ref.code_range(bits)
            assert got.min() >= lo and got.max() <= hi


def test_quantize_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="rounding='nearest'"):
        quantizers.quantize([[1.0]], [[1.0]], 8, "nearest")


def test_lsq_gradient_table():
    # Hand-derived: Δ = 1, 2 bits (Q_N = 2, Q_P = 1), D = 4, so γ = 1/2.
    w = np.array([[-3.0, 0.3, 0.75, 5.0]], np.float32)
    g = np.array([[1.0, 2.0, -1.0, 0.5]], np.float32)
    # s = [-2, R(0.3)-0.3 = -0.3, R(0.75)-0.75 = 0.25, 1]
    expected = 0.5 * (1.0 * -2 + 2.0 * -0.3 + -1.0 * 0.25 + 0.5 * 1)
    got = quantizers.lsq_step_size_gradient(w, [[1.0]], g, 2, 4).numpy()
    np.testing.assert_allclose(got, [[expected]], rtol=1e-6)


def test_lsq_initial_step_size():
    w = np.array([[1.0, -1.0], [0.0, 0.0]], np.float32)
    got = quantizers.lsq_initial_step_size(w, 8, per_row=True,
                                           minimum=1e-3).numpy()
    np.testing.assert_allclose(got, [[2 / np.sqrt(127)], [1e-3]], rtol=1e-6)
    table = quantizers.lsq_initial_step_size(w, 8, per_row=False).numpy()
    np.testing.assert_allclose(table, [[2 * 0.5 / np.sqrt(127)]], rtol=1e-6)
