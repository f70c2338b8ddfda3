"""`ALPTOptimizer`: wraps a Keras optimizer and owns every ALPT table update.

The update math lives in `alpt_keras.update` (pure functions and rule
specs); this module is the Keras plumbing around it: slots, the
cross-replica aggregation, gathering the touched rows and scattering the
results.
"""

import copy
import dataclasses
import functools

import tensorflow as tf

from alpt_keras import _keras, kernels, update
from alpt_keras.kernels import check_mode
from alpt_keras.sharding import row_variables
from alpt_keras.storage import read_state_rows, write_state_rows
from alpt_keras.table import (
    checked_ids,
    find_table,
    register_optimizer,
    tables_of,
)
from alpt_keras.two_pass import (
    PendingStep,
    PendingTable,
    TwoPassOptimizerMixin,
    TwoPassState,
)
from alpt_keras.validation import check_choice

keras = _keras.keras

SUPPORTED_EMBEDDING_OPTIMIZERS = tuple(update.TABLE_RULES)
SUPPORTED_STEP_SIZE_OPTIMIZERS = tuple(update.STEP_SIZE_RULES)
SUPPORTED_STEP_SIZE_GRADIENTS = ("one_pass", "two_pass")


@_keras.register
class ALPTOptimizer(TwoPassOptimizerMixin, keras.optimizers.Optimizer):
    """Optimizer wrapper that trains `ALPTEmbedding` tables in low precision.

    Dense variables go to `inner_optimizer` unchanged (its learning-rate
    schedule, clipping and weight decay apply to them only). For every ALPT
    table, each step sums the row gradients of all replicas and of
    duplicate ids, then runs the pure step of `alpt_keras.update` on the
    touched rows only (never a `[V, D]` operation): the table optimizer
    (`w' = EmbOpt(Δ·ŵ, g)`), the step-size rule on Δ's LSQ gradient
    (skipped for `learn_step_size=False`), and the write-back
    `clip(R(w'/Δ'), -Q_N, Q_P)` with the layer's rounding. The rules, their
    state and defaults: README, "Choosing the optimizers". With
    `step_size_gradient="two_pass"` (the paper's exact step) Δ learns from
    a second forward/backward pass instead, which the model's train step
    runs (`alpt_keras.TwoPassTrainStep`, `alpt_keras.two_pass`).

    Updates are computed once, in cross-replica context, and written
    identically to every replica copy. A step is all or nothing: its
    checks (gradient shapes, table ownership, ids) come before any write,
    and if any gradient, dense or table, of any replica is NaN/Inf, every
    variable (dense weights, their slots, tables, `iterations`) stays
    bitwise unchanged and `skipped_steps` is incremented.

    Args:
        inner_optimizer: a Keras optimizer of the active flavour, for the
            dense variables.
        embedding_optimizer: str in `SUPPORTED_EMBEDDING_OPTIMIZERS`.
            Defaults to `"rowwise_adagrad"`.
        embedding_learning_rate: float > 0, or `None` for the rule's default.
        step_size_optimizer: str in `SUPPORTED_STEP_SIZE_OPTIMIZERS`.
            Defaults to `"rowwise"`.
        step_size_learning_rate: float > 0, or `None` for the rule's default
            (`"sgd"` has none).
        beta_1, beta_2: floats in [0, 1), Adam's decay rates.
        epsilon, step_size_epsilon: floats > 0, of the table optimizer and
            of the step-size rule.
        initial_accumulator_value: float >= 0, of the accumulators.
        step_size_gradient: `"one_pass"` (default) or `"two_pass"`.
        kernels: `"auto"` (default: the environment variable
            `ALPT_KERNELS`, else the native CPU kernels when they build),
            `"native"` (required) or `"stock"` (TensorFlow ops only). Both
            paths give bitwise the same tables; see `alpt_keras.kernels`.
        name: str.

    Example:

    >>> opt = ALPTOptimizer(keras.optimizers.Adam(1e-3))
    >>> opt.embedding_optimizer
    'rowwise_adagrad'

    References:
        - Li et al., "Learning Accurate Low-bit Embeddings for CTR
          Prediction via Adaptive Low-Precision Training", AAAI 2023.
    """

    def __init__(self, inner_optimizer, embedding_optimizer="rowwise_adagrad",
                 embedding_learning_rate=None, step_size_optimizer="rowwise",
                 step_size_learning_rate=None, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, step_size_epsilon=1e-12,
                 initial_accumulator_value=0.0,
                 step_size_gradient="one_pass", kernels="auto",
                 name="alpt_optimizer", **kwargs):
        if kwargs:
            raise TypeError(
                "ALPTOptimizer does not take these arguments: "
                f"{sorted(kwargs)}. Set clipping, weight decay and EMA on the "
                "`inner_optimizer` (they apply to the dense variables). "
                f"Received: {kwargs}")
        if isinstance(inner_optimizer, ALPTOptimizer):
            raise ValueError(
                "`inner_optimizer` must be a plain Keras optimizer, not "
                f"another ALPTOptimizer. Received: {inner_optimizer!r}")
        if not isinstance(inner_optimizer, _keras.optimizer_base_classes()):
            flavour = "Keras 3" if _keras.IS_KERAS_3 else "tf_keras"
            raise TypeError(
                "`inner_optimizer` must be an optimizer of the active Keras "
                f"flavour ({flavour}, `{keras.__name__}.optimizers`). "
                f"Received: {inner_optimizer!r}")
        if "LossScaleOptimizer" in type(inner_optimizer).__name__:
            raise NotImplementedError(
                "ALPTOptimizer cannot wrap a LossScaleOptimizer: the table "
                "gradients would stay scaled. Wrap it the other way, "
                "`keras.mixed_precision.LossScaleOptimizer(ALPTOptimizer("
                "...))`, which unscales every gradient (the tables' "
                "included) before ALPTOptimizer sees it. Received: "
                f"inner_optimizer={type(inner_optimizer).__name__}")
        config = update.UpdateConfig(
            embedding_optimizer, embedding_learning_rate,
            step_size_optimizer, step_size_learning_rate, beta_1, beta_2,
            epsilon, step_size_epsilon, initial_accumulator_value)
        check_choice("step_size_gradient", step_size_gradient,
                     SUPPORTED_STEP_SIZE_GRADIENTS)
        if _keras.IS_KERAS_3:
            super().__init__(learning_rate=0.0, name=name)
        else:
            super().__init__(name=name)
        self.inner_optimizer = inner_optimizer
        # The rules and constants (`update.UpdateConfig`); the arguments
        # read back as attributes (`embedding_optimizer`, `beta_1`, ...).
        self.update_config = config
        for field in dataclasses.fields(config):
            setattr(self, field.name, getattr(config, field.name))
        self.step_size_gradient = step_size_gradient
        self.kernels = check_mode(kernels)
        self._alpt_built = False
        self._tables = []
        self._slots = []
        self._two_pass = TwoPassState()
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
        return _keras.VariableList(
            list(self._variables) + list(self.inner_optimizer.variables))

    @property
    def table_iterations(self):
        """int64 variable: table steps applied (the noise and Adam step)."""
        return self._table_iterations

    @property
    def skipped_table_updates(self):
        """int64 variable: steps skipped whole because a gradient (dense or
        table, on any replica) was NaN/Inf. Kept under its first name (the
        variable is in saved files); `skipped_steps` is the same."""
        return self._skipped_table_updates

    @property
    def skipped_steps(self):
        """int64 variable: steps skipped whole (NaN/Inf gradients)."""
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

    # ------------------------------------------------------------- rules
    @property
    def embedding_hyperparameters(self):
        """`update.Hyperparameters` of the table optimizer."""
        return self.update_config.embedding_hyperparameters

    def step_size_hyperparameters(self, step_size_mode):
        """`update.Hyperparameters` of the step-size rule (`"row"` or
        `"table"` mode)."""
        return self.update_config.step_size_hyperparameters(step_size_mode)

    def state_bytes(self, spec):
        """Optimizer-state bytes of a table of `update.TableSpec` `spec`."""
        return self.update_config.state_bytes(spec)

    def table_slots(self, table):
        """Slot name -> optimizer variable of the ALPT `table` (a
        `TableState` this optimizer was built with)."""
        for known, slots in zip(self._tables, self._slots, strict=True):
            if known is table:
                return slots
        raise ValueError(
            f"The ALPT table '{table.name}' was not part of the variables "
            "this ALPTOptimizer was built with. Received: a gradient for it.")

    # ------------------------------------------------------------- build
    def build(self, var_list):
        if self._alpt_built:
            return
        var_list = list(var_list)
        self.inner_optimizer.build(
            [v for v in var_list if find_table(v) is None])
        add = functools.partial(_keras.add_optimizer_variable, self)
        self._table_iterations = add((), "int64", "table_iterations")
        self._skipped_table_updates = add(
            (), "int64", "skipped_table_updates")
        initial = {"zeros": "zeros", "accumulator":
                   keras.initializers.Constant(self.initial_accumulator_value)}
        for table in tables_of(var_list):
            spec, slots = table.spec, {}
            rules = [(self.update_config.table_rule, spec.input_dim)]
            if spec.learn_step_size:
                rules.append((self.update_config.step_size_rule,
                              spec.num_step_sizes))
            with row_variables(spec.input_dim):  # for RowPartitioner
                for rule, rows in rules:
                    for slot in rule.slots:
                        width = spec.output_dim if slot.per_element else 1
                        slots[slot.name] = add(
                            (rows, width), "float32",
                            f"{spec.name}_{slot.name}", initial[slot.initial])
            table.claim(self)
            self._tables.append(table)
            self._slots.append(slots)
        self._alpt_built = True
        if not _keras.IS_KERAS_3:
            self._built = True

    # ------------------------------------------------------------- apply
    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        """Applies dense gradients with the inner optimizer, rows here.

        Extra arguments go to the inner optimizer's `apply_gradients`;
        `skip_gradients_aggregation=True` (tf_keras) also skips the
        all-reduce of table gradients.
        """
        aggregate = not kwargs.get("skip_gradients_aggregation", False)
        aggregate = aggregate and kwargs.get(
            "experimental_aggregate_gradients", True)
        return self._apply(list(grads_and_vars), aggregate, args, kwargs)

    def apply(self, grads, trainable_variables=None):
        """Keras 3 entry point: `apply(grads, trainable_variables)`."""
        if trainable_variables is None:
            raise ValueError(
                "ALPTOptimizer.apply needs `trainable_variables`. "
                "Received: trainable_variables=None")
        return self._apply(
            list(zip(grads, trainable_variables, strict=True)), True, (), {})

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
            if grad is None:
                continue
            table = find_table(variable)
            if table is None:
                dense.append((grad, variable))
            else:
                table_grads.append((table, grad, variable))
        if not self._alpt_built:
            with tf.init_scope():
                self.build([v for _, v in grads_and_vars])
        two_pass = self.step_size_gradient == "two_pass" and any(
            table.spec.learn_step_size for table, _, _ in table_grads)
        self._two_pass.check_apply(two_pass)
        # Every check that can fail at trace time runs before anything is
        # written: a refused step changes nothing, `iterations` included.
        slices = self._table_slices([(t, g) for t, g, _ in table_grads])
        if table_grads:
            _keras.refuse_xla("ALPTOptimizer's table update")
        if not dense and not table_grads:
            return self.iterations
        tables = [table for table, _, _ in table_grads]
        carriers = [v for _, _, v in table_grads] if two_pass else None
        step = functools.partial(
            self._step, [v for _, v in dense], tables, carriers, aggregate,
            args, kwargs)
        return self._in_cross_replica(
            step, slices, aggregate, [g for g, _ in dense])

    def _table_slices(self, table_grads):
        """Checks table gradients; returns them as float32/int64 slices."""
        slices = []
        for table, grad in table_grads:
            if table.claimed_by is None or table.claimed_by() is not self:
                self.table_slots(table)  # raises: not built with it
            if not isinstance(grad, tf.IndexedSlices):
                raise TypeError(
                    f"The gradient of ALPT table '{table.name}' must be the "
                    "`tf.IndexedSlices` produced by ALPTEmbedding. Received: "
                    f"{type(grad).__name__}")
            ids, values = grad.indices, grad.values
            width = table.spec.output_dim
            if (ids.shape.rank not in (None, 1)
                    or values.shape.rank not in (None, 2)
                    or values.shape[-1] not in (None, width)
                    or not ids.shape[:1].is_compatible_with(
                        values.shape[:1])):
                raise ValueError(
                    f"The gradient of ALPT table '{table.name}' must hold "
                    f"ids [N] and row gradients [N, {width}]. Received: "
                    f"indices of shape {ids.shape}, values of shape "
                    f"{values.shape}")
            if not ids.dtype.is_integer:
                raise TypeError(
                    f"The gradient of ALPT table '{table.name}' must have "
                    f"integer indices. Received: {ids.dtype.name}")
            slices.append(tf.IndexedSlices(
                tf.cast(values, tf.float32), tf.cast(ids, tf.int64),
                grad.dense_shape))
        return slices

    def _in_cross_replica(self, fn, slices, aggregate, dense_grads=()):
        """Sums `slices` over replicas (concatenated), counts the
        non-finite dense gradient entries of every replica, and runs `fn` once,
        in cross-replica context, on `(strategy, bad, dense_grads, flat)`:
        `bad` the count, `flat` the (ids, values) pairs."""
        # Table gradients are checked once summed (`_sum_table_gradients`,
        # on every replica's rows); here only the dense ones.
        bad = _non_finite_count(dense_grads)
        context = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and context is not None:
            if aggregate:
                # Concatenates the slices of all replicas (duplicates stay);
                # every replica then sees the same count.
                bad, slices = context.all_reduce(
                    tf.distribute.ReduceOp.SUM, (bad, slices))
            flat = [(s.indices, s.values) for s in slices]
            return context.merge_call(
                fn, args=(bad, list(dense_grads), flat))
        flat = [(s.indices, s.values) for s in slices]
        return fn(tf.distribute.get_strategy(), bad, list(dense_grads), flat)

    def _step(self, dense_vars, tables, carriers, aggregate, args, kwargs,
              strategy, bad, dense_grads, flat):
        """Cross-replica: the whole step, or nothing.

        Sums each table's row gradients and checks its ids first; then, if
        no gradient of any replica is NaN/Inf, applies the inner optimizer
        to the dense variables (on every replica) and writes the tables.
        Otherwise every variable but the skip counter stays bitwise
        unchanged.
        """
        bad = tf.add_n(strategy.experimental_local_results(bad))
        library = self._kernel_library(strategy) if tables else None
        touched, finite = self._sum_table_gradients(tables, flat, library,
                                                    strategy)
        # The id checks (asserts) gate the decision, hence every write.
        with tf.control_dependencies([ids for _, _, ids, _, _ in touched]):
            finite = tf.logical_and(finite, tf.equal(bad, 0))
        writes = []
        if dense_vars:
            writes.append(tf.cond(
                finite,
                functools.partial(self._apply_dense, strategy, dense_grads,
                                  dense_vars, args, kwargs),
                lambda: tf.constant(False)))
        if touched:
            return self._update_tables(touched, writes, finite, carriers,
                                       aggregate, not dense_vars, library,
                                       strategy)
        return self._count_step(writes, finite, False)

    def _apply_dense(self, strategy, dense_grads, dense_vars, args, kwargs):
        """The inner optimizer's step on every replica (inside the
        step's condition, hence from cross-replica context: a
        synchronisation point may not sit in a replica's control flow)."""
        def apply(grads):
            self.inner_optimizer.apply_gradients(
                list(zip(grads, dense_vars, strict=True)), *args, **kwargs)

        if tf.distribute.has_strategy():
            strategy.extended.call_for_each_replica(apply, args=(dense_grads,))
        else:
            apply(dense_grads)
        return tf.constant(True)

    def _sum_table_gradients(self, tables, flat, library, strategy):
        """Per table: the unique ids (checked against the table), the
        row gradients summed per unique id, and whether all are finite."""
        touched, finite = [], tf.constant(True)
        for table, (ids, values) in zip(tables, flat, strict=True):
            ids = strategy.experimental_local_results(ids)[0]
            values = strategy.experimental_local_results(values)[0]
            if library is not None:  # one pass, bitwise the stock ops'
                unique_ids, positions, grads = kernels.unique_segment_sum(
                    library, ids, values)
            else:
                unique_ids, positions = tf.unique(ids)
                grads = tf.math.unsorted_segment_sum(
                    values, positions, tf.shape(unique_ids)[0])  # (U, D)
            unique_ids = checked_ids(unique_ids, table.spec.input_dim,
                                     table.name)
            finite = tf.logical_and(
                finite, tf.reduce_all(tf.math.is_finite(grads)))
            touched.append((table, ids, unique_ids, positions, grads))
        return touched, finite

    @tf.autograph.experimental.do_not_convert  # Python only: build, load
    def _kernel_library(self, strategy):
        """The native kernels' op library for this step, or `None` (the
        stock ops): see `alpt_keras.kernels`."""
        if kernels.resolve(self.kernels) == "stock" or \
                not kernels.usable_here(strategy):
            return None
        return kernels.load(self.kernels)

    def _update_tables(self, touched, writes, finite, carriers, aggregate,
                       count_step, library, strategy):
        """Cross-replica: computes every table's new rows once, writes them.

        Computing once and writing the same tensors to every copy keeps the
        replicas bit-identical even where a kernel (GPU segment sums) is not
        deterministic. In a two-pass step (`carriers`), tables that learn Δ
        get their optimizer state and the codes `Q_D(w'; Δ)` now (what the
        second pass reads); their Δ and final codes wait for
        `apply_step_size_gradients`.

        With the native kernels, a table the fused step supports
        (`kernels.fused_step_supported`) is read, updated and written in
        place by one op per copy, bitwise the same.
        """
        step = tf.convert_to_tensor(self._table_iterations)
        pending = []
        for i, (table, ids, unique_ids, positions, grads) in enumerate(
                touched):
            slots = self.table_slots(table)
            if library is not None and kernels.fused_step_supported(
                    table, self.update_config, carriers is not None):
                ops = kernels.fused_table_step(
                    library, strategy, table, slots, unique_ids, grads,
                    step, finite, self.update_config,
                    self.step_size_hyperparameters(table.spec.step_size_mode))
                if ops is not None:
                    writes += ops
                    continue
            codes = table.storage.read_rows(unique_ids)  # (U, D) int32
            step_size = table.read_step_sizes(unique_ids)  # (U|T, 1)
            location = update.locate(table.spec, unique_ids)
            old = {s.name: read_state_rows(slots[s.name], unique_ids, True)
                   for s in self.update_config.table_rule.slots}
            rows = update.row_update(
                codes, update.row_step_sizes(step_size, table.spec, location),
                grads, old, step, self.update_config.table_rule,
                self.embedding_hyperparameters)
            writes += [write_state_rows(slots[name], unique_ids, value,
                                    old[name], True, finite)
                       for name, value in rows.state.items()]
            first = PendingTable(
                table, None if carriers is None else carriers[i], slots,
                ids, unique_ids, positions, codes, step_size,
                rows.new_weights)
            if carriers is not None and table.spec.learn_step_size:
                fake = update.requantize(
                    rows.new_weights,
                    update.row_step_sizes(step_size, table.spec, location),
                    unique_ids, step, table.spec, rounding="deterministic",
                    location=location)
                writes.append(table.storage.write_rows(
                    unique_ids, tf.where(finite, fake, codes)))
                pending.append(first)
            else:
                writes += self._step_size_and_codes(first, grads, step,
                                                    finite, finite)
        if pending:
            self._two_pass.pending = PendingStep(
                pending, finite, step, count_step, aggregate)
            return tf.group(writes)
        return self._count_step(writes, finite, count_step)

    def _step_size_and_codes(self, first, grads, step, finite, step_finite):
        """Learns Δ from `grads` (`g` in one pass, `ĝ` in two), then writes
        the codes `clip(R(w'/Δ'))`. Rows are written only if `finite`, Δ
        and its state only if `step_finite` too."""
        table, slots, ids = first.table, first.slots, first.unique_ids
        spec = table.spec
        rule = self.update_config.step_size_rule if spec.learn_step_size \
            else None
        old = {} if rule is None else {
            s.name: read_state_rows(slots[s.name], ids, spec.per_row)
            for s in rule.slots}
        result = update.step_size_update(
            first.new_weights, first.step_size, grads, old, step, ids, spec,
            rule, self.step_size_hyperparameters(spec.step_size_mode),
            update_step_size=step_finite)
        writes = []
        if rule is not None:
            writes.append(table.write_step_sizes(ids, result.step_size))
            writes += [write_state_rows(slots[name], ids, value, None,
                                    spec.per_row)
                       for name, value in result.state.items()]
        # A non-finite step writes the old values back: bitwise unchanged.
        writes.append(table.storage.write_rows(
            ids, tf.where(finite, result.codes, first.codes)))
        return writes

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
                # `iterations` still counts applied steps (callbacks use it).
                ops.append(_keras.tf_variable(
                    self.inner_optimizer.iterations).assign_add(applied))
        return tf.group(ops)

    # ----------------------------------------------------- serialization
    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            **dataclasses.asdict(self.update_config),
            "step_size_gradient": self.step_size_gradient,
            "kernels": self.kernels,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Keras's deserialize edits nested dicts in place: copy first.
        config = copy.deepcopy(config)
        inner = keras.optimizers.deserialize(
            config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _non_finite_count(grads):
    """float32 scalar: how many entries of `grads` (tensors or
    `tf.IndexedSlices`) are NaN/Inf. Float, so it all-reduces in one batch
    with the gradients (int32 tensors live in host memory); only `== 0`
    is ever read."""
    counts = [tf.constant(0.0, tf.float32)]
    for grad in grads:
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        values = tf.convert_to_tensor(values)
        if values.dtype.is_floating:
            counts.append(tf.reduce_sum(tf.cast(
                tf.logical_not(tf.math.is_finite(values)), tf.float32)))
    return tf.add_n(counts)
