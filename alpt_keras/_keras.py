"""The one place that picks Keras 3 or tf_keras and touches private APIs.

TFRS needs Keras 2 (`tf_keras`, selected by `TF_USE_LEGACY_KERAS=1`), while
Keras 3 is the default. A layer from one flavour inside a model of the other
runs but silently drops its weights, so the flavour is chosen once, at import,
from what `tf.keras` resolves to. The flavour cannot change inside a process.
"""

import json
import os

import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def _configured_backend():
    """The Keras 3 backend as Keras will pick it: env var, then keras.json.

    Read before importing Keras, because importing Keras with a backend that
    is not installed fails before any check could explain it.
    """
    backend = os.environ.get("KERAS_BACKEND")
    if backend:
        return backend
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _check_backend(backend):
    if backend != "tensorflow":
        raise ImportError(
            "alpt_keras needs the TensorFlow backend of Keras 3. "
            f"Received: KERAS_BACKEND={backend!r}. Set "
            "`KERAS_BACKEND=tensorflow` (or unset it) before importing keras."
        )


def _resolve_flavour():
    """True for Keras 3, False for tf_keras, from what `tf.keras` is."""
    try:
        return hasattr(tf.keras, "version")
    except ImportError:
        # TensorFlow cannot load Keras 3 with a non-TensorFlow backend.
        _check_backend(_configured_backend())
        raise


IS_KERAS_3 = _resolve_flavour()

if IS_KERAS_3:
    _check_backend(_configured_backend())
    import keras

    _check_backend(keras.backend.backend())
else:
    import tf_keras as keras

__all__ = [
    "IS_KERAS_3",
    "VariableList",
    "keras",
    "add_optimizer_variable",
    "flatten_layers",
    "in_xla_context",
    "output_shape",
    "refuse_xla",
    "optimizer_base_classes",
    "register",
    "tf_variable",
    "weight_aggregation",
]

register = keras.utils.register_keras_serializable(package="alpt_keras")


def output_shape(shape):
    """A layer's `compute_output_shape` result as its flavour expects it:
    a tuple under Keras 3, a `tf.TensorShape` under tf_keras (whose
    Functional API and layer tests call `.as_list()` on it). Nested dicts
    and lists of shapes are converted leaf by leaf."""
    if isinstance(shape, dict):
        return {k: output_shape(v) for k, v in shape.items()}
    if isinstance(shape, list) and shape and not isinstance(
            shape[0], (int, type(None))):
        return [output_shape(s) for s in shape]
    shape = tuple(tf.TensorShape(shape).as_list())
    return shape if IS_KERAS_3 else tf.TensorShape(shape)


def tf_variable(variable):
    """Returns the `tf.Variable` (possibly distributed) behind `variable`.

    Keras 3 wraps TensorFlow variables in `keras.Variable`; row scatters and
    `tf.custom_gradient` need the TensorFlow object.
    """
    if IS_KERAS_3 and isinstance(variable, keras.Variable):
        return variable.value
    return variable


def weight_aggregation():
    """Aggregation for ALPT state variables under `tf.distribute`.

    Integer variables refuse MEAN, and SUM/ON_READ refuse scatter. The
    optimizer writes every row in cross-replica context, identically to every
    copy, so ONLY_FIRST_REPLICA is both allowed and semantically right.
    """
    if IS_KERAS_3:
        return "only_first_replica"
    return tf.VariableAggregation.ONLY_FIRST_REPLICA


def add_optimizer_variable(optimizer, shape, dtype, name, initializer="zeros"):
    """`Optimizer.add_variable` with one signature for both flavours.

    Variables made this way are saved with the optimizer (a plain
    `tf.Variable` kept in a dict is not, on Keras 3).
    """
    if IS_KERAS_3:
        return optimizer.add_variable(
            shape=shape,
            initializer=initializer,
            dtype=dtype,
            aggregation=weight_aggregation(),
            name=name,
        )
    return optimizer.add_variable(
        shape=shape, dtype=dtype, initializer=initializer, name=name
    )


def in_xla_context():
    """True while tracing a function that XLA will compile."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def refuse_xla(what):
    """Raises `NotImplementedError` naming `what` while tracing for XLA.

    Under XLA, `tf.debugging.Assert` is dropped, `tf.gather` clamps
    out-of-range ids and `unique` and integer scatters do not compile, so
    ALPT lookups and updates refuse it rather than run wrong.
    """
    if in_xla_context():
        raise NotImplementedError(
            f"{what} cannot run under XLA: XLA drops the id checks, clamps "
            "out-of-range ids and cannot compile the row updates (unique, "
            "integer scatters). Compile with `jit_compile=False`. Received: "
            "a call inside an XLA-compiled function.")


class VariableList(list):
    """A list that is also callable: tf_keras code calls `variables()`."""

    def __call__(self):
        return self


def optimizer_base_classes():
    """The optimizer base classes of the active flavour (tf_keras also has
    `optimizers.legacy.Optimizer`)."""
    classes = [keras.optimizers.Optimizer]
    legacy = getattr(keras.optimizers, "legacy", None)
    if legacy is not None and hasattr(legacy, "Optimizer"):
        classes.append(legacy.Optimizer)
    return tuple(classes)


def flatten_layers(layer, include_self=False, recursive=True):
    """The sublayers of `layer` (Keras's private `_flatten_layers`, the same
    in both flavours), depth first."""
    return list(layer._flatten_layers(include_self=include_self,
                                      recursive=recursive))
