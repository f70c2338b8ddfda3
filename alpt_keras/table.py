"""What an ALPT table is, shared by the layer and the optimizer.

`ALPTEmbedding` creates the variables; `ALPTOptimizer` updates them. Neither
imports the other: a table is found through the `TableState` tagged on the
layer's gradient-carrier variable (`TAG_ATTRIBUTE`), by `find_table` for
one variable and by `tables(model)` for a whole model. Export, the CLI and
callbacks use `tables`, never variable or layer names.
"""

import dataclasses
import weakref

import tensorflow as tf

from alpt_keras import _keras
from alpt_keras.update import SUPPORTED_STEP_SIZE_MODES, TableSpec

TAG_ATTRIBUTE = "_alpt_table"
# Kept under its old name: `ALPTEmbedding(step_size=...)` takes a mode.
SUPPORTED_STEP_SIZE = SUPPORTED_STEP_SIZE_MODES
# How multi-hot ids of one example are reduced to one row (the layer also
# takes `None`: no reduction).
SUPPORTED_COMBINERS = ("sum", "mean", "sqrtn")

# Live `ALPTOptimizer`s, so the gradient function can tell a forgotten wrapper
# (a plain optimizer, whose failure would be an obscure rank error at trace
# time) from a wrapper that is simply not built yet (TFRS and custom loops
# compute gradients before `apply_gradients` builds the optimizer).
_LIVE_OPTIMIZERS = weakref.WeakSet()


def register_optimizer(optimizer):
    _LIVE_OPTIMIZERS.add(optimizer)


def combine(sums, counts, combiner):
    """Reduces bags: `sums` `[..., D]` of `counts` `[..., 1]` (or a scalar)
    rows each, by `combiner` (`SUPPORTED_COMBINERS`). Empty bags give
    zeros, not NaN."""
    if combiner == "sum":
        return sums
    counts = tf.maximum(tf.cast(counts, sums.dtype), 1.0)
    if combiner == "mean":
        return sums / counts
    return sums / tf.sqrt(counts)


def sparse_bags(ids):
    """`ids` (a `tf.SparseTensor` `[B, N]`) as a `tf.RaggedTensor` of bags:
    row `b` holds the stored values of row `b`, in column order, wherever
    they stand (`[[3, _, 7]]` is the bag `[3, 7]`; implicit entries are
    not ids). Unlike `RaggedTensor.from_sparse`, the values need not be
    left-aligned."""
    if ids.shape.rank is not None and ids.shape.rank != 2:
        raise ValueError(
            "Sparse ids must have rank 2 ([batch, ids per example]). "
            f"Received: a SparseTensor of shape {ids.shape}")
    ids = tf.sparse.reorder(ids)
    return tf.RaggedTensor.from_value_rowids(
        ids.values, ids.indices[:, 0], nrows=ids.dense_shape[0])


def fail_check(data, condition=False):
    """A graph-mode check that raises `InvalidArgumentError` with `data`
    (strings and tensors, up to 10 values each) when `condition` is false.

    The raw `Assert` op, not `tf.debugging.Assert`: the latter wraps the op
    in its own `cond` (`AssertGuard`), whose `Merge` node makes Grappler's
    loop optimizer warn ("Skipping loop optimization for Merge node with
    control input") on every traced `fit` and `predict`. Callers put it in
    the failing branch of their own `tf.cond`, so it costs nothing when the
    ids are valid.
    """
    if tf.executing_eagerly():  # no graph here: the readable eager error
        return tf.debugging.Assert(condition, data, summarize=10)
    return tf.raw_ops.Assert(
        condition=tf.convert_to_tensor(condition, tf.bool),
        data=[tf.convert_to_tensor(x) for x in data], summarize=10)


def integer_ids(flat, owner):
    """int64 ids of `flat`: integers are cast; floats only if every value
    is a whole number (checked in the graph; `1.7` or NaN fails with
    `InvalidArgumentError` naming `owner` rather than being truncated);
    other dtypes raise `TypeError`."""
    if flat.dtype.is_integer:
        return tf.cast(flat, tf.int64)
    if not flat.dtype.is_floating:
        raise TypeError(f"{owner} needs integer ids. Received: ids of "
                        f"dtype {flat.dtype.name}")
    whole = tf.reduce_all(tf.equal(flat, tf.round(flat)))

    def fail():
        bad = tf.not_equal(flat, tf.round(flat))
        check = fail_check([
            f"{owner} needs integer ids; float ids must be whole numbers "
            "(they are never truncated). Received non-integer ids "
            "(first 10):", tf.boolean_mask(flat, bad)[:10]])
        with tf.control_dependencies([check]):
            return tf.identity(flat)

    flat = tf.cond(whole, lambda: tf.identity(flat), fail)
    return tf.cast(flat, tf.int64)


