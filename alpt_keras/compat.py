"""The active Keras flavour and the helpers that depend on it, for code
above the core (models, export, the CLI, benchmarks, user code).

`keras` is Keras 3 or tf_keras, whichever `tf.keras` resolved to when
TensorFlow was imported (`TF_USE_LEGACY_KERAS=1` selects tf_keras, which
TFRS needs); `IS_KERAS_3` says which. The private `alpt_keras._keras`
implements these; import them from here.
"""

from alpt_keras._keras import (
    IS_KERAS_3,
    flatten_layers,
    keras,
    output_shape,
    register,
    tf_variable,
)

__all__ = ["IS_KERAS_3", "flatten_layers", "keras", "output_shape",
           "register", "tf_variable"]
