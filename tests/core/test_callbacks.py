"""ALPTMonitor puts skipped updates and table health into fit's logs."""

import numpy as np

from alpt_keras import ALPTEmbedding, ALPTMonitor, ALPTOptimizer
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
    assert logs["alpt_skipped_table_updates"] == 1.0
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