def check_float_dtype(layer):
    """Refuses a layer dtype policy whose compute dtype is not floating
    (`dtype="int32"` would cast every dequantized row to 0)."""
    compute = tf.as_dtype(layer.compute_dtype)
    if not compute.is_floating:
        raise ValueError(
            f"Layer '{layer.name}' returns dequantized float rows, so its "
            "`dtype` must be a float type or policy (e.g. 'float32', "
            f"'mixed_bfloat16'). Received: dtype={compute.name}")


def checked_ids(flat, input_dim, name):
    """int64 ids `flat` `[N]`, checked against `[0, input_dim)` before any
    use: an out-of-range id fails with `InvalidArgumentError` naming
    `name` and showing the first 10 offending ids.

    The largest id as unsigned covers both ends (a free `Bitcast`:
    negative ids wrap to huge unsigned values; one reduction, no cast pass,
    no `[N]` bool tensor); the offending ids are gathered only when the
    check fails, which halves its cost per serving request.
    """
    ids = integer_ids(flat, f"ALPTEmbedding '{name}'")
    in_range = tf.reduce_max(tf.bitcast(ids, tf.uint64)) < input_dim

    def fail():
        bad = tf.logical_or(ids < 0, ids >= input_dim)
        check = fail_check([
            f"ALPT table '{name}': ids must be in [0, input_dim={input_dim})."
            " Received out-of-range ids (first 10):",
            tf.boolean_mask(ids, bad)[:10]])
        with tf.control_dependencies([check]):
            return tf.identity(ids)

    return tf.cond(in_range, lambda: tf.identity(ids), fail)


@dataclasses.dataclass(eq=False)
class TableState:
    """One ALPT table: its fixed settings and its variables.

    A layer's variables hold one or several logical tables (a group:
    stacked rows, `alpt_keras.ALPTEmbeddingGroup`); `ALPTEmbedding` is a
    group of one, so both run the same code.

    Attributes:
        spec: `alpt_keras.update.GroupSpec`, the fixed settings (`.tables`:
            the logical tables' `TableSpec`s; `.offsets`: their first rows).
        storage: the codes container (`read_rows`, `write_rows`,
            `read_all`; `alpt_keras.storage`).
        step_sizes: float32 variable of Δ, `[V, 1]` (per-row mode) or
            `[1, 1]` (per-table mode).
        layer: the layer that owns the variables (for reports).
    """

    spec: TableSpec
    storage: object
    step_sizes: object
    layer: object = None
    claimed_by: object = None

    @property
    def name(self):
        return self.spec.name

    @property
    def codes(self):
        """The codes variable (int8 `[V, D]` or packed int32 words)."""
        return self.storage.variable

    def read_step_sizes(self, ids):
        """Δ for rows `ids`: `[U, 1]` per row; per table, the whole Δ
        variable `[T, 1]` (one per logical table; `update.row_step_sizes`
        spreads it over rows)."""
        variable = _keras.tf_variable(self.step_sizes)
        if self.spec.per_row:
            return tf.nn.embedding_lookup(variable, ids)
        return tf.convert_to_tensor(variable)

    def write_step_sizes(self, ids, values):
        variable = _keras.tf_variable(self.step_sizes)
        if self.spec.per_row:
            return variable.scatter_update(tf.IndexedSlices(values, ids))
        return variable.assign(values)

    def logical_values(self):
        """`(TableSpec, codes, step_sizes)` of each logical table, its rows
        sliced out of the (possibly stacked, possibly sharded) variables:
        codes `[V_t, ...]` as stored, Δ `[V_t, 1]` or `[1, 1]`."""
        codes = tf.convert_to_tensor(self.codes)  # joins PS shards
        steps = tf.convert_to_tensor(self.step_sizes)
        offsets = self.spec.offsets
        out = []
        for t, spec in enumerate(self.spec.tables):
            rows = slice(offsets[t], offsets[t + 1])
            out.append((spec, codes[rows],
                        steps[rows] if self.spec.per_row
                        else steps[t:t + 1]))
        return out

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


def tables(model):
    """The ALPT tables of a model or layer, each once, in weight order.

    Found by the tag on each table's gradient carrier, so names, nesting
    and the Keras flavour do not matter.

    Args:
        model: a built Keras model or layer.

    Returns:
        list of `TableState` (`.spec`, `.codes`, `.step_sizes`,
        `.storage`, `.layer`).

    Example:

    >>> import alpt_keras
    >>> layer = alpt_keras.ALPTEmbedding(10, 4, name="user")
    >>> layer.build(None)
    >>> [t.name for t in alpt_keras.tables(layer)]
    ['user']
    """
    return tables_of(model.weights)


def tables_of(variables):
    """The ALPT tables tagged on `variables`, each once, in order."""
    found = []
    for variable in variables:
        table = find_table(variable)
        if table is not None and all(table is not t for t in found):
            found.append(table)
    return found
