"""MirroredStrategy over two logical CPUs: replica-consistent ALPT tables."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer, quantizers
from alpt_keras._keras import keras
from alpt_keras.models.dnn import build_dnn
from alpt_keras.models.synthetic import make_synthetic_ctr
from alpt_keras.storage import unpack_codes
from tests.core.helpers import replica_values

FIELDS, VOCAB, BATCH = 4, 300, 256


def assert_replicas_identical(variable):
    copies = replica_values(variable)
    for i, copy in enumerate(copies[1:], start=1):
        assert copy.tobytes() == copies[0].tobytes(), (
            f"replica {i} of {variable.name} differs from replica 0 in "
            f"{int(np.sum(copy != copies[0]))} entries")


def _codes(layer):
    """Replica 0's codes as int `[V, D]`, whatever the storage."""
    stored = replica_values(layer.codes)[0]
    if layer.storage == "packed":
        stored = unpack_codes(stored, layer.num_bits, layer.output_dim)
    return np.asarray(stored).astype(int)


def _train(strategy, data, bits=8, storage="int8"):
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        tf.keras.utils.set_random_seed(0)
        model = build_dnn(FIELDS, VOCAB, embedding="alpt", num_bits=bits,
                          seed=0, hidden_units=(32,), storage=storage)
        optimizer = ALPTOptimizer(keras.optimizers.Adam(5e-3))
        model.compile(optimizer, "binary_crossentropy")
    model.initial_codes = _codes(model.get_layer("embedding"))
    # Same global batches in the same order for both runs.
    model.fit(data.ids, data.labels, batch_size=BATCH, epochs=1,
              shuffle=False, verbose=0)
    return model, optimizer


# A learned Δ makes long runs sensitive to float summation order (README,
# "Reproducibility": with the default step-size rule 2 vs 1 replicas give
# identical 8-bit codes through 20 steps, 0.7% of codes off by one at 40).
# 20 steps is where the aggregation itself is checked: a lost replica or a
# doubled gradient would change most codes after the first step.
STEPS = 20


@pytest.mark.slow
@pytest.mark.parametrize("bits, storage", [(8, "int8"), (4, "int8"),
                                           (4, "packed")])
def test_mirrored_fit_is_replica_consistent_and_matches_one_replica(
        mirrored_strategy, bits, storage):
    strategy = mirrored_strategy
    data = make_synthetic_ctr(STEPS * BATCH, num_fields=FIELDS,
                              vocab_size=VOCAB, seed=1)
    model, optimizer = _train(strategy, data, bits, storage)
    layer = model.get_layer("embedding")
    assert strategy.num_replicas_in_sync == 2
    assert len(replica_values(layer.codes)) == 2
    inner = {id(v) for v in optimizer.inner_optimizer.variables}
    own = [v for v in optimizer.variables if id(v) not in inner]
    names = " ".join(v.name for v in own)
    for slot in ("embedding_accumulator", "embedding_step_size_accumulator",
                 "table_iterations", "skipped_table_updates"):
        assert slot in names, (slot, names)
    for variable in [layer.codes, layer.step_sizes] + own:
        assert_replicas_identical(variable)

    single, _ = _train(None, data, bits, storage)
    ref_layer = single.get_layer("embedding")
    codes, ref_codes = _codes(layer), _codes(ref_layer)
    diff = codes - ref_codes
    # Only float summation order differs (per-replica sums + all-reduce):
    # at most 0.1% of codes differ, each by one step.
    assert np.mean(diff != 0) <= 1e-3, np.mean(diff != 0)
    assert np.abs(diff).max() <= 1
    np.testing.assert_allclose(replica_values(layer.step_sizes)[0],
                               replica_values(ref_layer.step_sizes)[0],
                               rtol=1e-5)
    assert int(optimizer.table_iterations.numpy()) == STEPS
    assert np.mean(codes != model.initial_codes) > 0.5  # really trained


def test_negative_control_unsynchronised_noise_diverges(mirrored_strategy):
    """The consistency check can fail: per-device stateful noise (what a
    `tf.random.uniform` rounding would do) makes the int8 copies differ."""
    strategy = mirrored_strategy
    with strategy.scope():
        codes = tf.Variable(
            tf.zeros([200, 16], tf.int8),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def unsynchronised_round(var):
        noise = tf.random.uniform(var.shape)  # a different draw per device
        half = tf.fill(var.shape, 0.5)
        return var.assign(tf.cast(quantizers.stochastic_round(half, noise),
                                  tf.int8))

    strategy.extended.update(codes, unsynchronised_round)
    with pytest.raises(AssertionError, match="differs from replica 0"):
        assert_replicas_identical(codes)


def test_hashed_noise_is_identical_on_every_replica(mirrored_strategy):
    strategy = mirrored_strategy
    rows = tf.constant(np.arange(1000), tf.int64)
    noise = strategy.run(lambda: quantizers.hash_uniform(1, 2, 3, rows, 16))
    local = [t.numpy() for t in strategy.experimental_local_results(noise)]
    assert len(local) == 2
    assert local[0].tobytes() == local[1].tobytes()


def test_custom_loop_nan_on_one_replica_skips_update_on_all(
        mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        layer = ALPTEmbedding(50, 8, seed=0, name="t")
        layer.build(None)
        optimizer = ALPTOptimizer(keras.optimizers.SGD())
        optimizer.build(layer.trainable_variables)

    @tf.function
    def train_step(ids, upstream):
        def step(ids, upstream):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(ids, training=True) * upstream)
            grads = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, layer.trainable_variables, strict=True))
        strategy.run(step, args=(ids, upstream))

    def per_replica(poison):
        def value_fn(context):
            i = context.replica_id_in_sync_group
            ids = tf.constant([[1, 2], [3, 4]], tf.int64) + i
            upstream = tf.fill([2, 2, 8], 0.01)
            if poison and i == 1:
                upstream = tf.tensor_scatter_nd_update(
                    upstream, [[0, 0, 0]], [np.nan])
            return ids, upstream
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: value_fn(ctx))
        return values

    ids, upstream = per_replica(poison=False)
    train_step(ids, upstream)
    before = [replica_values(layer.codes), replica_values(layer.step_sizes)]
    ids, upstream = per_replica(poison=True)
    train_step(ids, upstream)
    after = [replica_values(layer.codes), replica_values(layer.step_sizes)]
    for old, new in zip(before, after, strict=True):
        for a, b in zip(old, new, strict=True):
            assert a.tobytes() == b.tobytes()
    assert int(optimizer.skipped_table_updates.numpy()) == 1
    assert_replicas_identical(layer.codes)
    assert_replicas_identical(layer.step_sizes)
