"""Packed sub-byte storage: bit layout, equivalence with int8, checkpoints."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.storage import (
    PackedStorage,
    host_is_little_endian,
    integer_bytes,
    pack_codes,
    unpack_codes,
    unpack_fields,
    words_per_row,
)
from tests.core.helpers import step_layer, value

V, D = 50, 16


def _pack_reference(codes, num_bits):
    """NumPy packing, bit by bit: code j of a row occupies bits
    [j·b, j·b + b) of the row's little-endian bit string, as c + 2^(b-1)."""
    rows, dim = codes.shape
    words = np.zeros((rows, words_per_row(dim, num_bits)), np.uint32)
    unsigned = codes.astype(np.int64) + (1 << (num_bits - 1))
    for j in range(dim):
        for bit in range(num_bits):
            position = j * num_bits + bit
            on = ((unsigned[:, j] >> bit) & 1).astype(np.uint32)
            words[:, position // 32] |= on << np.uint32(position % 32)
    return words.view(np.int32)


@pytest.mark.parametrize("num_bits", range(2, 9))
@pytest.mark.parametrize("dim", [1, 3, 16, 17, 33])
def test_pack_matches_the_bitwise_reference_and_round_trips(num_bits, dim):
    rng = np.random.default_rng(num_bits * 100 + dim)
    low, high = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
    codes = rng.integers(low, high + 1, (40, dim))
    codes[0, :] = low  # the extremes, including all-ones fields
    codes[1, :] = high
    words = pack_codes(codes, num_bits)
    assert words.dtype == tf.int32
    np.testing.assert_array_equal(words.numpy(),
                                  _pack_reference(codes, num_bits))
    back = unpack_codes(words, num_bits, dim)
    assert back.shape.as_list()[-1] == dim  # static, for Dense layers
    np.testing.assert_array_equal(back.numpy(), codes)


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_fields_and_float_codes_are_the_stored_values(num_bits):
    # The serving lookup's path (`read_rows_float`: fields spread into bytes
    # and cast once) against the bit-by-bit reference, exactly.
    rng = np.random.default_rng(num_bits)
    low = -(1 << (num_bits - 1))
    codes = rng.integers(low, -low, (40, 33))
    codes[0], codes[1] = low, -low - 1
    words = _pack_reference(codes, num_bits)
    fields = unpack_fields(words, num_bits, 33)
    assert fields.dtype == tf.uint8 and fields.shape.as_list()[-1] == 33
    np.testing.assert_array_equal(fields.numpy(), codes - low)
    variable = tf.Variable(words)
    storage = PackedStorage(variable, num_bits, 33)
    ids = tf.constant([5, 0, 1, 39, 5])
    floats = storage.read_rows_float(ids)
    assert floats.dtype == tf.float32
    np.testing.assert_array_equal(floats.numpy(), codes[ids.numpy()])
    with pytest.raises(ValueError, match="num_bits=3"):
        unpack_fields(words, 3, 33)


def test_byte_order_is_decided_on_the_serving_host():
    # `integer_bytes` gives bytes lowest-first on either byte order. A
    # big-endian host is emulated by byte-swapped values: their memory here
    # is what the original values' memory is there.
    assert bool(host_is_little_endian()) == (sys.byteorder == "little")
    x = np.array([[0x0706050403020100, 0x0F0E0D0C0B0A0908]], np.int64)
    expected = np.arange(16, dtype=np.uint8).reshape(1, 2, 8)
    here = sys.byteorder == "little"
    np.testing.assert_array_equal(integer_bytes(x).numpy(), expected)
    np.testing.assert_array_equal(integer_bytes(x, here).numpy(), expected)
    swapped = x.byteswap()
    for predicate in (not here, tf.constant(not here)):  # bool and tf.cond
        np.testing.assert_array_equal(
            integer_bytes(swapped, predicate).numpy(), expected)
    graph_cond = tf.function(lambda v, little: integer_bytes(v, little))
    np.testing.assert_array_equal(
        graph_cond(swapped, tf.constant(not here)).numpy(), expected)
    # Negative control: the wrong order does not decode.
    assert not np.array_equal(integer_bytes(swapped, here).numpy(), expected)


def test_known_bit_layout():
    # 8-bit codes [-128, 127, 0, 1] -> bytes 0x00, 0xFF, 0x80, 0x81, the
    # first code in the lowest byte.
    words = pack_codes(np.array([[-128, 127, 0, 1]]), 8).numpy()
    assert words.view(np.uint32)[0, 0] == 0x8180FF00


@pytest.mark.parametrize("num_bits, bytes_per_code", [(8, 1.0), (4, 0.5),
                                                      (2, 0.25)])
def test_code_variable_takes_the_packed_size(num_bits, bytes_per_code):
    layer = ALPTEmbedding(V, D, num_bits=num_bits, storage="packed", seed=0)
    layer.build()
    codes = layer.codes
    nbytes = value(codes).nbytes
    assert tf.as_dtype(codes.dtype) == tf.int32
    assert tuple(codes.shape) == (V, D * num_bits // 32)
    assert nbytes == V * D * bytes_per_code


@pytest.mark.parametrize("num_bits", [8, 4, 2, 3])
@pytest.mark.parametrize("emb_opt", ["rowwise_adagrad", "lazy_adam"])
def test_packed_trains_to_the_same_codes_as_int8(num_bits, emb_opt):
    layers, optimizers = {}, {}
    for storage in ("int8", "packed"):
        layers[storage] = ALPTEmbedding(V, D, num_bits=num_bits, seed=3,
                                        storage=storage, name="t")
        optimizers[storage] = ALPTOptimizer(
            keras.optimizers.SGD(0.1), embedding_optimizer=emb_opt)
    rng = np.random.default_rng(0)
    for _ in range(6):
        ids = tf.constant(rng.integers(0, V, (32, 3)))
        upstream = tf.constant(rng.normal(size=(32, 3, D)), tf.float32)
        for storage in layers:
            step_layer(layers[storage], optimizers[storage], ids, upstream)
    int8, packed = layers["int8"], layers["packed"]
    # Bitwise: both storages run the same float ops on the same rows.
    np.testing.assert_array_equal(packed.unpacked_codes().numpy(),
                                  value(int8.codes))
    np.testing.assert_array_equal(value(packed.step_sizes),
                                  value(int8.step_sizes))
    assert not np.array_equal(value(int8.codes), _initial_codes(num_bits))
    ids = tf.constant(rng.integers(0, V, (8, 2)))
    np.testing.assert_array_equal(packed(ids, training=False).numpy(),
                                  int8(ids, training=False).numpy())


def _initial_codes(num_bits):
    layer = ALPTEmbedding(V, D, num_bits=num_bits, seed=3, name="t")
    layer.build()
    return value(layer.codes)


def _model(storage, num_bits=4, seed=3):
    inputs = keras.Input((2,), dtype="int64")
    x = ALPTEmbedding(V, D, num_bits=num_bits, seed=seed, storage=storage,
                      name="emb")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2)), "mse")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (128, 2))
    model.fit(ids, rng.normal(size=(128, 1)), batch_size=32, verbose=0)
    return model, ids


