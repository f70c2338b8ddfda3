"""`ALPTOptimizer`: wraps a Keras optimizer and owns every ALPT table update."""

import collections
import contextlib
import copy
import functools
import threading

import tensorflow as tf

from alpt_keras import _keras, quantizers
from alpt_keras.table import find_table, register_optimizer, row_variables

keras = _keras.keras

SUPPORTED_EMBEDDING_OPTIMIZERS = (
    "rowwise_adagrad",
    "adagrad",
    "sgd",
    "lazy_adam",
)
SUPPORTED_STEP_SIZE_OPTIMIZERS = ("rowwise", "adam", "adagrad", "sgd")
SUPPORTED_STEP_SIZE_GRADIENTS = ("one_pass", "two_pass")

# Bytes of table-optimizer state per row of width D (float32 slots).
EMBEDDING_STATE_BYTES = {
    "rowwise_adagrad": lambda d: 4,
    "adagrad": lambda d: 4 * d,
    "sgd": lambda d: 0,
    "lazy_adam": lambda d: 8 * d,
}
_DEFAULT_EMBEDDING_LR = {
    "rowwise_adagrad": 0.01,
    "adagrad": 0.01,
    "sgd": 0.01,
    "lazy_adam": 0.001,
}
# Default step-size learning rates by (optimizer, step-size mode). "rowwise"
# is relative (a fraction of Δ); the others are absolute, and references
# learn a per-row Δ with Adam at 2e-5 and a per-table Δ at 1e-6. Plain SGD
# has no sensible default: LSQ step-size gradients are ~1e-9 on CTR data.
_DEFAULT_STEP_SIZE_LR = {
    ("rowwise", "row"): 0.03,
    ("rowwise", "table"): 0.03,
    ("adam", "row"): 2e-5,
    ("adam", "table"): 1e-6,
    ("adagrad", "row"): 2e-5,
    ("adagrad", "table"): 1e-6,
}


