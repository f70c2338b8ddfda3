"""`ALPTMonitor`: ALPT health figures in the Keras training logs."""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras, quantizers
from alpt_keras.table import find_table

keras = _keras.keras


class ALPTMonitor(keras.callbacks.Callback):
    """Adds ALPT figures to the epoch logs (History, CSVLogger, TensorBoard).

    Per table `<name>`: `<name>/step_size_mean`, `<name>/step_size_min`,
    `<name>/step_size_max` and `<name>/saturated`, the share of codes at
    either end of the range (clipped). From the optimizer:
    `alpt_skipped_table_updates`, the steps whose table update was skipped
    because a table gradient was NaN/Inf.

    Reads whole tables, once per epoch (never per step).

    Example:

    >>> monitor = ALPTMonitor()
    >>> isinstance(monitor, keras.callbacks.Callback)
    True
    """

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
        seen = []
        for variable in self.model.trainable_variables:
            table = find_table(variable)
            if table is None or any(table is t for t in seen):
                continue
            seen.append(table)
            steps = np.array(tf.convert_to_tensor(
                _keras.tf_variable(table.step_size)))
            codes = table.storage.read_all().numpy()
            low, high = quantizers.code_range(table.num_bits)
            out[f"{table.name}/step_size_mean"] = float(steps.mean())
            out[f"{table.name}/step_size_min"] = float(steps.min())
            out[f"{table.name}/step_size_max"] = float(steps.max())
            out[f"{table.name}/saturated"] = float(
                np.mean((codes == low) | (codes == high)))
        return out