@pytest.mark.parametrize("source, target", [("int8", "packed"),
                                            ("packed", "int8")])
def test_weights_h5_converts_between_storages(tmp_path, source, target):
    model, ids = _model(source)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh, _ = _model(target, seed=4)
    before = fresh.get_layer("emb").unpacked_codes().numpy()
    expected = model.get_layer("emb").unpacked_codes().numpy()
    assert not np.array_equal(before, expected)
    fresh.load_weights(path)
    np.testing.assert_array_equal(
        fresh.get_layer("emb").unpacked_codes().numpy(), expected)
    np.testing.assert_array_equal(fresh.predict(ids, verbose=0),
                                  model.predict(ids, verbose=0))


def test_keras_file_with_packed_storage_round_trips(tmp_path):
    model, ids = _model("packed", num_bits=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    emb = loaded.get_layer("emb")
    assert emb.storage == "packed" and emb.num_bits == 2
    np.testing.assert_array_equal(value(emb.codes),
                                  value(model.get_layer("emb").codes))
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0),
                                  model.predict(ids, verbose=0))


def test_out_of_range_int8_codes_are_refused_without_changes(tmp_path):
    model, _ = _model("int8", num_bits=8)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)  # 8-bit codes do not fit a 4-bit table
    fresh, _ = _model("packed", num_bits=4, seed=4)
    before = value(fresh.get_layer("emb").codes)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        fresh.load_weights(path)
    np.testing.assert_array_equal(value(fresh.get_layer("emb").codes),
                                  before)


def test_float_interface_works_on_packed_tables():
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (V, D)).astype(np.float32)
    int8 = ALPTEmbedding(V, D, num_bits=4)
    packed = ALPTEmbedding(V, D, num_bits=4, storage="packed")
    for layer in (int8, packed):
        layer.build()
        layer.set_float_table(table)
    np.testing.assert_array_equal(packed.dequantized_table().numpy(),
                                  int8.dequantized_table().numpy())
    assert np.abs(packed.dequantized_table().numpy() - table).max() < 0.05


def test_bad_storage_is_quoted():
    with pytest.raises(ValueError, match="storage='int4'"):
        ALPTEmbedding(V, D, storage="int4")
