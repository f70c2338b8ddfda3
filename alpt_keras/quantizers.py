"""Pure quantization functions used by ALPT (no state, no Keras).

Notation follows the ALPT paper (arXiv 2212.05735): `b` bits, codes in
`[-Q_N, Q_P]` with `Q_N = 2^(b-1)` and `Q_P = 2^(b-1) - 1`, a step size
`Δ > 0` and the quantizer `Q(w; Δ) = Δ · clip(R(w / Δ), -Q_N, Q_P)`.

Stochastic rounding draws its noise from a counter-based hash of
`(seed, salt, step, row id, column)` built from stock int64 ops. It is a pure
function of those integers, so every replica, rerun, shard and the NumPy
reference in the tests draw the same noise bit for bit, independently of the
order of `tf.unique`, the number of replicas or XLA. A stateful RNG would make
mirrored integer tables diverge.
"""

import tensorflow as tf

from alpt_keras.validation import check_int

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_ROUNDING = ("stochastic", "deterministic")

_MASK32 = 0xFFFFFFFF
# Multipliers stay below 2**31 so that a 32-bit value times a multiplier fits
# in a signed int64 without overflow: the hash is exact in int64 on every
# device and in NumPy.
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_COLUMN_MUL = 0x1E3779B9
# The initial codes use a step value that training never reaches.
INIT_STEP = _MASK32


def validate_num_bits(num_bits):
    """Returns `num_bits` as an int; `TypeError` unless it is an integer,
    `ValueError` unless it is in [2, 8]."""
    return check_int("num_bits", num_bits, minimum=SUPPORTED_BITS[0],
                     maximum=SUPPORTED_BITS[-1])


def code_range(num_bits):
    """Returns `(-Q_N, Q_P)`, the smallest and largest code for `num_bits`.

    Example:

    >>> code_range(8)
    (-128, 127)
    >>> code_range(2)
    (-2, 1)
    """
    validate_num_bits(num_bits)
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def round_half_up(x):
    """Deterministic rounding `R_D(x) = floor(x + 0.5)`, computed exactly.

    `tf.round` rounds half to even, and `floor(x + 0.5)` in float32 rounds
    `0.49999997` up because the sum is inexact; `x - floor(x)` is exact in
    float32, so comparing it with 0.5 gives round-half-up for every input.
    """
    x = tf.convert_to_tensor(x)
    low = tf.floor(x)
    return low + tf.cast(x - low >= 0.5, x.dtype)


def _uint32(x):
    """The low 32 bits of an integer tensor, as uint32."""
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(x, tf.int64), _MASK32),
                   tf.uint32)


def _shift(x, bits):
    return tf.bitwise.right_shift(x, tf.constant(bits, tf.uint32))


def _mix32(x):
    """A 32-bit integer finaliser (lowbias32 family) on uint32 tensors.

    uint32 arithmetic wraps modulo 2^32 by itself: no masking ops, and half
    the memory traffic of int64 (the noise of a step is ~10 elementwise ops
    on `[U, D]`; this halved its time on the embedding-step workload).
    """
    x = tf.bitwise.bitwise_xor(x, _shift(x, 16))
    x = x * tf.constant(_MUL1, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, _shift(x, 15))
    x = x * tf.constant(_MUL2, tf.uint32)
    return tf.bitwise.bitwise_xor(x, _shift(x, 16))


def _fold64(key, value):
    """Mixes a non-negative int64 `value` (all 63 bits) into a 32-bit key."""
    value = tf.cast(value, tf.int64)
    low = _uint32(value)
    high = tf.cast(tf.bitwise.right_shift(value, 32), tf.uint32)
    return _mix32(tf.bitwise.bitwise_xor(_mix32(tf.bitwise.bitwise_xor(
        key, low)), high))


def hash_key(seed, salt, step):
    """The uint32 scalar key of (seed, salt, step) that `hash_uniform`
    mixes with row ids and columns (each argument: 32 bits used)."""
    key = _mix32(tf.bitwise.bitwise_xor(_mix32(_uint32(seed)), _uint32(salt)))
    return _mix32(tf.bitwise.bitwise_xor(key, _uint32(step)))


def hash_uniform(seed, salt, step, row_ids, num_columns):
    """Uniform noise in [0, 1) as a pure function of its integer key.

    Args:
        seed: int or int64 scalar tensor. The user's seed (32 bits used).
        salt: int or int64 scalar tensor. The table salt (32 bits used).
        step: int or int64 scalar tensor. The training step (32 bits used).
        row_ids: int64 tensor of shape `[U]`, non-negative row ids.
        num_columns: int. The embedding dimension `D`.

    Returns:
        float32 tensor of shape `[U, D]` on the grid `k / 2^24`, so every
        value is exact in float32 and `P(u < r) = r` up to `2^-24`.
    """
    return hash_uniform_keyed(hash_key(seed, salt, step), row_ids,
                              num_columns)


