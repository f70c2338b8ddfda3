"""The per-step graph touches rows, never the whole `[V, D]` table."""

import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer, step_size_pass
from alpt_keras._keras import keras

V, D = 9973, 16  # a prime no other tensor dimension will match


def _table_sized_outputs(graph):
    found = []
    for op in graph.get_operations():
        for out in op.outputs:
            dims = out.shape.as_list() if out.shape.rank else []
            if V in dims:
                found.append(f"{op.type}:{op.name} {dims}")
    return found


@pytest.mark.parametrize("step_size, storage", [
    ("row", "int8"), ("table", "int8"), ("row", "packed")])
@pytest.mark.parametrize("emb_opt", ["rowwise_adagrad", "lazy_adam"])
def test_train_step_has_no_full_table_tensor(emb_opt, step_size, storage):
    layer = ALPTEmbedding(V, D, step_size=step_size, seed=0, storage=storage,
                          num_bits=4)
    dense = keras.layers.Dense(1)
    optimizer = ALPTOptimizer(keras.optimizers.Adam(),
                              embedding_optimizer=emb_opt)

    @tf.function
    def train_step(ids):
        with tf.GradientTape() as tape:
            rows = layer(ids, training=True)  # (B, F, D)
            loss = tf.reduce_mean(dense(tf.reshape(rows, [-1, 4 * D])))
        variables = layer.trainable_variables + dense.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    ids = tf.zeros([32, 4], tf.int64)
    layer(ids)  # build outside the traced step
    dense.build((None, 4 * D))
    optimizer.build(layer.trainable_variables + dense.trainable_variables)
    graph = train_step.get_concrete_function(ids).graph
    found = _table_sized_outputs(graph)
    # The only V-sized values allowed are shape constants (the dense_shape
    # of the sparse row gradient) — one-dimensional, never [V, D] data.
    offending = [f for f in found if "Const" not in f]
    assert not offending, offending
    # Negative control: reading the whole table is detected.
    @tf.function
    def full_read():
        return tf.reduce_sum(tf.cast(tf.convert_to_tensor(layer.codes),
                                     tf.int32))
    assert _table_sized_outputs(full_read.get_concrete_function().graph)


def test_two_pass_custom_loop_step_has_no_full_table_tensor():
    """The custom-loop form of the two-pass step (what the train-step hook
    runs): still rows only, in both passes."""
    layer = ALPTEmbedding(V, D, seed=0, num_bits=4)
    dense = keras.layers.Dense(1)
    optimizer = ALPTOptimizer(keras.optimizers.Adam(),
                              step_size_gradient="two_pass")

    def loss_of(ids, training):
        rows = layer(ids, training=training)
        return tf.reduce_mean(tf.square(
            dense(tf.reshape(rows, [-1, 4 * D])) - 1.0))

    @tf.function
    def train_step(ids):
        with tf.GradientTape() as tape:
            loss = loss_of(ids, True)
        variables = layer.trainable_variables + dense.trainable_variables
        grads = tape.gradient(loss, variables)
        with optimizer.two_pass_step():
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        carriers = optimizer.pending_carriers
        with tf.GradientTape() as tape, step_size_pass():
            loss = loss_of(ids, False)
        optimizer.apply_step_size_gradients(
            tape.gradient(loss, carriers), carriers)

    ids = tf.zeros([32, 4], tf.int64)
    layer(ids)
    dense.build((None, 4 * D))
    optimizer.build(layer.trainable_variables + dense.trainable_variables)
    graph = train_step.get_concrete_function(ids).graph
    offending = [f for f in _table_sized_outputs(graph) if "Const" not in f]
    assert not offending, offending
    assert optimizer.pending_carriers == []  # the step was completed
    train_step(ids)
    assert int(optimizer.table_iterations.numpy()) == 1
