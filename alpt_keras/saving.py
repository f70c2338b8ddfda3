"""`load_weights`: Keras's `model.load_weights`, all or nothing.

Keras assigns a weights file layer by layer, so a file that does not fit
(another `input_dim`, a table saved with more bits, a corrupted Δ) fails
part-way, with the earlier layers already overwritten. `load_weights`
keeps a copy of every model and optimizer variable and puts it back if
the load fails, so the model is either fully loaded or unchanged.
"""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras


def _variables(model):
    seen, out = set(), []
    optimizer = getattr(model, "optimizer", None)
    extra = list(optimizer.variables) if optimizer is not None and getattr(
        optimizer, "built", False) else []
    for variable in list(model.weights) + extra:
        if id(variable) not in seen:
            seen.add(id(variable))
            out.append(variable)
    return out


def load_weights(model, filepath, **kwargs):
    """Loads `filepath` into `model` like `model.load_weights`, but
    atomically: if loading raises, every model and optimizer variable is
    restored to its value before the call, and the error is re-raised.

    Holds one copy of the model's (and its optimizer's) variables in host
    memory while loading.

    Args:
        model: a built Keras model of the active flavour.
        filepath: str or path-like, any file `model.load_weights` takes.
        **kwargs: passed to `model.load_weights`.

    Returns:
        What `model.load_weights` returns.
    """
    variables = _variables(model)
    backup = [np.array(tf.convert_to_tensor(_keras.tf_variable(v)))
              for v in variables]
    try:
        return model.load_weights(filepath, **kwargs)
    except BaseException:
        for variable, value in zip(variables, backup, strict=True):
            _keras.tf_variable(variable).assign(value)
        raise
