"""What an ALPT table is, shared by the layer and the optimizer.

`ALPTEmbedding` creates the variables; `ALPTOptimizer` updates them. The
optimizer never imports the layer: it finds a table through the `TableState`
tagged on the layer's gradient-carrier variable (`TAG_ATTRIBUTE`). The codes
live behind a small storage interface (`read_rows`, `write_rows`) so that
other containers (packed words, sharded variables) can replace the default
int8 variable without touching the layer or the optimizer.
"""

import contextlib
import dataclasses
import threading
import weakref

import numpy as np
import tensorflow as tf

from alpt_keras import _keras

TAG_ATTRIBUTE = "_alpt_table"
SUPPORTED_STEP_SIZE = ("row", "table")

# Live `ALPTOptimizer`s, so the gradient function can tell a forgotten wrapper
# (a plain optimizer, whose failure would be an obscure rank error at trace
# time) from a wrapper that is simply not built yet (TFRS and custom loops
# compute gradients before `apply_gradients` builds the optimizer).
_LIVE_OPTIMIZERS = weakref.WeakSet()


def register_optimizer(optimizer):
    _LIVE_OPTIMIZERS.add(optimizer)


class Int8Storage:
    """Codes in one int8 variable of shape `[V, D]` (the default).

    Rows are read with `tf.nn.embedding_lookup`, which returns them in id
    order for plain, mirrored and sharded variables alike (`tf.gather` on a
    `ShardedVariable` returns shard order).
    """

    dtype = tf.int8

    def __init__(self, variable):
        self.variable = variable

    def read_rows(self, ids):
        """int32 codes of rows `ids`, shape `[U, D]`."""
        rows = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        return tf.cast(rows, tf.int32)

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


def unpack_codes(words, num_bits, output_dim):
    """Inverse of `pack_codes`: int32 words `[U, W]` -> int32 codes
    `[U, D]` (static last dimension `D`)."""
    words = tf.bitwise.bitwise_and(
        tf.cast(tf.convert_to_tensor(words), tf.int64), 0xFFFFFFFF)
    mask = (1 << num_bits) - 1
    if WORD_BITS % num_bits == 0:
        per_word = WORD_BITS // num_bits
        shifts = tf.constant(np.arange(per_word) * num_bits, tf.int64)
        fields = tf.bitwise.right_shift(words[:, :, None], shifts)
        unsigned = tf.reshape(fields, [-1, words.shape[-1] * per_word])
        unsigned = unsigned[:, :output_dim]
    else:
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

    dtype = PACKED_DTYPE

    def __init__(self, variable, num_bits, output_dim):
        self.variable = variable
        self.num_bits = num_bits
        self.output_dim = output_dim

    def read_rows(self, ids):
        words = tf.nn.embedding_lookup(_keras.tf_variable(self.variable), ids)
        return unpack_codes(words, self.num_bits, self.output_dim)

    def write_rows(self, ids, codes):
        update = tf.IndexedSlices(pack_codes(codes, self.num_bits), ids)
        return _keras.tf_variable(self.variable).scatter_update(update)

    def read_all(self):
        return unpack_codes(tf.convert_to_tensor(self.variable),
                            self.num_bits, self.output_dim)


# ------------------------------------------------- thread-local scopes
_SCOPE = threading.local()


@contextlib.contextmanager
def _scoped(name, value):
    """Sets the thread-local `name` to `value` inside (nests, restores)."""
    previous = getattr(_SCOPE, name, None)
    setattr(_SCOPE, name, value)
    try:
        yield
    finally:
        setattr(_SCOPE, name, previous)


def step_size_pass():
    """Inside, inference-mode lookups (`training=False`) still carry their
    row gradients: the second pass of a two-pass ALPT step runs the model
    in inference mode but needs `∂L/∂e` for the step sizes."""
    return _scoped("step_size_pass", True)


def in_step_size_pass():
    return bool(getattr(_SCOPE, "step_size_pass", None))


def row_variables(num_rows):
    """Marks variables created inside as row-indexed by a table of
    `num_rows` rows (codes, per-row Δ, per-row optimizer state), for
    `RowPartitioner`."""
    return _scoped("rows", num_rows)


# ---------------------------------------------------------------- sharding


