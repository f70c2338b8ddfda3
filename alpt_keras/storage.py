"""Where a table's codes live: int8 or bit-packed int32 words.

A storage is a small interface over one variable, `read_rows(ids)`,
`read_rows_float(ids)` (the lookup's), `write_rows(ids, codes)` and
`read_all()`, with int32 (or exact float32) codes on the outside, so
the layer and the optimizer never depend on the container.
`read_state_rows` / `write_state_rows` do the same for the optimizer's
row-indexed state (additive state is written as `scatter_add`).
"""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras
from alpt_keras.update import Increment


class Int8Storage:
    """Codes in one int8 variable of shape `[V, D]` (the default).

    Rows are read with `tf.nn.embedding_lookup`, which returns them in id
    order for plain, mirrored and sharded variables alike (`tf.gather` on a
    `ShardedVariable` returns shard order).
    """

    kind = "int8"
    dtype = tf.int8

    def __init__(self, variable):
        self.variable = variable

    def read_rows(self, ids):
        """int32 codes of rows `ids`, shape `[U, D]`."""
        rows = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        return tf.cast(rows, tf.int32)

    def read_rows_float(self, ids):
        """float32 codes of rows `ids` (exact), the lookup's input: one
        cast from int8, where `read_rows` + a cast would take two."""
        rows = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        return tf.cast(rows, tf.float32)

    def write_rows(self, ids, codes):
        """Writes int codes `[U, D]` (already clipped) into rows `ids`."""
        update = tf.IndexedSlices(tf.cast(codes, self.dtype), ids)
        return _keras.tf_variable(self.variable).scatter_update(update)

    def read_all(self):
        return tf.cast(tf.convert_to_tensor(self.variable), tf.int32)


# ----------------------------------------------------------------- packing
# Word type of packed storage: int32.
# - Collectives accept it (bool/f16/bf16/f32/f64/int32/int64 only), so a
#   packed table can be created and broadcast under
#   MultiWorkerMirroredStrategy, where an int8 variable cannot even exist.
# - GPU: TF registers no GPU `ResourceGather`/`ResourceScatterUpdate`
#   kernels for int32 (resource_variable_ops.cc), so an int32 table is placed
#   on the host with its gather and scatter, and a step moves only the
#   gathered rows to the device (O(U·W)). An int8 table on a GPU instead
#   pays TF's integer-scatter host round trip, a copy of the whole table each
#   way per scatter (O(V·D)).
# - float32 words would stay on the GPU, but arbitrary bit patterns include
#   NaNs and denormals, which NaN guards (`check_numerics`, the optimizer's
#   finite-update check) reject and flush-to-zero arithmetic corrupts.
# - int64 words have device GPU gather/scatter kernels, but their 8-byte
#   granularity wastes space on narrow rows (a 16-wide 2-bit row needs 4
#   bytes); a GPU-resident int64 mode can be added behind this interface.
WORD_BITS = 32
PACKED_DTYPE = tf.int32
SUPPORTED_STORAGE = ("int8", "packed")


