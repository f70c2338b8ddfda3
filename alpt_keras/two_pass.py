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

import tensorflow as tf

from alpt_keras import _keras
from alpt_keras.optimizer import ALPTOptimizer
from alpt_keras.table import step_size_pass

keras = _keras.keras

__all__ = ["TwoPassTrainStep", "inference_loss", "two_pass",
           "two_pass_train_step"]


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
    if not isinstance(optimizer, ALPTOptimizer) or \
            optimizer.step_size_gradient != "two_pass":
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
