"""The paper-exact two-pass ALPT step, as a train-step hook for `fit`.

ALPT (Li et al., AAAI 2023, Algorithm 1) learns the step size Δ from a
second forward/backward pass on the same batch, run after the rows and the
dense variables were updated, with the touched rows fake-quantized at
`Q_D(w'; Δ)`. An optimizer cannot run a forward pass, so the model's train
step does, in three parts:

1. the model's own train step (pass 1), inside
   `optimizer.two_pass_step()`: the ALPTOptimizer updates the dense
   variables and the touched rows, and writes `Q_D(w'; Δ)` to the codes;
2. the same batch in inference mode (no BatchNorm statistic updates, no
   dropout) under `step_size_pass()`, so lookups still return row
   gradients; metric variables are put back as they were afterwards;
3. `optimizer.apply_step_size_gradients`: Δ learns from the second pass's
   row gradients and the final codes `clip(R(w' / Δ'))` are written.

With `step_size_gradient="one_pass"` (the default) the hook is a plain
train step, so models built with it train either way.
"""

import contextlib
import threading
from typing import NamedTuple

import tensorflow as tf

from alpt_keras import _keras
from alpt_keras._scopes import current, scoped
from alpt_keras.table import fail_check, find_table

keras = _keras.keras

__all__ = ["PendingStep", "PendingTable", "TwoPassOptimizerMixin",
           "TwoPassState", "TwoPassTrainStep",
           "in_step_size_pass", "inference_loss", "step_size_pass",
           "two_pass", "two_pass_train_step"]


def step_size_pass():
    """Inside, inference-mode lookups (`training=False`) still carry their
    row gradients: the second pass of a two-pass ALPT step runs the model
    in inference mode but needs `∂L/∂e` for the step sizes.

    Thread-local, since it must reach `ALPTEmbedding.call` through the
    user's model code, which takes no extra argument.
    """
    return scoped("step_size_pass", True)


def in_step_size_pass():
    return bool(current("step_size_pass"))


class PendingTable(NamedTuple):
    """One table's rows after the row update: what the step-size half of
    the step needs. A two-pass step keeps it between its passes (waiting
    for the second pass's gradients); a one-pass step uses it at once.

    Attributes:
        table: `TableState`.
        carrier: the table's gradient-carrier variable.
        slots: dict slot name -> the optimizer's state variable.
        ids: int64 `[N]`, the ids the first pass looked up (all replicas).
        unique_ids: int64 `[U]`, their unique values (the touched rows).
        positions: int `[N]`, index of each id in `unique_ids`.
        codes: int32 `[U, D]`, the codes before the step.
        step_size: float32, Δ of the touched rows before the step.
        new_weights: float32 `[U, D]`, `w'` from the row update.
    """

    table: object
    carrier: object
    slots: dict
    ids: tf.Tensor
    unique_ids: tf.Tensor
    positions: tf.Tensor
    codes: tf.Tensor
    step_size: tf.Tensor
    new_weights: tf.Tensor


class PendingStep(NamedTuple):
    """A first pass's rows and flags, built in cross-replica context."""

    tables: list
    finite: tf.Tensor
    step: tf.Tensor
    count_step: bool
    aggregate: bool


class TwoPassState:
    """An optimizer's two-pass bookkeeping between the passes of one
    traced train step. A plain object, so Keras's attribute tracking never
    adopts the carriers and tensors kept here as optimizer variables.

    - `active`: inside `optimizer.two_pass_step()`. Thread-local: Keras's
      train step calls `apply_gradients` without a way to pass a flag, and
      MirroredStrategy runs each replica's step in its own thread.
    - `pending`: the `PendingStep` of the first pass, or `None` (set and
      read in cross-replica context, so an explicit attribute).
    """

    def __init__(self):
        self._local = threading.local()
        self.pending = None

    @property
    def active(self):
        return getattr(self._local, "active", False)

    @active.setter
    def active(self, value):
        self._local.active = value

    def check_apply(self, two_pass):
        """Raises unless an apply may run now; `two_pass`: whether it is
        the first pass of a two-pass step (some table learns Δ)."""
        if two_pass and not self.active:
            raise RuntimeError(
                "ALPTOptimizer(step_size_gradient='two_pass') learns step "
                "sizes from a second forward/backward pass that an optimizer "
                "cannot run. Train with a model whose train step runs it: "
                "subclass `alpt_keras.TwoPassTrainStep` (Keras models and "
                "tfrs.Model) or call `alpt_keras.two_pass(model)` before "
                "`fit` (functional models); in a custom loop, apply inside "
                "`optimizer.two_pass_step()` and then call "
                "`optimizer.apply_step_size_gradients`. Received: an apply "
                "outside a two-pass train step.")
        if self.pending is not None:
            raise RuntimeError(
                "ALPTOptimizer: the previous two-pass step is still waiting "
                "for its second-pass gradients "
                "(`apply_step_size_gradients`). Received: another apply.")