def _check_float(name, value, minimum=0.0, allow_none=False, inclusive=False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = value >= minimum if inclusive else value > minimum
        ok = ok and value != float("inf")
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(
            f"`{name}` must be a finite number {bound} {minimum}. "
            f"Received: {name}={value!r}"
        )
    return value


class _Sum(collections.namedtuple("_Sum", ["value", "increment"])):
    """New optimizer state `value = old + increment`, written as a
    `scatter_add` of the increment: bitwise the same as writing `value`,
    and no increment is lost when asynchronous parameter-server workers
    update the same rows at once."""


def _write_state(variable, ids, new, old, finite, per_row):
    """Writes one state slot for rows `ids` (or the whole `[1, 1]` slot of
    a per-table Δ); a non-finite step leaves it bitwise unchanged."""
    variable = _keras.tf_variable(variable)
    if isinstance(new, _Sum):
        increment = tf.where(finite, new.increment,
                             tf.zeros_like(new.increment))
        if per_row:
            return variable.scatter_add(tf.IndexedSlices(increment, ids))
        return variable.assign_add(increment)
    kept = tf.where(finite, new, old)
    if per_row:
        return variable.scatter_update(tf.IndexedSlices(kept, ids))
    return variable.assign(kept)


class _TwoPassState:
    """A two-pass step's bookkeeping, between the two passes of one traced
    train step. A plain object, not a list or dict, so Keras's attribute
    tracking never adopts the carriers and tensors kept here as optimizer
    variables."""

    def __init__(self):
        # Inside `two_pass_step()`: per thread, since MirroredStrategy runs
        # each replica's step in its own thread.
        self.local = threading.local()
        # The first pass's rows (set and read in cross-replica context).
        self.pending = None

    @property
    def active(self):
        return getattr(self.local, "active", False)

    @active.setter
    def active(self, value):
        self.local.active = value


class _VariableList(list):
    """A list that is also callable: tf_keras code calls `variables()`."""

    def __call__(self):
        return self


def _optimizer_base_classes():
    classes = [keras.optimizers.Optimizer]
    legacy = getattr(keras.optimizers, "legacy", None)
    if legacy is not None and hasattr(legacy, "Optimizer"):
        classes.append(legacy.Optimizer)
    return tuple(classes)


@_keras.register
class ALPTOptimizer(keras.optimizers.Optimizer):
    """Optimizer wrapper that trains `ALPTEmbedding` tables in low precision.

    Dense variables go to `inner_optimizer` unchanged (its learning-rate
    schedule, clipping and weight decay apply to them only). For every ALPT
    table, each step:

    1. sums the row gradients of all replicas and of duplicate ids
       (`unique` + `unsorted_segment_sum`): `g_i` for the touched rows `U`;
    2. dequantizes the touched rows `w_i = Δ_i ŵ_i` and applies the table
       optimizer to them only: `w'_i = EmbOpt(w_i, g_i)`;
    3. learns the step size (ALPT; skipped when the layer has
       `learn_step_size=False`) with the LSQ gradient
       `∂L/∂Δ_i = γ Σ_j g_ij s_ij`, `s_ij = R_D(v) - v` inside the range and
       `-Q_N` / `Q_P` outside it, `v = w'_i / Δ_i`, `γ = 1/sqrt(N Q_P)`,
       applied with the step-size optimizer and kept `>= min_step_size`.
       With `step_size_gradient="one_pass"` (default) `g_i` stands in for
       the gradient of a second pass. With `"two_pass"` (the paper's exact
       step) the gradient `ĝ_i` of a second forward/backward pass on the
       same batch, with the touched rows at `Q_D(w'_i; Δ_i)` and the dense
       variables already updated, is used instead; the model's train step
       must run that pass (`alpt_keras.TwoPassTrainStep`,
       `alpt_keras.two_pass`);
    4. writes back `ŵ_i = clip(R(w'_i / Δ'_i), -Q_N, Q_P)` with the layer's
       rounding; stochastic noise is a hash of (seed, salt, step, row, column).

    Only the touched rows of codes and optimizer state are read or written:
    no `[V, D]` operation per step. Updates are computed once, in
    cross-replica context, and written identically to every replica copy. A
    step whose table gradients contain NaN/Inf leaves every table (codes, Δ,
    table-optimizer state, step counter) bitwise unchanged and increments
    `skipped_table_updates`.

    Table optimizers and their state per row of width `D`:
    `"rowwise_adagrad"` (default; `a_i += mean_j g_ij²`,
    `w -= lr g / (sqrt(a_i) + ε)`; 4 bytes), `"adagrad"` (per element; 4·D
    bytes), `"sgd"` (none) and `"lazy_adam"` (moments read and written for
    touched rows only, bias-corrected with the global table step; 8·D bytes).

    Step-size optimizers (state per step size):
    - `"rowwise"` (default; 4 bytes): `b_i += mean_j g_ij²`,
      `Δ_i ← Δ_i · (1 - lr · (∂L/∂Δ_i) / (sqrt(b_i) + ε_Δ))`. Δ's gradient
      is scaled by its rows' gradient RMS, the scaling LSQ's `γ` assumes
      (step size and weights share one update rule), and `lr` is a fraction
      of Δ, so the default suits every bit width and initial scale.
    - `"adam"` (the paper's choice; 8 bytes) and `"adagrad"` (4 bytes)
      normalise Δ's gradient by its own magnitude. At 8 bits that gradient
      is mostly quantization noise, so they random-walk Δ; their learning
      rates are absolute (defaults `2e-5` per row, `1e-6` per table).
    - `"sgd"` (none): needs an explicit `step_size_learning_rate`.

    A learned Δ makes training sensitive to float rounding order: the LSQ
    gradient jumps where `w/Δ` crosses a half-integer. Replica copies are
    always bit-identical; runs with a different number of replicas agree
    closely for the first steps and then drift apart as any two runs with
    different float summation order do (README, "Reproducibility").

    Example:

    >>> opt = ALPTOptimizer(keras.optimizers.Adam(1e-3))
    >>> opt.embedding_optimizer
    'rowwise_adagrad'

    References:
        - Li et al., "Learning Accurate Low-bit Embeddings for CTR
          Prediction via Adaptive Low-Precision Training", AAAI 2023.
    """

    def __init__(
        self,
        inner_optimizer,
        embedding_optimizer="rowwise_adagrad",
        embedding_learning_rate=None,
        step_size_optimizer="rowwise",
        step_size_learning_rate=None,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        step_size_epsilon=1e-12,
        initial_accumulator_value=0.0,
        step_size_gradient="one_pass",
        name="alpt_optimizer",
        **kwargs,
    ):
        if kwargs:
            raise TypeError(
                "ALPTOptimizer does not take these arguments: "
                f"{sorted(kwargs)}. Set clipping, weight decay and EMA on the "
                "`inner_optimizer` (they apply to the dense variables). "
                f"Received: {kwargs}"
            )
        if isinstance(inner_optimizer, ALPTOptimizer):
            raise ValueError(
                "`inner_optimizer` must be a plain Keras optimizer, not "
                f"another ALPTOptimizer. Received: {inner_optimizer!r}"
            )
        if not isinstance(inner_optimizer, _optimizer_base_classes()):
            flavour = "Keras 3" if _keras.IS_KERAS_3 else "tf_keras"
            raise TypeError(
                "`inner_optimizer` must be an optimizer of the active Keras "
                f"flavour ({flavour}, `{keras.__name__}.optimizers`). "
                f"Received: {inner_optimizer!r}"
            )
        if "LossScaleOptimizer" in type(inner_optimizer).__name__:
            raise NotImplementedError(
                "ALPTOptimizer does not support loss scaling yet: the table "
                "gradients would stay scaled. Train with float32 or "
                "mixed_bfloat16 (no loss scaling). Received: inner_optimizer="
                f"{type(inner_optimizer).__name__}"
            )
        if embedding_optimizer not in SUPPORTED_EMBEDDING_OPTIMIZERS:
            raise ValueError(
                "`embedding_optimizer` must be one of "
                f"{SUPPORTED_EMBEDDING_OPTIMIZERS}. "
                f"Received: embedding_optimizer={embedding_optimizer!r}"
            )
        if step_size_optimizer not in SUPPORTED_STEP_SIZE_OPTIMIZERS:
            raise ValueError(
                "`step_size_optimizer` must be one of "
                f"{SUPPORTED_STEP_SIZE_OPTIMIZERS}. "
                f"Received: step_size_optimizer={step_size_optimizer!r}"
            )
        if step_size_gradient not in SUPPORTED_STEP_SIZE_GRADIENTS:
            raise ValueError(
                "`step_size_gradient` must be one of "
                f"{SUPPORTED_STEP_SIZE_GRADIENTS}. "
                f"Received: step_size_gradient={step_size_gradient!r}"
            )
        if step_size_optimizer == "sgd" and step_size_learning_rate is None:
            raise ValueError(
                "`step_size_optimizer='sgd'` needs an explicit "
                "`step_size_learning_rate` (LSQ step-size gradients are tiny "
                "and depend on the loss scale). Received: "
                "step_size_learning_rate=None"
            )
        embedding_learning_rate = _check_float(
            "embedding_learning_rate", embedding_learning_rate, allow_none=True
        )
        step_size_learning_rate = _check_float(
            "step_size_learning_rate", step_size_learning_rate, allow_none=True
        )
        for arg, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            value = _check_float(arg, value, 0.0, inclusive=True)
            if value >= 1.0:
                raise ValueError(
                    f"`{arg}` must be in [0, 1). Received: {arg}={value!r}"
                )
        if _keras.IS_KERAS_3:
            super().__init__(learning_rate=0.0, name=name)
        else:
            super().__init__(name=name)
        self.inner_optimizer = inner_optimizer
        self.embedding_optimizer = embedding_optimizer
        self.embedding_learning_rate = embedding_learning_rate
        self.step_size_optimizer = step_size_optimizer
        self.step_size_learning_rate = step_size_learning_rate
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = _check_float("epsilon", epsilon)
        self.step_size_epsilon = _check_float(
            "step_size_epsilon", step_size_epsilon
        )
        self.initial_accumulator_value = _check_float(
            "initial_accumulator_value",
            initial_accumulator_value,
            inclusive=True,
        )
        self.step_size_gradient = step_size_gradient
        self._alpt_built = False
        self._tables = []
        self._slots = []
        self._two_pass = _TwoPassState()
        register_optimizer(self)

    # -------------------------------------------------------- forwarding
    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # The base constructors set a learning rate before the inner
        # optimizer exists; that placeholder is ignored.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @iterations.setter
    def iterations(self, variable):
        # tf_keras assigns `iterations` in its constructor; keep ours.
        self._iterations = variable

    @property
    def variables(self):
        return _VariableList(
            list(self._variables) + list(self.inner_optimizer.variables)
        )

    @property
    def table_iterations(self):
        """int64 variable: table steps applied (the noise and Adam step)."""
        return self._table_iterations

    @property
    def skipped_table_updates(self):
        """int64 variable: steps whose table update was skipped (NaN/Inf)."""
        return self._skipped_table_updates

    @property
    def built(self):
        return self._alpt_built

    @built.setter
    def built(self, value):
        # Keras 3's base constructor writes `built = False`.
        self._alpt_built = bool(value)

    def finalize_variable_values(self, var_list):
        dense = [v for v in var_list if find_table(v) is None]
        self.inner_optimizer.finalize_variable_values(dense)

    # ------------------------------------------------------------- build
    def build(self, var_list):
        if self._alpt_built:
            return
        var_list = list(var_list)
        dense = [v for v in var_list if find_table(v) is None]
        tables = []
        for variable in var_list:
            table = find_table(variable)
            if table is not None and all(table is not t for t in tables):
                tables.append(table)
        self.inner_optimizer.build(dense)
        self._build_own_variables(tables)

    def _build_own_variables(self, tables):
        add = functools.partial(_keras.add_optimizer_variable, self)
        self._table_iterations = add((), "int64", "table_iterations")
        self._skipped_table_updates = add(
            (), "int64", "skipped_table_updates"
        )
        init_acc = keras.initializers.Constant(self.initial_accumulator_value)
        for table in tables:
            with row_variables(table.input_dim):  # for RowPartitioner
                slots = self._build_table_slots(table, add, init_acc)
            table.claim(self)
            self._tables.append(table)
            self._slots.append(slots)
        self._alpt_built = True
        if not _keras.IS_KERAS_3:
            self._built = True

    def _build_table_slots(self, table, add, init_acc):
        """Creates the optimizer state of one table."""
        rows, width = table.input_dim, table.output_dim
        prefix = table.name
        slots = {}
        if self.embedding_optimizer == "rowwise_adagrad":
            slots["accumulator"] = add(
                (rows, 1), "float32", f"{prefix}_accumulator", init_acc
            )
        elif self.embedding_optimizer == "adagrad":
            slots["accumulator"] = add(
                (rows, width), "float32", f"{prefix}_accumulator", init_acc
            )
        elif self.embedding_optimizer == "lazy_adam":
            slots["m"] = add((rows, width), "float32", f"{prefix}_m")
            slots["v"] = add((rows, width), "float32", f"{prefix}_v")
        if table.learn_step_size:
            step_rows = rows if table.per_row else 1
            if self.step_size_optimizer == "adam":
                slots["step_m"] = add(
                    (step_rows, 1), "float32", f"{prefix}_step_size_m"
                )
                slots["step_v"] = add(
                    (step_rows, 1), "float32", f"{prefix}_step_size_v"
                )
            elif self.step_size_optimizer in ("adagrad", "rowwise"):
                slots["step_accumulator"] = add(
                    (step_rows, 1),
                    "float32",
                    f"{prefix}_step_size_accumulator",
                    init_acc,
                )
        return slots

    # ------------------------------------------------------------- apply
    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        """Applies dense gradients with the inner optimizer, rows here.

        Extra arguments go to the inner optimizer's `apply_gradients`;
        `skip_gradients_aggregation=True` (tf_keras) also skips the
        all-reduce of table gradients.
        """
        grads_and_vars = list(grads_and_vars)
        aggregate = not kwargs.get("skip_gradients_aggregation", False)
        aggregate = aggregate and kwargs.get(
            "experimental_aggregate_gradients", True
        )
        return self._apply(grads_and_vars, aggregate, args, kwargs)

    def apply(self, grads, trainable_variables=None):
        """Keras 3 entry point: `apply(grads, trainable_variables)`."""
        if trainable_variables is None:
            raise ValueError(
                "ALPTOptimizer.apply needs `trainable_variables`. "
                "Received: trainable_variables=None"
            )
        return self._apply(
            list(zip(grads, trainable_variables, strict=True)), True, (), {}
        )

    if not _keras.IS_KERAS_3:  # Keras 3 optimizers have no `minimize`.

        def minimize(self, loss, var_list, tape=None):
            """tf_keras entry point of `Model.fit`: build, then apply."""
            if callable(var_list):
                var_list = var_list()
            if not self._alpt_built:
                with tf.init_scope():
                    self.build(var_list)
            return super().minimize(loss, var_list, tape=tape)

    def _apply(self, grads_and_vars, aggregate, args, kwargs):
        dense, table_grads = [], []
        for grad, variable in grads_and_vars:
            table = find_table(variable)
            if table is None:
                dense.append((grad, variable))
            elif grad is not None:
                table_grads.append((table, grad, variable))
        if not self._alpt_built:
            with tf.init_scope():
                self.build([v for _, v in grads_and_vars])
        two_pass = self.step_size_gradient == "two_pass" and any(
            table.learn_step_size for table, _, _ in table_grads)
        if two_pass and not self._two_pass.active:
            raise RuntimeError(
                "ALPTOptimizer(step_size_gradient='two_pass') learns step "
                "sizes from a second forward/backward pass that an optimizer "
                "cannot run. Train with a model whose train step runs it: "
                "subclass `alpt_keras.TwoPassTrainStep` (Keras models and "
                "tfrs.Model) or call `alpt_keras.two_pass(model)` before "
                "`fit` (functional models); in a custom loop, apply inside "
                "`optimizer.two_pass_step()` and then call "
                "`optimizer.apply_step_size_gradients`. Received: an apply "
                "outside a two-pass train step."
            )
        if self._two_pass.pending is not None:
            raise RuntimeError(
                "ALPTOptimizer: the previous two-pass step is still waiting "
                "for its second-pass gradients "
                "(`apply_step_size_gradients`). Received: another apply.")
        result = None
        if dense:
            result = self.inner_optimizer.apply_gradients(
                dense, *args, **kwargs
            )
        if table_grads:
            self._apply_tables(table_grads, aggregate, count_step=not dense,
                               two_pass=two_pass)
        return self.iterations if result is None else result

    def _table_slices(self, table_grads):
        """Checks table gradients; returns them as float32/int64 slices."""
        slices = []
        for table, grad in table_grads:
            if table.claimed_by is None or table.claimed_by() is not self:
                raise ValueError(
                    f"The ALPT table of layer '{table.name}' was not part of "
                    "the variables this ALPTOptimizer was built with. "
                    "Received: a gradient for it."
                )
            if not isinstance(grad, tf.IndexedSlices):
                raise TypeError(
                    f"The gradient of ALPT table '{table.name}' must be the "
                    "`tf.IndexedSlices` produced by ALPTEmbedding. Received: "
                    f"{type(grad).__name__}"
                )
            slices.append(
                tf.IndexedSlices(
                    tf.cast(grad.values, tf.float32),
                    tf.cast(grad.indices, tf.int64),
                    grad.dense_shape,
                )
            )
        return slices

    def _in_cross_replica(self, update, slices, aggregate):
        """Sums `slices` over replicas (concatenated) and runs `update`
        once, in cross-replica context, on the flat (ids, values) pairs."""
        context = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and context is not None:
            if aggregate:
                # Concatenates the slices of all replicas (duplicates stay).
                slices = context.all_reduce(tf.distribute.ReduceOp.SUM, slices)
            flat = [(s.indices, s.values) for s in slices]
            return context.merge_call(update, args=(flat,))
        flat = [(s.indices, s.values) for s in slices]
        return update(tf.distribute.get_strategy(), flat)

    def _apply_tables(self, table_grads, aggregate, count_step, two_pass):
        if _keras.in_xla_context():
            raise NotImplementedError(
                "ALPTOptimizer cannot update ALPT tables under XLA (unique, "
                "integer scatters and id checks are not XLA-safe). Compile "
                "with `jit_compile=False`. Received: an apply inside an "
                "XLA-compiled function."
            )
        tables = [table for table, _, _ in table_grads]
        slices = self._table_slices([(t, g) for t, g, _ in table_grads])
        carriers = [v for _, _, v in table_grads] if two_pass else None
        update = functools.partial(
            self._update_tables, tables, count_step, carriers, aggregate)
        return self._in_cross_replica(update, slices, aggregate)

    def _update_tables(self, tables, count_step, carriers, aggregate,
                       strategy, flat):
        """Cross-replica: computes every table's new rows once, writes them.

        Computing once and writing the same tensors to every copy keeps the
        replicas bit-identical even where a kernel (GPU segment sums) is not
        deterministic. In a two-pass step (`carriers`: the tables'
        gradient carriers), tables that learn Δ get their optimizer state
        and deterministically rounded codes `Q_D(w'; Δ)` now (what the
        second pass reads); their Δ and final codes wait for
        `apply_step_size_gradients`.
        """
        rows, finite = [], tf.constant(True)
        for table, (ids, values) in zip(tables, flat, strict=True):
            ids = strategy.experimental_local_results(ids)[0]
            values = strategy.experimental_local_results(values)[0]
            unique_ids, positions = tf.unique(ids)
            grads = tf.math.unsorted_segment_sum(
                values, positions, tf.shape(unique_ids)[0]
            )  # (U, D)
            unique_ids = self._checked_ids(table, unique_ids)
            finite = tf.logical_and(
                finite, tf.reduce_all(tf.math.is_finite(grads))
            )
            rows.append(dict(table=table, ids=ids, unique_ids=unique_ids,
                             positions=positions, grads=grads))
        step = tf.convert_to_tensor(self._table_iterations)
        writes, pending = [], []
        for row in rows:
            table = row["table"]
            row["slots"] = self._slots[self._tables.index(table)]
            writes.extend(self._row_step(row, step, finite))
            if carriers is not None and table.learn_step_size:
                fake_quantized = quantizers.quantize(
                    row["new_weights"], row["step_size"], table.num_bits,
                    "deterministic")
                writes.append(table.storage.write_rows(
                    row["unique_ids"],
                    tf.where(finite, fake_quantized, row["codes"])))
                row["carrier"] = carriers[tables.index(table)]
                pending.append(row)
            else:
                writes.extend(self._step_size_and_codes(
                    row, row["grads"], step, finite, finite))
        if pending:
            self._two_pass.pending = dict(
                rows=pending, finite=finite, step=step,
                count_step=count_step, aggregate=aggregate)
            return tf.group(writes)
        return self._count_step(writes, finite, count_step)

    def _checked_ids(self, table, unique_ids):
        in_range = tf.logical_and(
            tf.reduce_all(unique_ids >= 0),
            tf.reduce_all(unique_ids < table.input_dim),
        )
        check = tf.debugging.Assert(
            in_range,
            [
                f"ALPTOptimizer: row ids of table '{table.name}' must be "
                f"in [0, {table.input_dim}). Received ids:",
                unique_ids,
            ],
            summarize=10,
        )
        with tf.control_dependencies([check]):
            return tf.identity(unique_ids)

    def _count_step(self, writes, finite, count_step):
        with tf.control_dependencies(writes):
            applied = tf.cast(finite, tf.int64)
            ops = [
                # On the TF variables: an atomic AssignAddVariableOp, which
                # loses no step when parameter-server workers add at once
                # (Keras 3's own `assign_add` is a read-modify-write).
                _keras.tf_variable(self._table_iterations).assign_add(
                    applied),
                _keras.tf_variable(self._skipped_table_updates).assign_add(
                    1 - applied),
            ]
            if count_step:
                # No dense variable: the inner optimizer did not step, but
                # `iterations` still counts training steps (callbacks use it).
                ops.append(_keras.tf_variable(
                    self.inner_optimizer.iterations).assign_add(1))
        return tf.group(ops)

    def _slot_rows(self, row, name):
        return tf.nn.embedding_lookup(
            _keras.tf_variable(row["slots"][name]), row["unique_ids"])

    def _row_step(self, row, step, finite):
        """Step 2: the table optimizer on the touched rows. Fills `row`
        with `codes`, `step_size`, `new_weights`; returns the state writes.
        """
        table, ids, slots = row["table"], row["unique_ids"], row["slots"]
        codes = table.storage.read_rows(ids)  # (U, D) int32
        step_size = table.read_step_sizes(ids)  # (U, 1) or (1, 1)
        weights = quantizers.dequantize(codes, step_size)  # (U, D)
        t = tf.cast(step + 1, tf.float32)
        old_state = {name: self._slot_rows(row, name)
                     for name in ("accumulator", "m", "v") if name in slots}
        new_weights, new_state = self._embedding_step(
            weights, row["grads"], old_state, t, self._embedding_lr(),
        )
        row.update(codes=codes, step_size=step_size, new_weights=new_weights)
        return [
            _write_state(slots[name], ids, value, old_state[name], finite,
                         True)
            for name, value in new_state.items()
        ]

    def _step_size_and_codes(self, row, step_grads, step, finite,
                             step_finite):
        """Steps 3 and 4: learns Δ from `step_grads` (`g` in one pass, `ĝ`
        in two), then writes the codes `clip(R(w' / Δ'))`. Rows are written
        only if `finite`, Δ and its state only if `step_finite` too."""
        table, ids, slots = row["table"], row["unique_ids"], row["slots"]
        step_size, new_weights = row["step_size"], row["new_weights"]
        t = tf.cast(step + 1, tf.float32)
        new_step_size = step_size
        writes = []
        if table.learn_step_size:
            step_grad = quantizers.lsq_step_size_gradient(
                new_weights, step_size, step_grads, table.num_bits,
                table.num_shared,
            )  # (U, 1)
            if not table.per_row:
                step_grad = tf.reduce_sum(step_grad, axis=0, keepdims=True)
            old_step_state = {}
            for name in ("step_m", "step_v", "step_accumulator"):
                if name in slots:
                    if table.per_row:
                        old_step_state[name] = self._slot_rows(row, name)
                    else:
                        old_step_state[name] = tf.convert_to_tensor(
                            _keras.tf_variable(slots[name])
                        )
            new_step_size, new_step_state = self._step_size_step(
                step_size, step_grad, old_step_state, t,
                self._step_size_lr(table), step_grads, table.per_row,
            )
            new_step_size = tf.maximum(new_step_size, table.min_step_size)
            new_step_size = tf.where(step_finite, new_step_size, step_size)
            writes.append(table.write_step_sizes(ids, new_step_size))
            for name, value in new_step_state.items():
                writes.append(_write_state(
                    slots[name], ids, value, old_step_state[name],
                    step_finite, table.per_row))
        noise = None
        if table.rounding == "stochastic":
            noise = quantizers.hash_uniform(
                table.seed, table.salt, step, ids, table.output_dim
            )
        new_codes = quantizers.quantize(
            new_weights, new_step_size, table.num_bits, table.rounding, noise
        )
        # A non-finite step writes the old values back: bitwise unchanged.
        writes.append(table.storage.write_rows(
            ids, tf.where(finite, new_codes, row["codes"])))
        return writes

    # ---------------------------------------------------- two-pass steps
    @contextlib.contextmanager
    def two_pass_step(self):
        """Marks the `apply` inside as the first pass of a two-pass step.

        With `step_size_gradient="two_pass"`, that apply updates the dense
        variables and the touched rows' optimizer state, and writes
        `Q_D(w'; Δ)` (deterministic rounding, the old Δ) to the codes. Then
        run the second forward/backward pass on the same batch, in
        inference mode inside `alpt_keras.step_size_pass()` (so lookups
        still carry row gradients), and pass the gradients of
        `pending_carriers` to `apply_step_size_gradients`, which learns Δ
        and writes the final codes. `alpt_keras.TwoPassTrainStep` does all
        of this in `fit`; a custom loop:

        ```python
        with optimizer.two_pass_step():
            optimizer.apply_gradients(zip(grads, variables))
        carriers = optimizer.pending_carriers
        with tf.GradientTape() as tape, alpt_keras.step_size_pass():
            loss = loss_fn(y, model(x, training=False))
        optimizer.apply_step_size_gradients(
            tape.gradient(loss, carriers), carriers)
        ```
        """
        self._two_pass.active = True
        try:
            yield
        finally:
            self._two_pass.active = False

    @property
    def pending_carriers(self):
        """Gradient carriers of the tables waiting for a second pass (an
        empty list outside a two-pass step or when no table learns Δ)."""
        if self._two_pass.pending is None:
            return []
        return [row["carrier"] for row in self._two_pass.pending["rows"]]

    def discard_pending_step(self):
        """Forgets a first pass whose second pass will not run (e.g. its
        trace failed); the next step starts afresh."""
        self._two_pass.pending = None

    def apply_step_size_gradients(self, grads, carriers=None):
        """Finishes a two-pass step with the second pass's gradients.

        Args:
            grads: the gradients of the second-pass loss with respect to
                `carriers` (the `tf.IndexedSlices` that ALPTEmbedding
                produces), one per carrier.
            carriers: defaults to `pending_carriers`, in that order.
        """
        if self._two_pass.pending is None:
            raise RuntimeError(
                "ALPTOptimizer.apply_step_size_gradients: no two-pass step "
                "is waiting (apply the first pass inside `two_pass_step()` "
                "with step_size_gradient='two_pass'). Received: gradients "
                "with nothing pending.")
        pending = self._two_pass.pending["rows"]
        carriers = self.pending_carriers if carriers is None else carriers
        grads = list(grads)
        if len(grads) != len(carriers):
            raise ValueError(
                "`grads` must have one gradient per carrier "
                f"({len(carriers)}). Received: {len(grads)} gradients")
        by_table = {}
        for grad, carrier in zip(grads, carriers, strict=True):
            by_table[id(find_table(carrier))] = grad
        table_grads = []
        for row in pending:
            grad = by_table.get(id(row["table"]))
            if grad is None:
                raise ValueError(
                    f"The second pass gave no gradient for ALPT table "
                    f"'{row['table'].name}'; it must look up the same batch "
                    "as the first. Received: None")
            table_grads.append((row["table"], grad))
        slices = self._table_slices(table_grads)
        return self._in_cross_replica(
            self._finish_tables, slices, self._two_pass.pending["aggregate"])

    def _finish_tables(self, strategy, flat):
        state, self._two_pass.pending = self._two_pass.pending, None
        finite, step = state["finite"], state["step"]
        step_grads, step_finite = [], finite
        for row, (ids, values) in zip(state["rows"], flat, strict=True):
            ids = strategy.experimental_local_results(ids)[0]
            values = strategy.experimental_local_results(values)[0]
            first = row["ids"]
            same = tf.cond(
                tf.equal(tf.size(ids), tf.size(first)),
                lambda ids=ids, first=first: tf.reduce_all(
                    tf.equal(ids, first)),
                lambda: tf.constant(False),
            )
            check = tf.debugging.Assert(same, [
                f"ALPTOptimizer: the second pass must look up the same ids "
                f"as the first in table '{row['table'].name}'. Received ids:",
                ids], summarize=10)
            with tf.control_dependencies([check]):
                grads = tf.math.unsorted_segment_sum(
                    values, row["positions"], tf.shape(row["unique_ids"])[0])
            step_finite = tf.logical_and(
                step_finite, tf.reduce_all(tf.math.is_finite(grads)))
            step_grads.append(grads)
        writes = []
        for row, grads in zip(state["rows"], step_grads, strict=True):
            writes.extend(self._step_size_and_codes(
                row, grads, step, finite, step_finite))
        return self._count_step(writes, finite, state["count_step"])

    def _embedding_lr(self):
        if self.embedding_learning_rate is not None:
            return self.embedding_learning_rate
        return _DEFAULT_EMBEDDING_LR[self.embedding_optimizer]

    def _step_size_lr(self, table):
        if self.step_size_learning_rate is not None:
            return self.step_size_learning_rate
        return _DEFAULT_STEP_SIZE_LR[
            (self.step_size_optimizer, table.step_size_mode)
        ]

    def _embedding_step(self, w, g, state, t, lr):
        """Full-precision table-optimizer step on the touched rows."""
        kind = self.embedding_optimizer
        if kind == "sgd":
            return w - lr * g, {}
        if kind in ("rowwise_adagrad", "adagrad"):
            increment = tf.square(g)
            if kind == "rowwise_adagrad":
                increment = tf.reduce_mean(increment, axis=-1, keepdims=True)
            acc = state["accumulator"] + increment
            return w - lr * g / (tf.sqrt(acc) + self.epsilon), {
                "accumulator": _Sum(acc, increment)
            }
        m, v = self._adam_moments(state["m"], state["v"], g)
        return w - lr * self._adam_direction(m, v, t, self.epsilon), {
            "m": m,
            "v": v,
        }

    def _step_size_step(self, step_size, g, state, t, lr, row_grads,
                        per_row):
        kind = self.step_size_optimizer
        if kind == "sgd":
            return step_size - lr * g, {}
        if kind == "rowwise":
            # Scale by the rows' gradient RMS (Adagrad-style), not by Δ's own
            # gradient: continuous in g, so quantization noise in the LSQ
            # gradient does not become full-size sign steps.
            square = tf.square(row_grads)  # (U, D)
            if per_row:
                mean_square = tf.reduce_mean(square, axis=-1, keepdims=True)
            else:
                mean_square = tf.reshape(tf.reduce_mean(square), [1, 1])
            acc = state["step_accumulator"] + mean_square
            direction = g / (tf.sqrt(acc) + self.step_size_epsilon)
            # Relative: `lr` is a fraction of Δ, free of init scale and bits.
            return step_size * (1.0 - lr * direction), {
                "step_accumulator": _Sum(acc, mean_square)
            }
        if kind == "adagrad":
            acc = state["step_accumulator"] + tf.square(g)
            direction = g / (tf.sqrt(acc) + self.step_size_epsilon)
            return step_size - lr * direction, {
                "step_accumulator": _Sum(acc, tf.square(g))
            }
        m, v = self._adam_moments(state["step_m"], state["step_v"], g)
        direction = self._adam_direction(m, v, t, self.step_size_epsilon)
        return step_size - lr * direction, {"step_m": m, "step_v": v}

    def _adam_moments(self, m, v, g):
        m = self.beta_1 * m + (1.0 - self.beta_1) * g
        v = self.beta_2 * v + (1.0 - self.beta_2) * tf.square(g)
        return m, v

    def _adam_direction(self, m, v, t, epsilon):
        m_hat = m / (1.0 - tf.pow(self.beta_1, t))
        v_hat = v / (1.0 - tf.pow(self.beta_2, t))
        return m_hat / (tf.sqrt(v_hat) + epsilon)

    # ----------------------------------------------------- serialization
    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "embedding_optimizer": self.embedding_optimizer,
            "embedding_learning_rate": self.embedding_learning_rate,
            "step_size_optimizer": self.step_size_optimizer,
            "step_size_learning_rate": self.step_size_learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "step_size_epsilon": self.step_size_epsilon,
            "initial_accumulator_value": self.initial_accumulator_value,
            "step_size_gradient": self.step_size_gradient,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras's deserialize edits nested dicts in place: copy first.
        config = copy.deepcopy(config)
        inner = keras.optimizers.deserialize(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)