def hash_uniform_keyed(keys, row_ids, num_columns):
    """`hash_uniform` from its keys: `keys` is the uint32 `hash_key` of
    (seed, salt, step), a scalar or one per row (`[U]`, for rows of
    different logical tables); `row_ids` `[U]`. Every op is elementwise,
    so a row's noise depends only on its own key and id."""
    row_keys = _fold64(keys, row_ids)  # (U,)
    columns = tf.range(num_columns, dtype=tf.int64)
    column_keys = _mix32(_uint32((columns + 1) * _COLUMN_MUL))  # (D,)
    bits = _mix32(
        tf.bitwise.bitwise_xor(row_keys[:, None], column_keys[None, :])
    )  # (U, D)
    # Top 24 bits: exactly representable as float32.
    return tf.cast(_shift(bits, 8), tf.float32) * (2.0**-24)


def stochastic_round(x, noise):
    """Stochastic rounding `R_S(x) = floor(x + u)` with given noise `u`.

    Computed as `floor(x) + [u < x - floor(x)]`: the fractional part is exact
    in float32, so `E[R_S(x)] = x` up to the `2^-24` grid of `u`.
    """
    x = tf.convert_to_tensor(x)
    low = tf.floor(x)
    return low + tf.cast(noise < x - low, x.dtype)


def quantize(w, step_size, num_bits, rounding="deterministic", noise=None):
    """Integer codes `clip(R(w / Δ), -Q_N, Q_P)` as int32.

    Args:
        w: float tensor `[..., D]`, the full-precision values.
        step_size: float tensor broadcastable to `w` (`[U, 1]` per row).
        num_bits: int in [2, 8].
        rounding: `"deterministic"` or `"stochastic"`.
        noise: uniform noise like `w`, required for stochastic rounding.

    Example:

    >>> quantize([[0.25, -0.5, 9.0]], [[0.5]], 4).numpy().tolist()
    [[1, -1, 7]]
    """
    q_min, q_max = code_range(num_bits)
    scaled = tf.convert_to_tensor(w, tf.float32) / step_size
    if rounding == "deterministic":
        rounded = round_half_up(scaled)
    elif rounding == "stochastic":
        if noise is None:
            raise ValueError("Stochastic rounding needs `noise`.")
        rounded = stochastic_round(scaled, noise)
    else:
        raise ValueError(
            f"`rounding` must be one of {SUPPORTED_ROUNDING}. "
            f"Received: rounding={rounding!r}"
        )
    # Clip in float before the cast: a float above int range would wrap.
    return tf.cast(tf.clip_by_value(rounded, q_min, q_max), tf.int32)


def dequantize(codes, step_size):
    """`Δ · ŵ` in float32."""
    return tf.cast(codes, tf.float32) * step_size


def lsq_ste_factor(w, step_size, num_bits):
    """Elementwise LSQ straight-through derivative `∂Q(w; Δ)/∂Δ / 1`.

    With `v = w / Δ`: `-Q_N` if `v <= -Q_N`, `Q_P` if `v >= Q_P`, and
    `R_D(v) - v` otherwise (Esser et al., 2020).
    """
    q_min, q_max = code_range(num_bits)
    v = tf.convert_to_tensor(w, tf.float32) / step_size
    inside = round_half_up(v) - v
    return tf.where(
        v <= q_min,
        tf.cast(q_min, tf.float32),
        tf.where(v >= q_max, tf.cast(q_max, tf.float32), inside),
    )


def lsq_gradient_scale(num_shared, num_bits):
    """LSQ's `γ = 1 / sqrt(N · Q_P)`, `N` weights sharing one step size."""
    _, q_max = code_range(num_bits)
    return 1.0 / float(num_shared * q_max) ** 0.5


def lsq_step_size_gradient(w, step_size, grad, num_bits, num_shared):
    """Per-row step-size gradient `γ Σ_j g_ij s_ij`, shape `[U, 1]`.

    Args:
        w: float32 `[U, D]`, the updated full-precision rows `w'`.
        step_size: float32 `[U, 1]` (or broadcastable), the current `Δ`.
        grad: float32 `[U, D]`, the loss gradient for those rows.
        num_bits: int in [2, 8].
        num_shared: int, the number of weights sharing one step size
            (`D` per row, `V · D` per table).
    """
    factor = lsq_ste_factor(w, step_size, num_bits)
    scale = lsq_gradient_scale(num_shared, num_bits)
    return scale * tf.reduce_sum(grad * factor, axis=-1, keepdims=True)


def lsq_initial_step_size(w, num_bits, per_row=True, minimum=0.0):
    """LSQ initial step `Δ0 = 2 · mean|w| / sqrt(Q_P)`, at least `minimum`.

    Returns float32 `[V, 1]` if `per_row` else `[1, 1]`.
    """
    _, q_max = code_range(num_bits)
    w = tf.abs(tf.convert_to_tensor(w, tf.float32))
    if per_row:
        mean_abs = tf.reduce_mean(w, axis=-1, keepdims=True)
    else:
        mean_abs = tf.reshape(tf.reduce_mean(w), [1, 1])
    return tf.maximum(2.0 * mean_abs / q_max**0.5, minimum)