class TwoPassOptimizerMixin:
    """The two-pass API of `ALPTOptimizer` (its second half of a step).

    The host optimizer provides `_two_pass` (a `TwoPassState`) and the
    steps shared with one-pass training: `_table_slices`,
    `_in_cross_replica`, `_step_size_and_codes` and `_count_step`.
    """

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
        return [first.carrier for first in self._two_pass.pending.tables]

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
        pending = self._two_pass.pending
        if pending is None:
            raise RuntimeError(
                "ALPTOptimizer.apply_step_size_gradients: no two-pass step "
                "is waiting (apply the first pass inside `two_pass_step()` "
                "with step_size_gradient='two_pass'). Received: gradients "
                "with nothing pending.")
        carriers = self.pending_carriers if carriers is None else carriers
        grads = list(grads)
        if len(grads) != len(carriers):
            raise ValueError(
                "`grads` must have one gradient per carrier "
                f"({len(carriers)}). Received: {len(grads)} gradients")
        by_table = {id(find_table(carrier)): grad
                    for grad, carrier in zip(grads, carriers, strict=True)}
        table_grads = []
        for first in pending.tables:
            grad = by_table.get(id(first.table))
            if grad is None:
                raise ValueError(
                    f"The second pass gave no gradient for ALPT table "
                    f"'{first.table.name}'; it must look up the same batch "
                    "as the first. Received: None")
            table_grads.append((first.table, grad))
        return self._in_cross_replica(
            self._finish_tables, self._table_slices(table_grads),
            pending.aggregate)

    def _finish_tables(self, strategy, bad, dense_grads, flat):
        del dense_grads  # the second pass has table gradients only
        state, self._two_pass.pending = self._two_pass.pending, None
        bad = tf.add_n(strategy.experimental_local_results(bad))
        step_grads = []
        step_finite = tf.logical_and(state.finite, tf.equal(bad, 0))
        for first, (ids, values) in zip(state.tables, flat, strict=True):
            ids = strategy.experimental_local_results(ids)[0]
            values = strategy.experimental_local_results(values)[0]
            same = tf.cond(
                tf.equal(tf.size(ids), tf.size(first.ids)),
                lambda ids=ids, first=first: tf.reduce_all(
                    tf.equal(ids, first.ids)),
                lambda: tf.constant(False))
            check = fail_check([
                f"ALPTOptimizer: the second pass must look up the same ids "
                f"as the first in table '{first.table.name}'. Received ids:",
                ids], condition=same)
            with tf.control_dependencies([check]):
                grads = tf.math.unsorted_segment_sum(
                    values, first.positions, tf.shape(first.unique_ids)[0])
            step_finite = tf.logical_and(
                step_finite, tf.reduce_all(tf.math.is_finite(grads)))
            step_grads.append(grads)
        writes = []
        for first, grads in zip(state.tables, step_grads, strict=True):
            writes += self._step_size_and_codes(
                first, grads, state.step, state.finite, step_finite)
        return self._count_step(writes, state.finite, state.count_step)


def _is_tfrs_model(model):
    return any(
        cls.__module__.startswith("tensorflow_recommenders")
        for cls in type(model).__mro__
    )


