"""Test helpers shared by the core tests."""

import numpy as np
import tensorflow as tf

from alpt_keras import _keras


def value(variable):
    """A NumPy copy of a (possibly Keras 3, possibly mirrored) variable."""
    return np.array(tf.convert_to_tensor(_keras.tf_variable(variable)))


def replica_values(variable):
    """NumPy copies of every replica's component of a mirrored variable."""
    tf_var = _keras.tf_variable(variable)
    components = getattr(tf_var, "values", (tf_var,))
    return [np.array(c.numpy()) for c in components]


def step_layer(layer, optimizer, ids, upstream):
    """One training step on a standalone layer with loss Σ out · upstream.

    The row gradient of position (b, f) is `upstream[b, f]`.
    """
    with tf.GradientTape() as tape:
        out = layer(ids)
        loss = tf.reduce_sum(out * upstream)
    variables = layer.trainable_variables
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables, strict=True))


def optimizer_state(optimizer):
    """Name -> NumPy value of the wrapper's own variables."""
    inner = {id(v) for v in optimizer.inner_optimizer.variables}
    return {
        v.name: value(v) for v in optimizer.variables if id(v) not in inner
    }


def snapshot(layer, optimizer):
    """Bitwise copies of everything a table update may touch."""
    state = {"codes": value(layer.codes), "steps": value(layer.step_sizes)}
    state.update(optimizer_state(optimizer))
    return state


def assert_bitwise_equal(before, after):
    assert before.keys() == after.keys()
    for name in before:
        a, b = before[name], after[name]
        assert a.dtype == b.dtype, name
        assert a.tobytes() == b.tobytes(), f"{name} changed"


def assert_codes_match(got, want, scaled, noise, rounding, step_error):
    """Codes equal, except ±1 where the pre-rounding value `w'/Δ'` sits
    within its own uncertainty of the rounding threshold: 1e-5 relative
    (float32 summation order differs between TF's tree reductions and
    NumPy's) plus the measured relative difference of Δ', which rescales
    `w'/Δ'`. Such a value may legitimately round either way."""
    diff = got - want
    if not diff.any():
        return
    frac = scaled - np.floor(scaled)
    threshold = noise if rounding == "stochastic" else 0.5
    band = (1e-5 + step_error) * np.maximum(1, np.abs(scaled))
    near = np.abs(frac - threshold) <= band
    assert np.all(np.abs(diff) <= 1)
    assert np.all(near[diff != 0]), "codes differ away from a threshold"
