"""Callbacks: `ALPTMonitor` (ALPT health figures in the Keras training
logs) and `StopOnSkippedSteps` (a run whose steps keep being skipped for
NaN/Inf gradients stops with a clear error)."""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras, quantizers
from alpt_keras.table import tables

keras = _keras.keras


def _is_loss_scale_optimizer(optimizer):
    # Both flavours' classes (tf_keras names several variants).
    return "LossScaleOptimizer" in type(optimizer).__name__


def alpt_optimizer(optimizer):
    """`optimizer`, or the ALPTOptimizer inside a `LossScaleOptimizer`
    (mixed float16 wraps it: `LossScaleOptimizer(ALPTOptimizer(...))`)."""
    if _is_loss_scale_optimizer(optimizer):
        return getattr(optimizer, "inner_optimizer", optimizer)
    return optimizer


class ALPTMonitor(keras.callbacks.Callback):
    """Adds ALPT figures to the epoch logs (History, CSVLogger, TensorBoard).

    Over all tables: `alpt/step_size_mean`, `_min` and `_max` (over every
    step size Δ), `alpt/saturated` (share of all codes at either end of
    the range, i.e. clipped) and `alpt_skipped_steps` (steps
    `ALPTOptimizer` skipped whole because a gradient was NaN/Inf; also
    logged under its first name, `alpt_skipped_table_updates`). With
    `per_table=True`, also `<table>/step_size_mean`, `_min`, `_max` and
    `<table>/saturated`.

    Reads whole tables, once per epoch (never per step).

    Args:
        per_table: bool. Log every table's figures too. Defaults to `False`.

    Example:

    >>> monitor = ALPTMonitor(per_table=True)
    >>> isinstance(monitor, keras.callbacks.Callback)
    True
    """

    def __init__(self, per_table=False):
        super().__init__()
        self.per_table = per_table

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs.update(self.stats())

    def stats(self):
        """The figures as a dict of Python floats."""
        out = {}
        skipped = getattr(alpt_optimizer(self.model.optimizer),
                          "skipped_table_updates", None)
        if skipped is not None:
            out["alpt_skipped_steps"] = float(
                np.array(tf.convert_to_tensor(skipped)))
            out["alpt_skipped_table_updates"] = out["alpt_skipped_steps"]
        seen, steps_all, saturated, codes_count = [], [], 0, 0
        for table in tables(self.model):
            seen.append(table)
            steps = np.array(tf.convert_to_tensor(
                _keras.tf_variable(table.step_sizes)))
            codes = table.storage.read_all().numpy()
            low, high = quantizers.code_range(table.spec.num_bits)
            clipped = int(np.sum((codes == low) | (codes == high)))
            steps_all.append(steps.ravel())
            saturated += clipped
            codes_count += codes.size
            if self.per_table:
                out[f"{table.name}/step_size_mean"] = float(steps.mean())
                out[f"{table.name}/step_size_min"] = float(steps.min())
                out[f"{table.name}/step_size_max"] = float(steps.max())
                out[f"{table.name}/saturated"] = clipped / codes.size
        if seen:
            steps_all = np.concatenate(steps_all)
            out["alpt/step_size_mean"] = float(steps_all.mean())
            out["alpt/step_size_min"] = float(steps_all.min())
            out["alpt/step_size_max"] = float(steps_all.max())
            out["alpt/saturated"] = saturated / codes_count
        return out


class NonFiniteStepsError(RuntimeError):
    """Raised by `StopOnSkippedSteps`: too many consecutive training steps
    were skipped for NaN/Inf gradients."""