class RowPartitioner(tf.distribute.experimental.partitioners.Partitioner):
    """Shards the row-indexed variables of ALPT tables over parameter
    servers, all with the same row boundaries; everything else stays whole.

    Pass it as `variable_partitioner` of `ParameterServerStrategy`. The
    codes, per-row step sizes and per-row optimizer state of a table are
    created inside `row_variables(V)` (by `ALPTEmbedding` and
    `ALPTOptimizer`), so each is split into `num_shards` pieces along axis
    0 the way TF splits any `[V, ...]` variable into equal shards (the first
    `V % num_shards` shards one row longer): the same boundaries for every
    variable of the table. Dense weights, per-table Δ, counters and the
    gradient carrier are not sharded.

    Args:
        num_shards: int >= 1, usually the number of parameter servers.
        min_rows_per_shard: int >= 1. Tables with fewer rows use fewer
            shards. Defaults to `1`.
    """

    def __init__(self, num_shards, min_rows_per_shard=1):
        for name, value in (("num_shards", num_shards),
                            ("min_rows_per_shard", min_rows_per_shard)):
            if isinstance(value, bool) or not isinstance(value, int) or \
                    value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1. "
                                 f"Received: {name}={value!r}")
        self.num_shards = num_shards
        self.min_rows_per_shard = min_rows_per_shard

    def __call__(self, shape, dtype, axis=0):
        shape = tf.TensorShape(shape)
        partitions = [1] * shape.rank
        rows = getattr(_SCOPE, "rows", None)
        if rows is None or shape.rank == 0 or axis != 0 or \
                shape[0] != rows:
            return partitions
        partitions[0] = max(1, min(self.num_shards,
                                   rows // self.min_rows_per_shard))
        return partitions


@dataclasses.dataclass(eq=False)
class TableState:
    """The variables and fixed settings of one ALPT table.

    Attributes:
        name: str, the layer name (for messages and optimizer slot names).
        input_dim: int, number of rows `V`.
        output_dim: int, row width `D`.
        num_bits: int in [2, 8].
        step_size_mode: `"row"` (one Δ per row) or `"table"`.
        rounding: rounding used when writing rows back.
        learn_step_size: bool; `False` means LPT (Δ fixed).
        seed: int, the noise seed.
        salt: int, the table salt mixed into the noise.
        min_step_size: float, the lower bound kept on Δ.
        storage: the codes container (`read_rows`, `write_rows`).
        step_size: float32 variable `[V, 1]` or `[1, 1]`.
    """

    name: str
    input_dim: int
    output_dim: int
    num_bits: int
    step_size_mode: str
    rounding: str
    learn_step_size: bool
    seed: int
    salt: int
    min_step_size: float
    storage: object
    step_size: object
    claimed_by: object = None

    @property
    def per_row(self):
        return self.step_size_mode == "row"

    @property
    def num_shared(self):
        """Weights sharing one step size (LSQ's `N`)."""
        if self.per_row:
            return self.output_dim
        return self.input_dim * self.output_dim

    def read_step_sizes(self, ids):
        """Δ for rows `ids`: `[U, 1]` per row, `[1, 1]` per table."""
        variable = _keras.tf_variable(self.step_size)
        if self.per_row:
            return tf.nn.embedding_lookup(variable, ids)
        return tf.convert_to_tensor(variable)

    def write_step_sizes(self, ids, values):
        variable = _keras.tf_variable(self.step_size)
        if self.per_row:
            return variable.scatter_update(tf.IndexedSlices(values, ids))
        return variable.assign(values)

    def claim(self, optimizer):
        self.claimed_by = weakref.ref(optimizer)

    def check_optimizer(self):
        """Raises a clear error if no `ALPTOptimizer` can apply this table.

        Called while the gradient is traced, before any optimizer runs.
        """
        owner = self.claimed_by() if self.claimed_by is not None else None
        if owner is not None:
            return
        if any(not opt.built for opt in list(_LIVE_OPTIMIZERS)):
            return  # An unbuilt wrapper will claim the table when it builds.
        raise TypeError(
            f"The ALPT table of layer '{self.name}' must be trained with "
            "`alpt_keras.ALPTOptimizer`: a plain Keras optimizer cannot "
            "update integer codes. Wrap your optimizer, e.g. "
            "`model.compile(optimizer=alpt_keras.ALPTOptimizer("
            "keras.optimizers.Adam()), ...)`. Received gradients for this "
            "table, but no ALPTOptimizer was built with its variables."
        )


def find_table(variable):
    """The `TableState` tagged on `variable`, or `None`."""
    table = getattr(variable, TAG_ATTRIBUTE, None)
    if table is None:
        table = getattr(_keras.tf_variable(variable), TAG_ATTRIBUTE, None)
    return table
