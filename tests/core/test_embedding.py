"""ALPTEmbedding: shapes, combiners, warm start, validation, round trips."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import IS_KERAS_3, ALPTEmbedding, ALPTOptimizer
from alpt_keras._keras import keras
from tests import reference as ref
from tests.core.helpers import snapshot, step_layer, value

V, D = 30, 4


def _table(layer):
    return value(layer.codes).astype(np.float32) * value(layer.step_sizes)


def test_dense_ids_shapes_and_values():
    layer = ALPTEmbedding(V, D, seed=0)
    table = None
    for ids in ([3, 0, 29], [[1, 2], [3, 4], [5, 6]], [[[1], [2]]]):
        out = layer(tf.constant(ids))
        table = _table(layer) if table is None else table
        assert out.shape == np.shape(ids) + (D,)
        np.testing.assert_array_equal(out.numpy(), table[np.array(ids)])
    assert value(layer.codes).dtype == np.int8
    assert not layer.codes.trainable and not layer.step_sizes.trainable


def test_whole_float_ids_are_cast_like_keras_embedding():
    layer = ALPTEmbedding(V, D, seed=0)
    out = layer(tf.constant([[1.0, 2.0]]))
    np.testing.assert_array_equal(out.numpy(), _table(layer)[[[1, 2]]])


@pytest.mark.parametrize("ids", [[[1.7, 2.0]], [[-0.5, 1.0]],
                                 [[np.nan, 1.0]]])
@pytest.mark.parametrize("jit", [False, True])
def test_non_integer_float_ids_are_refused_not_truncated(ids, jit):
    layer = ALPTEmbedding(V, D, seed=0)
    call = tf.function(layer) if jit else layer
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="float ids must be whole numbers"):
        call(tf.constant(ids, tf.float32))


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_a_non_float_layer_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match=f"Received: dtype={dtype}"):
        ALPTEmbedding(V, D, dtype=dtype)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_ragged_sparse_and_dense_combiners(combiner):
    layer = ALPTEmbedding(V, D, seed=0, combiner=combiner)
    bags = [[1, 2, 2], [7], []]
    ragged = tf.ragged.constant(bags, dtype=tf.int64)
    out_ragged = layer(ragged).numpy()
    table = _table(layer)
    expected = []
    for bag in bags:
        total = table[bag].sum(0) if bag else np.zeros(D, np.float32)
        n = max(len(bag), 1)
        expected.append({"sum": total, "mean": total / n,
                         "sqrtn": total / np.sqrt(n)}[combiner])
    np.testing.assert_allclose(out_ragged, np.stack(expected), rtol=1e-6)
    out_sparse = layer(ragged.to_sparse()).numpy()
    np.testing.assert_allclose(out_sparse, out_ragged, rtol=1e-6)
    dense = layer(tf.constant([[1, 2, 2]])).numpy()
    np.testing.assert_allclose(dense[0], expected[0], rtol=1e-6)


def test_sparse_bags_need_not_be_left_aligned():
    """A sparse row's bag is its stored values, wherever they stand and in
    whatever order the indices come (a sparse tensor from
    `tf.sparse.from_dense` has gaps; `RaggedTensor.from_sparse` refuses
    them)."""
    layer = ALPTEmbedding(V, D, seed=0, combiner="sum")
    # Row 0: ids 3 and 7 at columns 0 and 2; row 1 empty; row 2: id 5 at
    # column 3. Indices deliberately out of canonical order.
    sparse = tf.SparseTensor(indices=[[2, 3], [0, 2], [0, 0]],
                             values=tf.constant([5, 7, 3], tf.int64),
                             dense_shape=[3, 4])
    out = layer(sparse).numpy()
    table = _table(layer)
    expected = np.stack([table[3] + table[7], np.zeros(D, np.float32),
                         table[5]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="rank 2"):
        layer(tf.SparseTensor([[0, 0, 0]], tf.constant([1], tf.int64),
                              [1, 1, 1]))


def test_ragged_without_combiner_returns_ragged_rows():
    layer = ALPTEmbedding(V, D, seed=0)
    out = layer(tf.ragged.constant([[1, 2], [3]]))
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_array_equal(out.flat_values.numpy(),
                                  _table(layer)[[1, 2, 3]])


def test_combiner_gradient_reaches_rows_sparsely():
    layer = ALPTEmbedding(V, D, seed=0, combiner="mean")
    ragged = tf.ragged.constant([[1, 2, 2], [7]], dtype=tf.int64)
    upstream = tf.constant(np.arange(8, dtype=np.float32).reshape(2, D))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ragged) * upstream)
    (grad,) = tape.gradient(loss, layer.trainable_variables)
    assert isinstance(grad, tf.IndexedSlices)
    assert grad.dense_shape.numpy().tolist() == [V, D]
    dense = tf.math.unsorted_segment_sum(grad.values, grad.indices, V).numpy()
    expected = np.zeros((V, D), np.float32)
    expected[1] += upstream[0] / 3
    expected[2] += 2 * upstream[0] / 3
    expected[7] += upstream[1]
    np.testing.assert_allclose(dense, expected, rtol=1e-6)


def test_out_of_range_ids_raise_before_any_state_change():
    layer = ALPTEmbedding(V, D, seed=0)
    opt = ALPTOptimizer(keras.optimizers.SGD())
    step_layer(layer, opt, np.array([[1, 2]]), np.ones((1, 2, D), np.float32))
    before = snapshot(layer, opt)
    for bad in ([[1, V]], [[-1, 2]]):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"ids must be in \[0, input_dim=30\)"):
            step_layer(layer, opt, np.array(bad),
                       np.ones((1, 2, D), np.float32))
    after = snapshot(layer, opt)
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name


def test_out_of_range_ids_in_fit_leave_state_unchanged():
    inputs = keras.Input(shape=(2,), dtype="int64")
    layer = ALPTEmbedding(V, D, seed=0)
    model = keras.Model(inputs, keras.layers.Dense(1)(
        keras.layers.Flatten()(layer(inputs))))
    opt = ALPTOptimizer(keras.optimizers.SGD())
    model.compile(opt, "mse")
    ids = np.ones((8, 2), np.int64)
    model.fit(ids, np.zeros((8, 1)), batch_size=8, verbose=0)
    before = snapshot(layer, opt)
    ids[5, 1] = V + 5
    with pytest.raises(tf.errors.InvalidArgumentError, match="input_dim=30"):
        model.fit(ids, np.zeros((8, 1)), batch_size=8, verbose=0)
    after = snapshot(layer, opt)
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name


def test_under_xla_the_layer_refuses_clearly():
    layer = ALPTEmbedding(V, D, seed=0)
    layer.build(None)
    codes = value(layer.codes).copy()

    @tf.function(jit_compile=True)
    def lookup(ids):
        return layer(ids)

    with pytest.raises(NotImplementedError, match="XLA"):
        lookup(tf.constant([1, 2]))
    np.testing.assert_array_equal(value(layer.codes), codes)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_dim=0), ValueError, "input_dim=0"),
        (dict(input_dim=2.5), TypeError, "input_dim=2.5"),
        (dict(output_dim=-1), ValueError, "output_dim=-1"),
        (dict(num_bits=9), ValueError, "num_bits=9"),
        (dict(num_bits=1), ValueError, "num_bits=1"),
        (dict(num_bits=4.0), TypeError, "num_bits=4.0"),
        (dict(step_size="column"), ValueError, "step_size='column'"),
        (dict(rounding="nearest"), ValueError, "rounding='nearest'"),
        (dict(learn_step_size="yes"), TypeError, "learn_step_size='yes'"),
        (dict(seed="a"), TypeError, "seed='a'"),
        (dict(combiner="max"), ValueError, "combiner='max'"),
        (dict(min_step_size=0.0), ValueError, "min_step_size=0.0"),
        (dict(min_step_size="1"), TypeError, "min_step_size='1'"),
        (dict(noise_salt=1.5), TypeError, "noise_salt=1.5"),
        (dict(storage="int4"), ValueError, "storage='int4'"),
    ],
)
def test_bad_constructor_values_are_quoted(kwargs, error, message):
    """Wrong types are `TypeError`, wrong values `ValueError` (style
    guide); both quote the argument and the value received."""
    args = dict(input_dim=V, output_dim=D)
    args.update(kwargs)
    with pytest.raises(error) as info:
        ALPTEmbedding(**args)
    assert message in str(info.value)


def test_numpy_numbers_are_accepted_like_python_ones():
    layer = ALPTEmbedding(np.int64(V), np.int32(D), num_bits=np.int64(4),
                          seed=np.int64(3), min_step_size=np.float32(1e-6),
                          learn_step_size=np.bool_(True))
    assert (layer.input_dim, layer.output_dim, layer.num_bits) == (V, D, 4)
    assert all(type(x) is int for x in (layer.input_dim, layer.num_bits,
                                         layer.seed))
    assert layer.learn_step_size is True
    assert layer.get_config()["num_bits"] == 4


@pytest.mark.parametrize("block_rows", [1 << 16, 7])  # 7: 5 blocks
@pytest.mark.parametrize("step_size", ["row", "table"])
def test_initial_codes_follow_lsq_and_the_hashed_noise(
        monkeypatch, block_rows, step_size):
    from alpt_keras import embedding

    monkeypatch.setattr(embedding, "_INIT_BLOCK_ROWS", block_rows)
    init = keras.initializers.Constant(
        np.linspace(-0.01, 0.01, V * D).reshape(V, D))
    layer = ALPTEmbedding(V, D, num_bits=4, embeddings_initializer=init,
                          seed=5, name="t", step_size=step_size)
    layer.build(None)
    w0 = np.linspace(-0.01, 0.01, V * D).reshape(V, D).astype(np.float32)
    axis = (1 if step_size == "row" else None)
    step = 2 * np.abs(w0).mean(axis, keepdims=True) / np.sqrt(7)
    np.testing.assert_allclose(value(layer.step_sizes), step, rtol=1e-6)
    noise = ref.hash_uniform(5, layer.noise_salt, 0xFFFFFFFF, np.arange(V), D)
    expected = ref.quantize(w0, value(layer.step_sizes), 4, "stochastic",
                            noise)
    np.testing.assert_array_equal(value(layer.codes), expected)


def test_noise_salt_is_stable_and_distinct():
    a = ALPTEmbedding(V, D, name="user_id")
    b = ALPTEmbedding(V, D, name="item_id")
    c = ALPTEmbedding(V, D, seed=4)
    d = ALPTEmbedding(V, D, seed=4)
    assert a.noise_salt == ALPTEmbedding(V, D, name="user_id").noise_salt
    assert a.noise_salt != b.noise_salt
    assert c.noise_salt == d.noise_salt  # seeded: independent of auto names
    assert ALPTEmbedding.from_config(a.get_config()).noise_salt == \
        a.noise_salt


def test_warm_start_from_keras_embedding():
    float_layer = keras.layers.Embedding(V, D)
    float_layer.build((None,))
    table = np.random.default_rng(0).normal(0, 0.05, (V, D)).astype(
        np.float32)
    float_layer.set_weights([table])
    layer = ALPTEmbedding.from_embedding(float_layer, num_bits=8, seed=0)
    step = 2 * np.abs(table).mean(1, keepdims=True) / np.sqrt(127)
    expected_codes = ref.quantize(table, step.astype(np.float32), 8,
                                  "deterministic")
    np.testing.assert_array_equal(value(layer.codes), expected_codes)
    dequantized = layer.dequantized_table().numpy()
    inside = np.abs(table / step) < 127
    err = np.abs(dequantized - table)
    # Unclipped entries are within half a step (round half up, float32).
    assert np.all(err[inside] <= (step / 2 * 1.0001).repeat(D, 1)[inside])
    with pytest.raises(ValueError, match=r"shape \(30, 4\)"):
        layer.set_float_table(np.zeros((V, D + 1)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.set_float_table(np.full((V, D), np.nan))
    np.testing.assert_array_equal(value(layer.codes), expected_codes)


def test_get_config_round_trip():
    layer = ALPTEmbedding(V, D, num_bits=4, step_size="table",
                          rounding="deterministic", learn_step_size=False,
                          seed=3, combiner="mean", min_step_size=1e-6,
                          name="feature")
    config = layer.get_config()
    clone = ALPTEmbedding.from_config(config)
    assert clone.get_config() == config
    for key in ("num_bits", "step_size_mode", "rounding",
                "learn_step_size", "seed", "combiner", "min_step_size",
                "noise_salt"):
        assert getattr(clone, key) == getattr(layer, key)
    # The constructor argument `step_size` is the mode; `step_sizes` is Δ.
    assert config["step_size"] == clone.step_size_mode == "table"
    clone.build(None)
    assert tuple(clone.step_sizes.shape) == (1, 1)


def _trained_model(tmp_seed=0):
    inputs = keras.Input(shape=(3,), dtype="int64")
    layer = ALPTEmbedding(V, D, num_bits=4, seed=tmp_seed, name="emb")
    x = keras.layers.Flatten()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2),
                                embedding_optimizer="lazy_adam"),
                  "binary_crossentropy")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (256, 3))
    model.fit(ids, (ids[:, 0] % 2).astype("float32"), batch_size=32,
              epochs=2, verbose=0)
    return model, ids


def _optimizer_values(model):
    return [np.array(tf.convert_to_tensor(v)) for v in
            model.optimizer.variables]


def test_keras_file_round_trip(tmp_path):
    model, ids = _trained_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, ALPTOptimizer)
    emb = loaded.get_layer("emb")
    assert value(emb.codes).dtype == np.int8
    np.testing.assert_array_equal(value(emb.codes),
                                  value(model.get_layer("emb").codes))
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0),
                                  model.predict(ids, verbose=0))
    saved, restored = _optimizer_values(model), _optimizer_values(loaded)
    assert len(saved) == len(restored)
    for a, b in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_h5_round_trip(tmp_path):
    model, ids = _trained_model()
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh, _ = _trained_model(tmp_seed=1)
    assert not np.array_equal(value(fresh.get_layer("emb").codes),
                              value(model.get_layer("emb").codes))
    fresh.load_weights(path)
    np.testing.assert_array_equal(value(fresh.get_layer("emb").codes),
                                  value(model.get_layer("emb").codes))
    np.testing.assert_array_equal(fresh.predict(ids, verbose=0),
                                  model.predict(ids, verbose=0))


def test_tf_train_checkpoint_round_trip(tmp_path):
    model, ids = _trained_model()
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = ckpt.save(str(tmp_path / "ckpt"))
    fresh, _ = _trained_model(tmp_seed=1)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(
        path).assert_existing_objects_matched()
    np.testing.assert_array_equal(value(fresh.get_layer("emb").codes),
                                  value(model.get_layer("emb").codes))
    for a, b in zip(_optimizer_values(model), _optimizer_values(fresh),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # The codes are stored as int8 in the checkpoint itself.
    dtypes = tf.train.load_checkpoint(path).get_variable_to_dtype_map()
    code_entries = [n for n in dtypes if "codes" in n and "OPTIMIZER" not in n]
    assert code_entries, sorted(dtypes)
    assert all(dtypes[n] == tf.int8 for n in code_entries)


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3 only: backend check")
def test_non_tensorflow_backend_is_a_clear_error():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.run([sys.executable, "-c", "import alpt_keras"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs the TensorFlow backend" in proc.stderr
    assert "KERAS_BACKEND='numpy'" in proc.stderr
