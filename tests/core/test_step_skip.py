"""A step is all or nothing: non-finite gradients anywhere skip it whole,
and a step refused by a check changes no variable (issue 13, items 1-2)."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer
from alpt_keras._keras import keras
from tests.core.helpers import replica_values, value

V, D, F = 30, 4, 2


def _model(seed=0):
    inputs = keras.Input(shape=(F,), dtype="int64")
    table = ALPTEmbedding(V, D, seed=seed, name="item")
    hidden = keras.layers.Dense(
        8, activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))
    head = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2))
    outputs = head(hidden(keras.layers.Flatten()(table(inputs))))
    return keras.Model(inputs, outputs), table


def _everything(model, optimizer):
    """Position -> bytes of every model and optimizer variable but the
    skip counter (keyed by position: two models' layer names differ)."""
    state = {f"model/{i}": value(v).tobytes()
             for i, v in enumerate(model.weights)}
    state.update({f"optimizer/{i}": value(v).tobytes()
                  for i, v in enumerate(optimizer.variables)
                  if "skipped" not in v.name})
    return state


def _changed(before, after):
    return sorted(k for k in before if before[k] != after[k])


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n, F)).astype(np.int64)
    labels = rng.integers(0, 2, size=(n, 1)).astype(np.float32)
    return ids, labels


def test_nan_label_in_fit_skips_the_step_whole():
    """A NaN label poisons the dense gradients (and the tables'): the run
    must equal, bitwise, the same run without that batch — a skipped step
    moves nothing, not even `iterations` (Adam's step) or the table step
    (the rounding noise's key)."""
    ids, labels = _data()
    poisoned = labels.copy()
    poisoned[25] = np.nan  # the third of four batches of 10

    def run(x, y):
        model, _ = _model()
        optimizer = ALPTOptimizer(keras.optimizers.Adam(0.01))
        model.compile(optimizer, "binary_crossentropy")
        model.fit(x, y, batch_size=10, epochs=2, shuffle=False, verbose=0)
        return model, optimizer

    model, optimizer = run(ids, poisoned)
    keep = np.r_[0:20, 30:40]
    clean, clean_optimizer = run(ids[keep], labels[keep])
    assert int(value(optimizer.skipped_steps)) == 2  # once per epoch
    assert int(value(optimizer.iterations)) == 6
    assert int(value(optimizer.table_iterations)) == 6
    for got, want in zip(model.weights, clean.weights, strict=True):
        assert value(got).tobytes() == value(want).tobytes(), got.name
    assert _everything(model, optimizer) == _everything(
        clean, clean_optimizer)
    assert np.all(np.isfinite(model.predict(ids, verbose=0)))


@pytest.mark.parametrize("where", ["dense", "table"])
@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_gradient_leaves_every_variable_unchanged(where, jit):
    model, table = _model()
    optimizer = ALPTOptimizer(keras.optimizers.Adam(0.01))
    ids, labels = _data(10)

    def step(poison):
        """One step; `poison` multiplies the gradient of the first
        variable of kind `where` (1.0: a clean step)."""
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(
                labels, tf.sigmoid(model(ids, training=True))))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        carrier = table.trainable_variables[0]
        target = carrier if where == "table" else next(
            v for v in variables if v is not carrier)
        for i, variable in enumerate(variables):
            if variable is target:
                grad = grads[i]
                if isinstance(grad, tf.IndexedSlices):
                    grads[i] = tf.IndexedSlices(
                        grad.values * poison, grad.indices, grad.dense_shape)
                else:
                    grads[i] = grad * poison
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    run = tf.function(step) if jit else step
    run(tf.constant(1.0))  # builds; one real step
    before = _everything(model, optimizer)
    for bad in (np.nan, np.inf):
        run(tf.constant(bad, tf.float32))
        assert _changed(before, _everything(model, optimizer)) == []
    assert int(value(optimizer.skipped_steps)) == 2
    assert int(value(optimizer.iterations)) == 1
    run(tf.constant(1.0))  # a finite step applies again
    assert int(value(optimizer.iterations)) == 2
    assert _changed(before, _everything(model, optimizer))


