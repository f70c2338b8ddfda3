"""Checks in the spirit of the Keras layer harnesses, for what the stock
ones cannot take (issue 16):

- `alpt_training_check`: the harnesses' training check (wrap the layer in
  a model, compile, fit one step) with `ALPTOptimizer`, the optimizer an
  ALPT table needs, and assertions that the step did what a step must;
- `structured_layer_test`: tf_keras's `test_utils.layer_test` steps for a
  layer with several, ragged or sparse inputs (the stock one takes one
  dense input).
"""

import numpy as np
import tensorflow as tf

import alpt_keras
from alpt_keras.compat import keras


class _SumModel(keras.Model):
    """The layer's outputs summed per example, `[B]`: one loss for any
    output structure (dense, ragged, a list or a dict)."""

    def __init__(self, layer):
        super().__init__(name="sum_model")
        self.layer = layer

    def call(self, inputs, training=False):
        outputs = tf.nest.flatten(self.layer(inputs, training=training))
        per_example = []
        for out in outputs:
            axes = list(range(1, out.shape.rank))
            per_example.append(tf.reduce_sum(out, axis=axes) if axes
                               else out)
        return tf.add_n(per_example)


def _sum_loss(y_true, y_pred):
    del y_true
    return tf.reduce_sum(y_pred)


def logical_tables(layer):
    """`{logical table name: (codes [V, D], Δ [V, 1] or [1, 1])}` of every
    ALPT table in `layer`, sliced out of stacked variables."""
    out = {}
    for state in alpt_keras.tables(layer):
        codes = state.storage.read_all().numpy()
        steps = tf.convert_to_tensor(state.step_sizes).numpy()
        offsets = state.spec.offsets
        for t, spec in enumerate(state.spec.tables):
            rows = slice(offsets[t], offsets[t + 1])
            step = steps[rows] if state.spec.per_row else steps[t:t + 1]
            out[spec.name] = (codes[rows], step)
    return out


