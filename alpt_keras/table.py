"""What an ALPT table is, shared by the layer and the optimizer.

`ALPTEmbedding` creates the variables; `ALPTOptimizer` updates them. The
optimizer never imports the layer: it finds a table through the `TableState`
tagged on the layer's gradient-carrier variable (`TAG_ATTRIBUTE`). The codes
live behind a small storage interface (`read_rows`, `write_rows`) so that
other containers (packed words, sharded variables) can replace the default
int8 variable without touching the layer or the optimizer.
"""

import dataclasses
import weakref

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

    def write_all(self, codes):
        self.variable.assign(tf.cast(codes, self.dtype))


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