def words_per_row(output_dim, num_bits):
    """`ceil(D · b / 32)`: int32 words holding one row of `D` b-bit codes."""
    return -(-output_dim * num_bits // WORD_BITS)


def _layout(output_dim, num_bits):
    """Word index and bit offset of each code: code `j` starts at bit
    `j · b` of the row's bit string (little-endian within a word)."""
    start = np.arange(output_dim, dtype=np.int64) * num_bits
    return start // WORD_BITS, start % WORD_BITS


def pack_codes(codes, num_bits):
    """Packs signed b-bit codes `[U, D]` into int32 words `[U, W]`.

    A code `c` is stored as the unsigned `c + 2^(b-1)` in bits
    `[j·b, j·b + b)` of the row; codes may straddle two words when `b` does
    not divide 32. Only the given rows are packed.
    """
    codes = tf.convert_to_tensor(codes)
    dim = codes.shape[-1]
    num_words = words_per_row(dim, num_bits)
    unsigned = tf.cast(codes, tf.int64) + (1 << (num_bits - 1))
    if WORD_BITS % num_bits == 0:
        # Fast path (2, 4, 8 bits): whole codes per word, no straddling.
        per_word = WORD_BITS // num_bits
        pad = num_words * per_word - dim
        if pad:
            unsigned = tf.pad(unsigned, [[0, 0], [0, pad]])
        unsigned = tf.reshape(unsigned, [-1, num_words, per_word])
        shifts = tf.constant(np.arange(per_word) * num_bits, tf.int64)
        words = tf.reduce_sum(tf.bitwise.left_shift(unsigned, shifts), -1)
    else:
        word, offset = _layout(dim, num_bits)
        low = tf.bitwise.bitwise_and(
            tf.bitwise.left_shift(unsigned, offset), 0xFFFFFFFF)
        high = tf.bitwise.right_shift(unsigned, WORD_BITS - offset)
        # Disjoint bit fields: a sum per word is their OR.
        words = tf.math.unsorted_segment_sum(
            tf.transpose(tf.concat([low, high], axis=1)),
            np.concatenate([word, np.minimum(word + 1, num_words - 1)]),
            num_words,
        )
        words = tf.transpose(words)
    # [0, 2^32) -> the int32 with the same bits.
    words = tf.where(words >= 2**31, words - 2**32, words)
    return tf.cast(words, PACKED_DTYPE)


# Unpacking 2-, 4- and 8-bit codes (whole codes per word) with stock ops:
# each word's fields are spread into the bytes of an int64 ("SWAR": shift,
# OR, mask on the small `[U, W]` word tensor), and one `Bitcast` turns those
# bytes into a `[U, D]` tensor. Broadcasting one right shift per field over
# `[U, W, 32/b]` (the obvious way) runs TF's generic broadcast per element
# and cost ~10% of a criteo-like DNN's serving latency at batch 256
# (benchmarks/serving.py); this costs ~1/6 of that.
# (shift, mask) steps that move 8 b-bit fields from the low 8·b bits of an
# int64 into its 8 bytes, halving the group size at each step.
_SPREAD = {
    4: ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF),
        (4, 0x0F0F0F0F0F0F0F0F)),
    2: ((24, 0x000000FF000000FF), (12, 0x000F000F000F000F),
        (6, 0x0303030303030303)),
}


def host_is_little_endian():
    """A graph-time `bool` scalar: whether this host stores the low byte of
    an integer first. Computed in the graph, so a SavedModel exported on one
    host decodes right when served on the other kind."""
    probe = tf.bitcast(tf.constant(1, tf.int16), tf.uint8)
    return tf.equal(probe[0], tf.constant(1, tf.uint8))


def integer_bytes(x, little_endian=None):
    """The bytes of integers `x` `[..., ]` in significance order, lowest
    first: `uint8` `[..., itemsize]` whatever the host's byte order
    (`little_endian`: the `host_is_little_endian()` tensor, or a Python bool
    for tests)."""
    raw = tf.bitcast(x, tf.uint8)
    if little_endian is None:
        little_endian = host_is_little_endian()
    if isinstance(little_endian, bool):
        return raw if little_endian else tf.reverse(raw, [-1])
    return tf.cond(little_endian, lambda: tf.identity(raw),
                   lambda: tf.reverse(raw, [-1]))