class StopOnSkippedSteps(keras.callbacks.Callback):
    """Stops `fit` with `NonFiniteStepsError` after `max_consecutive`
    consecutive steps skipped for NaN/Inf gradients.

    `ALPTOptimizer` skips such a step whole (no variable changes), so a
    few bad batches cost nothing; but a run whose every step is skipped
    (NaN labels throughout, a diverged loss) would otherwise "train" to the
    end without learning. The weights stay those of the last applied step,
    and the error leaves `BackupAndRestore`'s backup in place.

    Under mixed float16 (`LossScaleOptimizer(ALPTOptimizer(...))`) the
    loss-scale optimizer skips non-finite steps itself, before
    `ALPTOptimizer` sees them, and halves its dynamic loss scale each time:
    each halving counts as a skipped step. A few halvings at the start are
    the loss scale settling (from Keras's initial 2^15); a run whose data
    hold NaN halves it at every step and is stopped here.

    Reads two counters (and the loss scale) per batch. With
    `steps_per_execution > 1` a window that applied any step, and halved no
    loss scale, resets the count.

    Args:
        max_consecutive: int >= 1. Defaults to 10.
        per_epoch: bool. Check at epoch ends only: for
            `ParameterServerStrategy`, where tf_keras refuses batch-level
            callbacks; an epoch that applied any step then resets the
            count. Defaults to `False`.

    Example:

    >>> guard = StopOnSkippedSteps(max_consecutive=5)
    >>> guard.max_consecutive
    5
    """

    def __init__(self, max_consecutive=10, per_epoch=False):
        super().__init__()
        self.per_epoch = bool(per_epoch)
        if self.per_epoch:
            # The base class's no-op hook, so Keras sees no batch hook.
            self.on_train_batch_end = keras.callbacks.Callback.\
                on_train_batch_end.__get__(self)
        if isinstance(max_consecutive, bool) or not isinstance(
                max_consecutive, int) or max_consecutive < 1:
            raise ValueError("`max_consecutive` must be an int >= 1. "
                             f"Received: max_consecutive={max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self._last = None
        self._scale = None

    def _loss_scale(self):
        """The current dynamic loss scale of a `LossScaleOptimizer`
        (Keras 3: `dynamic_scale` once built, else `initial_scale`;
        tf_keras: `loss_scale`), or `None` without one."""
        optimizer = self.model.optimizer
        if not _is_loss_scale_optimizer(optimizer):
            return None
        if _keras.IS_KERAS_3:  # `initial_scale` until its first apply
            scale = getattr(optimizer, "dynamic_scale", None)
            if scale is None:
                scale = getattr(optimizer, "initial_scale", None)
        else:
            scale = getattr(optimizer, "loss_scale", None)
        if scale is None:
            return None
        return float(np.array(tf.convert_to_tensor(scale)))

    def _counters(self):
        """(skipped steps, applied steps); (0, 0) before the optimizer is
        built (its first apply builds it)."""
        optimizer = alpt_optimizer(self.model.optimizer)
        if not hasattr(type(optimizer), "skipped_steps"):
            raise TypeError(
                "StopOnSkippedSteps needs an ALPTOptimizer (which skips "
                "non-finite steps and counts them). Received: optimizer of "
                f"type {type(optimizer).__name__}")
        if not optimizer.built:
            return 0, 0
        return (int(np.array(tf.convert_to_tensor(optimizer.skipped_steps))),
                int(np.array(tf.convert_to_tensor(optimizer.iterations))))

    def on_train_begin(self, logs=None):
        self.consecutive = 0
        self._last = self._counters()
        self._scale = self._loss_scale()

    def on_epoch_end(self, epoch, logs=None):
        if self.per_epoch:
            self._check(f"epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        self._check(f"batch {batch}")

    def _check(self, where):
        skipped, applied = self._counters()
        new_skipped = skipped - self._last[0]
        scale, last_scale = self._loss_scale(), self._scale
        # Steps the loss-scale optimizer skipped: one halving each. (tf_keras
        # still counts them in `iterations`, Keras 3 does not.)
        halvings = 0
        if scale is not None and last_scale is not None and \
                0 < scale < last_scale:
            halvings = max(1, round(float(np.log2(last_scale / scale))))
        if halvings:
            self.consecutive += halvings + new_skipped
        elif applied != self._last[1]:
            self.consecutive = 0
        else:
            self.consecutive += new_skipped
        self._last = (skipped, applied)
        self._scale = scale
        if self.consecutive >= self.max_consecutive:
            scaling = "" if scale is None else (
                f" (loss scaling skipped them too: its scale is now {scale:g})")
            raise NonFiniteStepsError(
                f"{self.consecutive} consecutive training steps were "
                "skipped because their gradients held NaN/Inf (last in "
                f"{where}){scaling}; the weights are those of the last "
                "applied step. Check the labels and inputs for NaN/Inf, or "
                "lower the learning rate; a loss scale that only needs "
                "more steps to settle (a high `initial_scale`) needs a "
                "larger `max_consecutive`.")
