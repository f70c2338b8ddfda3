"""`ALPTMonitor`: ALPT health figures in the Keras training logs."""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras, quantizers
from alpt_keras.table import tables

keras = _keras.keras


class ALPTMonitor(keras.callbacks.Callback):
    """Adds ALPT figures to the epoch logs (History, CSVLogger, TensorBoard).

    Over all tables: `alpt/step_size_mean` (mean Δ over every step size),
    `alpt/saturated` (share of all codes at either end of the range, i.e.
    clipped) and `alpt_skipped_table_updates` (steps whose table update was
    skipped because a table gradient was NaN/Inf). With `per_table=True`,
    also `<table>/step_size_mean`, `_min`, `_max` and `<table>/saturated`.

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
        skipped = getattr(self.model.optimizer, "skipped_table_updates", None)
        if skipped is not None:
            out["alpt_skipped_table_updates"] = float(
                np.array(tf.convert_to_tensor(skipped)))
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
            out["alpt/step_size_mean"] = float(
                np.concatenate(steps_all).mean())
            out["alpt/saturated"] = saturated / codes_count
        return out
