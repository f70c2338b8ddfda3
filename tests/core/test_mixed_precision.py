"""Mixed precision (issue 16, item 3), both flavours: tables dequantize into
the compute dtype while codes, Δ and their updates stay float32; the table
step sees unscaled gradients under `LossScaleOptimizer`, and a step that
loss scaling skips leaves the tables alone."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import IS_KERAS_3, ALPTEmbedding, ALPTOptimizer
from alpt_keras.compat import keras
from tests.core.helpers import value


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test, and always puts float32
    back (the policy is process-wide)."""
    def set_policy(name):
        keras.mixed_precision.set_global_policy(name)

    yield set_policy
    keras.mixed_precision.set_global_policy("float32")


def _model():
    ids = keras.Input(shape=(2,), dtype="int64")
    table = ALPTEmbedding(50, 8, seed=0, name="t")
    x = keras.layers.Flatten()(table(ids))
    x = keras.layers.Dense(
        16, activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    # The probability stays float32, as Keras recommends.
    out = keras.layers.Dense(
        1, activation="sigmoid", dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=2))(x)
    return keras.Model(ids, out), table


def _data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (n, 2))
    return x, (x[:, 0] % 2).astype("float32")


@pytest.mark.parametrize("name, compute", [
    ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_a_mixed_policy_trains_with_float32_tables(policy, name, compute):
    policy(name)
    keras.utils.set_random_seed(0)
    model, table = _model()
    optimizer = ALPTOptimizer(keras.optimizers.Adam(1e-2))
    if name == "mixed_float16":  # float16 needs loss scaling
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer, "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    x, y = _data()
    start = value(table.codes).copy()
    history = model.fit(x, y, batch_size=256, epochs=3, verbose=0)
    assert history.history["auc"][-1] > 0.95  # learned the parity rule
    assert np.any(value(table.codes) != start)  # the table stepped
    assert tf.as_dtype(table(x[:4]).dtype).name == compute  # compute dtype
    assert tf.as_dtype(table.step_sizes.dtype).name == "float32"
    assert tf.as_dtype(table.codes.dtype).name == "int8"
    assert model.predict(x[:4], verbose=0).dtype == np.float32


def test_loss_scaling_reaches_the_table_step_unscaled():
    """float32 compute with and without `LossScaleOptimizer` (scale 2^15):
    the scale is a power of two, so unscaling is exact, and the tables must
    come out bitwise equal after 8 steps; a table step fed scaled
    gradients would move Δ and codes 2^15 times too far."""
    results = []
    for scaled in (False, True):
        keras.utils.set_random_seed(0)
        model, table = _model()
        optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))
        if scaled:  # a fixed scale (Keras 3's grows only every 2000 steps)
            optimizer = keras.mixed_precision.LossScaleOptimizer(
                optimizer, initial_scale=2.0 ** 15,
                **({} if IS_KERAS_3 else {"dynamic": False}))
        model.compile(optimizer, "binary_crossentropy")
        x, y = _data(2048)
        model.fit(x, y, batch_size=256, epochs=1, verbose=0, shuffle=False)
        results.append((value(table.codes).copy(),
                        value(table.step_sizes).copy()))
    (codes, steps), (scaled_codes, scaled_steps) = results
    np.testing.assert_array_equal(scaled_codes, codes)
    np.testing.assert_array_equal(scaled_steps, steps)
    assert np.any(steps != results[0][1][0, 0])  # Δ did learn


def test_a_step_skipped_by_loss_scaling_leaves_the_tables(policy):
    policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model, table = _model()
    # 2^30 overflows float16 gradients: every step is non-finite.
    optimizer = keras.mixed_precision.LossScaleOptimizer(
        ALPTOptimizer(keras.optimizers.SGD(0.1)), initial_scale=2.0 ** 30)
    model.compile(optimizer, "binary_crossentropy")
    x, y = _data(256)
    codes, steps = value(table.codes).copy(), value(table.step_sizes).copy()
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    np.testing.assert_array_equal(value(table.codes), codes)
    np.testing.assert_array_equal(value(table.step_sizes), steps)


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_the_ctr_models_keep_logit_and_probability_float32(policy, name):
    from alpt_keras.models import build_dcn, simple_features

    policy(name)
    model = build_dcn(simple_features({"user": 30, "item": 20},
                                      embedding_dim=4), hidden_units=(8,))
    x = {"user": np.arange(4), "item": np.arange(4)}
    embedded = model.get_layer("embedding")(
        {k: tf.constant(v) for k, v in x.items()})
    assert tf.as_dtype(embedded.dtype).name == name.split("_")[1]
    assert model.get_layer("logit").compute_dtype == "float32"
    assert model.predict(x, verbose=0).dtype == np.float32