def alpt_training_check(layer, input_data, touched):
    """One `fit` step of `layer` in a model, with `ALPTOptimizer`.

    The loss is the sum of the layer's outputs, so every element of every
    row the batch looks up has a positive gradient. Asserts that the step
    ran once, that each table's looked-up rows went down (the step is far
    larger than Δ, so rounding cannot hide it) and that no other row's
    codes (or per-row Δ) moved by a bit. A per-table Δ may change: it is
    every row's.

    Args:
        layer: an unbuilt layer holding ALPT tables.
        input_data: the layer's input (one batch).
        touched: `{logical table name: ids the batch looks up}`.
    """
    model = _SumModel(layer)
    batch = tf.nest.flatten(input_data)[0]
    size = batch.shape[0] if not isinstance(batch, tf.SparseTensor) \
        else batch.dense_shape[0]
    if isinstance(input_data, list):  # a list would be stacked into one
        input_data = tuple(input_data)
    model(input_data)  # builds the tables
    before = logical_tables(layer)
    assert sorted(before) == sorted(touched), (sorted(before), touched)
    optimizer = alpt_keras.ALPTOptimizer(
        keras.optimizers.SGD(0.1), embedding_learning_rate=0.5)
    model.compile(optimizer, _sum_loss)
    data = tf.data.Dataset.from_tensors(
        (input_data, tf.zeros([int(size)])))
    model.fit(data, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    after = logical_tables(layer)
    for name, rows in touched.items():
        rows = np.unique(np.asarray(rows))
        (codes0, step0), (codes1, step1) = before[name], after[name]
        others = np.setdiff1d(np.arange(len(codes0)), rows)
        np.testing.assert_array_equal(codes1[others], codes0[others],
                                      err_msg=f"{name}: untouched rows moved")
        if len(step0) == len(codes0):  # per-row Δ
            np.testing.assert_array_equal(step1[others], step0[others],
                                          err_msg=f"{name}: untouched Δ")
        else:
            step0 = step1 = np.broadcast_to(step0, (len(codes0), 1))
        value0 = (codes0 * step0)[rows].sum(1)
        value1 = (codes1 * np.broadcast_to(step1, step0.shape))[rows].sum(1)
        went_down = value1 < value0
        assert went_down.all(), (name, rows[~went_down])
    return model


def _keras_input(data):
    """A `keras.Input` matching one input tensor (dense, ragged, sparse)."""
    if isinstance(data, tf.RaggedTensor):
        return keras.Input(shape=(None,), dtype=data.dtype, ragged=True)
    if isinstance(data, tf.SparseTensor):
        return keras.Input(shape=tuple(data.shape[1:]), dtype=data.dtype,
                           sparse=True)
    data = np.asarray(data)
    return keras.Input(shape=data.shape[1:], dtype=data.dtype)


def _shape(data):
    if isinstance(data, tf.RaggedTensor):
        return tf.TensorShape([data.shape[0], None])
    return tf.TensorShape(data.shape)


def structured_layer_test(layer_cls, kwargs, input_data,
                          expected_output_shape,
                          expected_output_dtype="float32"):
    """tf_keras `layer_test`'s steps for `input_data` that is a list of
    dense, ragged or sparse tensors, or one ragged/sparse tensor: weights
    round trip, Functional call (output dtype and shape), shape inference
    against `predict`, model config round trip with the weights, and the
    layer rebuilt from its config with the weights. Returns the
    prediction. `expected_output_shape` has the batch axis as `None`; the
    output structure follows `input_data`'s for a group (list in, list
    out)."""
    layer = layer_cls(**kwargs)
    layer.set_weights(layer.get_weights())

    def inputs():
        return tf.nest.map_structure(_keras_input, input_data,
                                     expand_composites=False)

    x = inputs()
    y = layer(x)
    for out in tf.nest.flatten(y):
        assert out.dtype == expected_output_dtype, out.dtype
    _assert_shapes(expected_output_shape, y, lambda t: t.shape)

    model = keras.Model(x, y)
    computed = layer.compute_output_shape(
        tf.nest.map_structure(_shape, input_data))
    for shape in _flat_shapes(computed):
        assert isinstance(shape, tf.TensorShape), type(shape)
    actual = model.predict(input_data, verbose=0)
    _assert_shapes(computed, actual, lambda t: t.shape)

    recovered = keras.Model.from_config(model.get_config())
    recovered.set_weights(model.get_weights())
    _assert_same(recovered.predict(input_data, verbose=0), actual)

    layer_weights = layer.get_weights()
    rebuilt = layer_cls.from_config(layer.get_config())
    x = inputs()
    model = keras.Model(x, rebuilt(x))
    rebuilt.set_weights(layer_weights)
    _assert_same(model.predict(input_data, verbose=0), actual)
    return actual


def _assert_shapes(expected, actual, shape_of):
    expected = _flat_shapes(expected)
    actual = [shape_of(a) for a in tf.nest.flatten(actual)]
    assert len(expected) == len(actual), (expected, actual)
    for e, a in zip(expected, actual, strict=True):
        e, a = tf.TensorShape(e).as_list(), tf.TensorShape(a).as_list()
        assert len(e) == len(a), (e, a)
        for de, da in zip(e, a, strict=True):
            assert de is None or da is None or de == da, (e, a)


def _flat_shapes(shapes):
    if isinstance(shapes, (tuple, tf.TensorShape)) and all(
            d is None or isinstance(d, int) for d in
            (shapes.as_list() if isinstance(shapes, tf.TensorShape)
             else shapes)):
        return [shapes]
    if isinstance(shapes, dict):
        shapes = list(shapes.values())
    return [s for shape in shapes for s in _flat_shapes(shape)]


def _assert_same(got, want):
    for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want),
                    strict=True):
        # The same weights and ids through the same ops: exact.
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