def test_mirrored_nan_on_one_replica_skips_every_replica(mirrored_strategy):
    strategy = mirrored_strategy
    with strategy.scope():
        model, _ = _model()
        optimizer = ALPTOptimizer(keras.optimizers.Adam(0.01))
        optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(ids, labels):
        def step(ids, labels):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(
                    (model(ids, training=True) - labels) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True))
        strategy.run(step, args=(ids, labels))

    def per_replica(poison):
        def value_fn(context):
            i = context.replica_id_in_sync_group
            ids = tf.constant([[1, 2], [3, 4]], tf.int64) + i
            labels = tf.constant([[1.0], [0.0]])
            if poison and i == 1:
                # Replica 1's loss, hence its gradients, are NaN; replica
                # 0's are finite and alone would step.
                labels = tf.constant([[np.nan], [0.0]])
            return ids, labels
        return strategy.experimental_distribute_values_from_function(
            value_fn)

    train_step(*per_replica(False))

    def everything():
        return [b.tobytes() for v in model.weights + list(optimizer.variables)
                if "skipped" not in v.name for b in replica_values(v)]

    before = everything()
    train_step(*per_replica(True))
    assert everything() == before
    assert int(value(optimizer.skipped_steps)) == 1
    assert int(value(optimizer.iterations)) == 1
    train_step(*per_replica(False))
    assert int(value(optimizer.iterations)) == 2
    assert everything() != before


def _built(model):
    optimizer = ALPTOptimizer(keras.optimizers.Adam(0.01))
    ids, labels = _data(10)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(ids, training=True) - labels)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables,
                                  strict=True))
    return optimizer, list(zip(grads, model.trainable_variables,
                               strict=True))


def _slices(ids, width=D):
    ids = tf.constant(ids, tf.int64)
    return tf.IndexedSlices(tf.ones([tf.size(ids), width]), ids,
                            tf.constant([V, D], tf.int64))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", ["bad_id", "negative_id", "wide_rows",
                                  "rank_3_rows", "dense_gradient"])
def test_refused_step_changes_nothing(case, jit):
    """The checks (ids, gradient shapes and types) come before any write:
    the dense weights, their Adam slots and `iterations` stay as they
    were, although the dense gradients in the same call are fine."""
    model, table = _model()
    optimizer, grads_and_vars = _built(model)
    carrier = table.trainable_variables[0]
    bad = {
        "bad_id": (_slices([1, V]), tf.errors.InvalidArgumentError,
                   r"ids must be in \[0, input_dim=30\)"),
        "negative_id": (_slices([-1, 2]), tf.errors.InvalidArgumentError,
                        "out-of-range"),
        "wide_rows": (_slices([1, 2], width=D + 1), ValueError,
                      r"row gradients \[N, 4\]"),
        "rank_3_rows": (tf.IndexedSlices(
            tf.ones([2, 1, D]), tf.constant([1, 2], tf.int64)),
            ValueError, "values of shape"),
        "dense_gradient": (tf.ones([V, D]), TypeError, "IndexedSlices"),
    }[case]
    grads_and_vars = [(bad[0], v) if v is carrier else (g, v)
                      for g, v in grads_and_vars]
    before = _everything(model, optimizer)

    def apply():
        optimizer.apply_gradients(grads_and_vars)

    with pytest.raises(bad[1], match=bad[2]):
        (tf.function(apply) if jit else apply)()
    assert _changed(before, _everything(model, optimizer)) == []


def test_table_not_built_with_the_optimizer_changes_nothing():
    model, _ = _model()
    optimizer, grads_and_vars = _built(model)
    other = ALPTEmbedding(V, D, seed=3, name="other")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(other(tf.constant([[1, 2]], tf.int64)))
    carrier = other.trainable_variables[0]
    grads_and_vars.append((tape.gradient(loss, carrier), carrier))
    before = _everything(model, optimizer)
    with pytest.raises(ValueError, match="'other'.*not part of the var"):
        optimizer.apply_gradients(grads_and_vars)
    assert _changed(before, _everything(model, optimizer)) == []