def unpack_fields(words, num_bits, output_dim, little_endian=None):
    """The stored (unsigned) fields `c + 2^(b-1)` of int32 words `[U, W]`,
    as `uint8` `[U, D]`, for widths that divide 8 (2, 4, 8 bits)."""
    if 8 % num_bits:
        raise ValueError("unpack_fields takes 2-, 4- or 8-bit codes. "
                         f"Received: num_bits={num_bits}")
    words = tf.cast(tf.convert_to_tensor(words), PACKED_DTYPE)
    num_words = words.shape[-1]
    if num_bits == 8:  # four whole bytes per word already
        x = words
    else:
        # The word's 32 bits as an unsigned value in an int64.
        x = tf.bitwise.bitwise_and(tf.cast(words, tf.int64),
                                   tf.constant(0xFFFFFFFF, tf.int64))
        if num_bits == 2:  # 16 fields: each 16-bit half fills 8 bytes
            x = tf.stack([
                tf.bitwise.bitwise_and(x, tf.constant(0xFFFF, tf.int64)),
                tf.bitwise.right_shift(x, tf.constant(16, tf.int64))],
                axis=-1)
        for shift, mask in _SPREAD[num_bits]:
            x = tf.bitwise.bitwise_and(
                tf.bitwise.bitwise_or(
                    x, tf.bitwise.left_shift(x, tf.constant(shift, tf.int64))),
                tf.constant(mask, tf.int64))
    fields = tf.reshape(integer_bytes(x, little_endian),
                        [-1, num_words * (WORD_BITS // num_bits)])
    if fields.shape[-1] != output_dim:
        fields = fields[:, :output_dim]
    return tf.ensure_shape(fields, [None, output_dim])


def unpack_codes(words, num_bits, output_dim):
    """Inverse of `pack_codes`: int32 words `[U, W]` -> int32 codes
    `[U, D]` (static last dimension `D`)."""
    if 8 % num_bits == 0:  # 2, 4, 8 bits
        fields = unpack_fields(words, num_bits, output_dim)
        return tf.cast(fields, tf.int32) - (1 << (num_bits - 1))
    # 3, 5, 6, 7 bits: codes may straddle two words (int64 windows).
    mask = (1 << num_bits) - 1
    words = tf.bitwise.bitwise_and(
        tf.cast(tf.convert_to_tensor(words), tf.int64), 0xFFFFFFFF)
    word, offset = _layout(output_dim, num_bits)
    padded = tf.pad(words, [[0, 0], [0, 1]])
    window = tf.bitwise.bitwise_or(
        tf.gather(padded, word, axis=1),
        tf.bitwise.left_shift(tf.gather(padded, word + 1, axis=1),
                              WORD_BITS),
    )
    unsigned = tf.bitwise.right_shift(window, offset)
    unsigned = tf.bitwise.bitwise_and(unsigned, mask)
    codes = tf.cast(unsigned, tf.int32) - (1 << (num_bits - 1))
    return tf.ensure_shape(codes, [None, output_dim])


class PackedStorage:
    """b-bit codes bit-packed into int32 words, a `[V, ceil(D·b/32)]`
    variable (`storage="packed"`): 8-bit codes take 1 byte, 4-bit 1/2 and
    2-bit 1/4. Only gathered rows are unpacked and only written rows are
    repacked; codes are identical to `Int8Storage` for the same seed."""

    kind = "packed"
    dtype = PACKED_DTYPE

    def __init__(self, variable, num_bits, output_dim):
        self.variable = variable
        self.num_bits = num_bits
        self.output_dim = output_dim

    def read_rows(self, ids):
        words = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        return unpack_codes(words, self.num_bits, self.output_dim)

    def read_rows_float(self, ids):
        """float32 codes of rows `ids` (exact): the stored fields cast to
        float and shifted by `2^(b-1)` there, one integer pass fewer."""
        words = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        if 8 % self.num_bits:
            codes = unpack_codes(words, self.num_bits, self.output_dim)
            return tf.cast(codes, tf.float32)
        fields = unpack_fields(words, self.num_bits, self.output_dim)
        return tf.cast(fields, tf.float32) - float(1 << (self.num_bits - 1))

    def write_rows(self, ids, codes):
        update = tf.IndexedSlices(pack_codes(codes, self.num_bits), ids)
        return _keras.tf_variable(self.variable).scatter_update(update)

    def read_all(self):
        return unpack_codes(tf.convert_to_tensor(self.variable),
                            self.num_bits, self.output_dim)


def make_storage(kind, variable, num_bits, output_dim):
    """The storage object of `kind` (`SUPPORTED_STORAGE`) over
    `variable`."""
    if kind == "packed":
        return PackedStorage(variable, num_bits, output_dim)
    return Int8Storage(variable)


# ------------------------------------------------ optimizer state rows
def write_state_rows(variable, ids, new, old, per_row, condition=None):
    """Writes one slot for rows `ids` (or the whole `[1, 1]` slot of a
    per-table Δ); where `condition` is `False` it stays bitwise unchanged.
    An `Increment` is written as a `scatter_add` of the increment."""
    variable = _keras.tf_variable(variable)
    if isinstance(new, Increment):
        increment = new.increment if condition is None else tf.where(
            condition, new.increment, tf.zeros_like(new.increment))
        if per_row:
            return variable.scatter_add(tf.IndexedSlices(increment, ids))
        return variable.assign_add(increment)
    kept = new if condition is None else tf.where(condition, new, old)
    if per_row:
        return variable.scatter_update(tf.IndexedSlices(kept, ids))
    return variable.assign(kept)


def read_state_rows(variable, ids, per_row):
    """Rows `ids` of a row-indexed state variable (`per_row`), or the
    whole `[1, 1]` slot of a per-table Δ."""
    variable = _keras.tf_variable(variable)
    if per_row:
        return tf.nn.embedding_lookup(variable, ids)
    return tf.convert_to_tensor(variable)
