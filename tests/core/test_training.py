"""model.fit with ALPT tables: accuracy against float32, TFRS, XLA."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import IS_KERAS_3, ALPTEmbedding, ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.dnn import build_dnn
from alpt_keras.models.synthetic import make_synthetic_ctr
from tests.core.helpers import value

FIELDS, VOCAB = 4, 300
# Float32 must reach this test AUC for the comparison to mean anything (the
# hidden click model scores 0.859 on this test split).
FLOAT32_AUC_FLOOR = 0.82


@pytest.fixture(scope="module")
def data():
    return make_synthetic_ctr(40_000, num_fields=FIELDS, vocab_size=VOCAB,
                              weight_scale=1.0, seed=0).split(0.75)


def _fit(kind, data, bits=8, epochs=3, jit_compile=None):
    train, test = data
    tf.keras.utils.set_random_seed(0)
    model = build_dnn(FIELDS, VOCAB, embedding=kind, num_bits=bits, seed=0,
                      hidden_units=(32,))
    inner = keras.optimizers.Adam(5e-3)
    optimizer = inner if kind == "float32" else ALPTOptimizer(inner)
    # Each flavour's default when None ("auto" on Keras 3; tf_keras reads
    # the string "auto" as True).
    extra = {} if jit_compile is None else {"jit_compile": jit_compile}
    model.compile(optimizer, "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")], **extra)
    model.fit(train.ids, train.labels, batch_size=256, epochs=epochs,
              verbose=0, shuffle=False)
    _, auc = model.evaluate(test.ids, test.labels, batch_size=4096,
                            verbose=0)
    return model, auc


@pytest.mark.slow
def test_alpt_matches_float32_auc_and_stays_int8(data):
    _, float_auc = _fit("float32", data)
    assert float_auc >= FLOAT32_AUC_FLOOR
    tf.keras.utils.set_random_seed(0)
    untrained = build_dnn(FIELDS, VOCAB, embedding="alpt", seed=0,
                          hidden_units=(32,)).get_layer("embedding")
    codes0, steps0 = value(untrained.codes), value(untrained.step_sizes)
    model, alpt_auc = _fit("alpt", data, bits=8)
    assert abs(alpt_auc - float_auc) <= 0.03, (alpt_auc, float_auc)
    layer = model.get_layer("embedding")
    codes = value(layer.codes)
    assert codes.dtype == np.int8
    assert np.mean(codes != codes0) > 0.5  # the table really trained
    assert np.mean(value(layer.step_sizes) != steps0) > 0.5  # and Δ moved


@pytest.mark.slow
def test_four_bit_alpt_within_reach_of_float32(data):
    _, float_auc = _fit("float32", data)
    _, alpt_auc = _fit("alpt", data, bits=4)
    assert float_auc >= FLOAT32_AUC_FLOOR
    assert abs(alpt_auc - float_auc) <= 0.03, (alpt_auc, float_auc)


def test_jit_compile_true_is_refused_or_harmless(data):
    small = tuple(part.split(0.2)[0] for part in data)
    if IS_KERAS_3:
        # Keras 3 honours `supports_jit = False`: it warns and trains without
        # XLA, so the result equals a run that never asked for XLA.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jit_model, _ = _fit("alpt", small, epochs=1, jit_compile=True)
        assert any("jit_compile" in str(w.message) for w in caught)
        assert jit_model.jit_compile is False
        plain_model, _ = _fit("alpt", small, epochs=1, jit_compile=False)
        np.testing.assert_array_equal(
            value(jit_model.get_layer("embedding").codes),
            value(plain_model.get_layer("embedding").codes))
    else:
        tf.keras.utils.set_random_seed(0)
        model = build_dnn(FIELDS, VOCAB, embedding="alpt", seed=0)
        optimizer = ALPTOptimizer(keras.optimizers.Adam())
        model.compile(optimizer, "binary_crossentropy", jit_compile=True)
        layer = model.get_layer("embedding")
        codes = value(layer.codes).copy()
        with pytest.raises(NotImplementedError, match="XLA"):
            model.fit(small[0].ids, small[0].labels, epochs=1, verbose=0)
        np.testing.assert_array_equal(value(layer.codes), codes)


def test_embedding_only_model_counts_iterations():
    """With no dense variable the inner optimizer never steps; `iterations`
    still counts steps (callbacks such as BackupAndRestore rely on it)."""
    inputs = keras.Input(shape=(2,), dtype="int64")
    emb = ALPTEmbedding(10, 1, seed=0)
    outputs = keras.layers.Flatten()(emb(inputs))
    model = keras.Model(inputs, outputs)
    optimizer = ALPTOptimizer(keras.optimizers.SGD())
    model.compile(optimizer, "mse")
    model.fit(np.ones((64, 2), np.int64), np.ones((64, 2)), batch_size=16,
              verbose=0)
    assert int(value(optimizer.iterations)) == 4
    assert int(value(optimizer.table_iterations)) == 4


@pytest.mark.skipif(IS_KERAS_3, reason="TFRS 0.7.7 needs tf_keras "
                    "(TF_USE_LEGACY_KERAS=1); runs in the tf_keras pass")
def test_tfrs_ranking_model_trains(data):
    import tensorflow_recommenders as tfrs

    train, test = data

    class CTRRanking(tfrs.Model):
        def __init__(self, embedding):
            super().__init__()
            self.embedding = embedding
            self.head = keras.Sequential([
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(1),
            ])
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.BinaryCrossentropy(from_logits=True),
                metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
            )

        def call(self, features, training=False):
            rows = self.embedding(features["ids"], training=training)
            return self.head(tf.reshape(rows, [-1, FIELDS * 16]))

        def compute_loss(self, features, training=False):
            logits = self(features, training=training)
            return self.task(labels=features["label"], predictions=logits,
                             training=training)

    def dataset(split):
        return tf.data.Dataset.from_tensor_slices(
            {"ids": split.ids, "label": split.labels[:, None]}).batch(256)

    results = {}
    for kind in ("float32", "alpt"):
        tf.keras.utils.set_random_seed(0)
        if kind == "float32":
            embedding = keras.layers.Embedding(
                VOCAB, 16, embeddings_initializer=keras.initializers
                .RandomNormal(stddev=0.003, seed=0))
            optimizer = keras.optimizers.Adam(5e-3)
        else:
            embedding = ALPTEmbedding(VOCAB, 16, seed=0, name="ids")
            optimizer = ALPTOptimizer(keras.optimizers.Adam(5e-3))
        model = CTRRanking(embedding)
        model.compile(optimizer=optimizer)
        model.fit(dataset(train), epochs=3, verbose=0)
        results[kind] = model.evaluate(dataset(test), return_dict=True,
                                       verbose=0)["auc"]
        if kind == "alpt":
            assert value(embedding.codes).dtype == np.int8
            assert int(value(optimizer.table_iterations)) == 3 * 118
    assert results["float32"] >= FLOAT32_AUC_FLOOR
    assert abs(results["alpt"] - results["float32"]) <= 0.03, results