def inference_loss(model, data):
    """The loss the model trains on, computed on `data` in inference mode.

    `tfrs.Model`: `compute_loss(data, training=False)` plus regularization
    losses, as its `train_step` sums them. Other Keras models: the compiled
    loss of `model(x, training=False)` (plus `model.losses`).
    """
    if _is_tfrs_model(model):
        loss = model.compute_loss(data, training=False)
        regularization = [tf.reduce_sum(term) for term in model.losses]
        return loss + tf.reduce_sum(regularization)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = model(x, training=False)
    if _keras.IS_KERAS_3:
        return model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=False,
        )
    return model.compute_loss(x, y, y_pred, sample_weight)


def _metric_variables(model):
    variables, seen = [], set()
    for metric in model.metrics:
        for variable in metric.variables:
            variable = _keras.tf_variable(variable)
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables


def two_pass_train_step(model, data, train_step, loss_fn=None):
    """Runs `train_step(data)`, then the second pass of a two-pass step.

    Args:
        model: the Keras model (or `tfrs.Model`) being trained; its
            optimizer decides: only an `ALPTOptimizer` with
            `step_size_gradient="two_pass"` gets a second pass.
        data: the batch, as `fit` gives it to `train_step`.
        train_step: the model's own train step (pass 1).
        loss_fn: `loss_fn(model, data)`, the second pass's loss; defaults
            to `inference_loss`. Pass your own when a custom `train_step`
            computes its loss some other way.

    Returns:
        The logs of `train_step`: metrics come from the first pass only.
    """
    optimizer = getattr(model, "optimizer", None)
    # By attribute, not class: the optimizer module imports this one.
    if getattr(optimizer, "step_size_gradient", None) != "two_pass":
        return train_step(data)
    try:
        with optimizer.two_pass_step():
            logs = train_step(data)
        carriers = optimizer.pending_carriers
        if not carriers:  # No table learns Δ (LPT): a one-pass step.
            return logs
        return _second_pass(model, data, optimizer, carriers, loss_fn,
                            logs)
    except BaseException:
        optimizer.discard_pending_step()  # a failed trace leaves none
        raise


def _second_pass(model, data, optimizer, carriers, loss_fn, logs):
    loss_fn = inference_loss if loss_fn is None else loss_fn
    metric_variables = _metric_variables(model)
    # Read before pass 2 updates any of them (automatic control
    # dependencies keep the program order of accesses to one variable).
    saved = [tf.identity(variable.read_value())
             for variable in metric_variables]
    with tf.GradientTape(watch_accessed_variables=False) as tape, \
            step_size_pass():
        tape.watch([_keras.tf_variable(c) for c in carriers])
        loss = loss_fn(model, data)
    grads = tape.gradient(loss, [_keras.tf_variable(c) for c in carriers])
    update = optimizer.apply_step_size_gradients(grads, carriers)
    with tf.control_dependencies([update]):
        for variable, value in zip(metric_variables, saved, strict=True):
            variable.assign(value)
    return logs


class TwoPassTrainStep:
    """Mixin giving a model the two-pass ALPT train step.

    Put it first in the bases of a `keras.Model` or `tfrs.Model` subclass:

    ```python
    class Ranker(alpt_keras.TwoPassTrainStep, tfrs.Model):
        ...

    model.compile(optimizer=alpt_keras.ALPTOptimizer(
        keras.optimizers.Adam(), step_size_gradient="two_pass"))
    ```

    Override `step_size_loss(data)` if the second pass should compute its
    loss differently from `inference_loss`.
    """

    def train_step(self, data):
        return two_pass_train_step(
            self, data, super().train_step, type(self).step_size_loss)

    def step_size_loss(self, data):
        """The second pass's loss (inference mode); see `inference_loss`."""
        return inference_loss(self, data)


def two_pass(model, loss_fn=None):
    """Gives an existing model (e.g. a functional one) the two-pass step.

    Wraps the instance's `train_step`; call it before `fit` (after
    `compile` is fine). The wrapper is not saved: call it again on a model
    loaded from a file before training it further. Returns `model`.
    """
    if getattr(model.train_step, "_alpt_two_pass", False):
        return model
    train_step = model.train_step

    def step(data):
        return two_pass_train_step(model, data, train_step, loss_fn)

    step._alpt_two_pass = True
    model.train_step = step
    if getattr(model, "train_function", None) is not None:
        model.train_function = None  # rebuilt with the new step
    return model
