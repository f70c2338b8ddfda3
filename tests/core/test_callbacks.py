"""ALPTMonitor puts skipped steps and table health into fit's logs;
StopOnSkippedSteps stops a run whose steps keep being skipped."""

import numpy as np
import pytest

from alpt_keras import (
    ALPTEmbedding,
    ALPTMonitor,
    ALPTOptimizer,
    NonFiniteStepsError,
    StopOnSkippedSteps,
)
from alpt_keras._keras import keras
from tests.core.helpers import value


def test_monitor_logs_skipped_updates_and_table_stats():
    inputs = keras.Input(shape=(2,), dtype="int64")
    layer = ALPTEmbedding(20, 4, num_bits=2, seed=0, name="user_id")
    # A frozen head: a NaN batch must not poison the next batch through
    # dense weights (0 * NaN is NaN even at learning rate 0).
    # Seeded: with an unseeded head, some draws push every 2-bit code to an
    # end (saturated == 1.0) and the last check below could not tell.
    head = keras.layers.Dense(
        1, trainable=False,
        kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    outputs = head(keras.layers.Flatten()(layer(inputs)))
    model = keras.Model(inputs, outputs)
    optimizer = ALPTOptimizer(keras.optimizers.SGD())
    model.compile(optimizer, "mse")
    ids = np.tile(np.arange(20).reshape(10, 2), (4, 1))
    labels = np.ones((40, 1), np.float32)
    labels[25] = np.nan  # poisons the third of four batches of 10
    history = model.fit(ids, labels, batch_size=10, epochs=1, shuffle=False,
                        callbacks=[ALPTMonitor(per_table=True)],
                        verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert logs["alpt_skipped_steps"] == 1.0
    assert logs["alpt_skipped_table_updates"] == 1.0  # its first name
    assert int(value(optimizer.table_iterations)) == 3
    steps = value(layer.step_sizes)
    np.testing.assert_allclose(logs["user_id/step_size_mean"], steps.mean(),
                               rtol=1e-6)
    assert logs["user_id/step_size_min"] == steps.min()
    assert logs["user_id/step_size_max"] == steps.max()
    codes = value(layer.codes)
    saturated = np.mean((codes == -2) | (codes == 1))
    assert logs["user_id/saturated"] == saturated
    assert 0.0 < saturated < 1.0  # 2-bit codes do reach the ends
    assert logs["alpt/saturated"] == saturated  # the only table
    np.testing.assert_allclose(logs["alpt/step_size_mean"], steps.mean(),
                               rtol=1e-6)
    assert logs["alpt/step_size_min"] == steps.min()  # copied, exact
    assert logs["alpt/step_size_max"] == steps.max()
    assert steps.min() < steps.max()  # per-row Δ has moved apart


def _guarded_fit(labels, guard, batch_size=10):
    inputs = keras.Input(shape=(2,), dtype="int64")
    layer = ALPTEmbedding(20, 4, seed=0, name="user_id")
    head = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    model = keras.Model(inputs, head(keras.layers.Flatten()(layer(inputs))))
    optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))
    model.compile(optimizer, "mse")
    ids = np.tile(np.arange(20).reshape(10, 2), (len(labels) // 10, 1))
    return model, optimizer, lambda: model.fit(
        ids, labels, batch_size=batch_size, epochs=1, shuffle=False,
        callbacks=[guard], verbose=0)


def test_stop_on_skipped_steps_raises_after_the_limit():
    labels = np.ones((100, 1), np.float32)
    labels[20:] = np.nan  # two good batches, then eight NaN batches
    guard = StopOnSkippedSteps(max_consecutive=3)
    model, optimizer, fit = _guarded_fit(labels, guard)
    with pytest.raises(NonFiniteStepsError, match="3 consecutive training "
                       "steps were skipped.*batch 4"):
        fit()
    assert int(value(optimizer.iterations)) == 2
    assert int(value(optimizer.skipped_steps)) == 3
    assert all(np.all(np.isfinite(value(w))) for w in model.weights
               if value(w).dtype.kind == "f")


def test_stop_on_skipped_steps_resets_on_an_applied_step():
    labels = np.ones((100, 1), np.float32)
    labels[0::20] = np.nan  # every other batch is skipped: never 2 in a row
    guard = StopOnSkippedSteps(max_consecutive=2)
    _, optimizer, fit = _guarded_fit(labels, guard)
    fit()
    assert int(value(optimizer.skipped_steps)) == 5
    assert int(value(optimizer.iterations)) == 5
    assert guard.consecutive == 0


def test_stop_on_skipped_steps_per_epoch_has_no_batch_hook():
    labels = np.full((40, 1), np.nan, np.float32)
    guard = StopOnSkippedSteps(max_consecutive=4, per_epoch=True)
    assert getattr(guard.on_train_batch_end, "_is_default", None) is \
        getattr(keras.callbacks.Callback.on_train_batch_end, "_is_default",
                None)
    _, _, fit = _guarded_fit(labels, guard)
    with pytest.raises(NonFiniteStepsError, match="epoch 1"):
        fit()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_stop_on_skipped_steps_argument(bad):
    with pytest.raises(ValueError, match=f"max_consecutive={bad!r}"):
        StopOnSkippedSteps(max_consecutive=bad)


def _float16_fit(labels, guard, initial_scale=2.0 ** 15):
    """`_guarded_fit` under mixed float16, the ALPTOptimizer inside a
    LossScaleOptimizer (which skips non-finite steps before it)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input(shape=(2,), dtype="int64")
        layer = ALPTEmbedding(20, 4, seed=0, name="user_id")
        head = keras.layers.Dense(
            1, dtype="float32",
            kernel_initializer=keras.initializers.GlorotUniform(seed=1))
        model = keras.Model(inputs,
                            head(keras.layers.Flatten()(layer(inputs))))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = keras.mixed_precision.LossScaleOptimizer(
        ALPTOptimizer(keras.optimizers.SGD(0.1)),
        initial_scale=initial_scale)
    model.compile(optimizer, "mse")
    ids = np.tile(np.arange(20).reshape(10, 2), (len(labels) // 10, 1))
    codes = value(layer.codes).copy()
    model.fit(ids, labels, batch_size=10, epochs=1, shuffle=False,
              callbacks=[guard], verbose=0)
    return codes, layer


def test_stop_on_skipped_steps_counts_loss_scaling_skips():
    # Under mixed float16 the LossScaleOptimizer skips NaN steps before
    # ALPTOptimizer sees them (its own counter stays 0): each halving of
    # the dynamic loss scale counts instead.
    labels = np.ones((100, 1), np.float32)
    labels[20:] = np.nan  # two good batches, then eight NaN batches
    guard = StopOnSkippedSteps(max_consecutive=3)
    with pytest.raises(NonFiniteStepsError,
                       match=r"3 consecutive training steps were skipped.*"
                             r"batch 4.*loss scaling skipped them too: its "
                             r"scale is now 4096"):
        _float16_fit(labels, guard)


def test_a_settling_loss_scale_is_not_stopped():
    # 2^30 overflows the first float16 gradients: the scale halves until
    # they fit, then steps apply and the count resets.
    labels = np.ones((400, 1), np.float32)
    guard = StopOnSkippedSteps(max_consecutive=30)
    codes, layer = _float16_fit(labels, guard, initial_scale=2.0 ** 30)
    assert guard.consecutive == 0
    assert 0 < guard._scale < 2.0 ** 30  # it did skip, then settled
    assert not np.array_equal(value(layer.codes), codes)  # and trained
    # Negative control: the same run with a tight limit stops.
    with pytest.raises(NonFiniteStepsError, match="loss scaling"):
        _float16_fit(labels, StopOnSkippedSteps(max_consecutive=2),
                     initial_scale=2.0 ** 30)
