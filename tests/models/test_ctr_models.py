"""The CTR models train with float32, LPT and ALPT tables and round-trip."""

import numpy as np
import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import IS_KERAS_3, ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.ctr_models import SUPPORTED_MODELS, build_ctr_model
from alpt_keras.models.feature_embedding import FeatureEmbedding
from alpt_keras.models.features import (
    FeatureConfig,
    TableConfig,
    simple_features,
)
from alpt_keras.models.layers import MLP
from alpt_keras.models.synthetic import make_synthetic_ctr

NAMES = ["f0", "f1", "f2", "f3"]
VOCAB = 100


@pytest.fixture(scope="module")
def data():
    d = make_synthetic_ctr(6000, num_fields=4, vocab_size=VOCAB, seed=0)
    train, test = d.split(0.8)

    def as_dict(split):
        return {n: split.ids[:, i] for i, n in enumerate(NAMES)}

    return as_dict(train), train.labels, as_dict(test), test.labels


def _optimizer(kind):
    inner = keras.optimizers.Adam(1e-2)
    return inner if kind == "float32" else ALPTOptimizer(inner)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["float32", "lpt", "alpt"])
@pytest.mark.parametrize("model_name", SUPPORTED_MODELS)
def test_model_trains_and_round_trips(model_name, kind, data, tmp_path):
    x, y, x_test, y_test = data
    tf.keras.utils.set_random_seed(0)
    features = simple_features({n: VOCAB for n in NAMES}, embedding_dim=8,
                               kind=kind, num_bits=4)
    model = build_ctr_model(features, model=model_name, hidden_units=(16,))
    model.compile(_optimizer(kind), "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    model.fit(x, y, batch_size=256, epochs=2, verbose=0)
    _, auc = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    # The hidden click model scores ~0.86 here; chance is 0.5.
    assert auc > 0.7, auc
    if kind != "float32":
        (table,) = alpt_keras.tables(model.get_layer("embedding"))
        assert tf.as_dtype(table.codes.dtype) == tf.int8
        assert table.spec.num_tables == len(NAMES)  # stacked by default
    path = str(tmp_path / f"{model_name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    # Same weights through the same graph: equal up to float32 op order.
    np.testing.assert_allclose(loaded.predict(x_test, verbose=0),
                               model.predict(x_test, verbose=0),
                               rtol=1e-5, atol=1e-7)


def test_multi_hot_features_and_shared_tables():
    genres = TableConfig("genre", 20, 8, kind="alpt", seed=1)
    features = [
        FeatureConfig("user", TableConfig("user", 50, 8, seed=2)),
        FeatureConfig("genres", genres, max_ids=3, combiner="mean"),
        FeatureConfig("main_genre", genres),
    ]
    layer = FeatureEmbedding(features)
    out = layer({
        "user": tf.constant([1, 2]),
        "genres": tf.constant([[1, 2, -1], [-1, -1, -1]]),
        "main_genre": tf.constant([1, 5]),
    })
    assert out.shape == (2, 3, 8)
    assert len(layer.tables) == 2  # "genre" is shared
    table = layer.table_for("genres").dequantized_table().numpy()
    np.testing.assert_allclose(out[0, 1], (table[1] + table[2]) / 2,
                               rtol=1e-6)
    np.testing.assert_array_equal(out[1, 1], np.zeros(8))  # empty bag
    np.testing.assert_array_equal(out[0, 2], table[1])
    interior = layer({"user": tf.constant([1]),
                      "genres": tf.constant([[-1, 2, -1]]),
                      "main_genre": tf.constant([1])})
    np.testing.assert_allclose(interior[0, 1], table[2], rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="input_dim=20"):
        layer({"user": tf.constant([1]), "genres": tf.constant([[-2, 2, 3]]),
               "main_genre": tf.constant([1])})
    with pytest.raises(ValueError, match=r"Missing features \['user'\]"):
        layer({"genres": tf.constant([[1, 2, -1]]),
               "main_genre": tf.constant([1])})


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="kind='fp16'"):
        TableConfig("t", 10, kind="fp16")
    with pytest.raises(ValueError, match="vocabulary_size=0"):
        TableConfig("t", 0)
    with pytest.raises(ValueError, match="num_bits=1"):
        TableConfig("t", 10, num_bits=1)
    with pytest.raises(ValueError, match="max_ids=0"):
        FeatureConfig("f", TableConfig("t", 10), max_ids=0)
    with pytest.raises(ValueError, match="model='xdeepfm'"):
        build_ctr_model(simple_features({"a": 3}), model="xdeepfm")
    shared = TableConfig("t", 10)
    with pytest.raises(ValueError, match="same TableConfig"):
        FeatureEmbedding([FeatureConfig("a", shared),
                          FeatureConfig("b", TableConfig("t", 11))])
    feature = FeatureConfig("g", TableConfig("t", 10, 4, "lpt", 2,
                                             "deterministic", "table", 3),
                            max_ids=5, combiner="sqrtn")
    assert FeatureConfig.from_config(feature.get_config()) == feature
    layer = FeatureEmbedding([feature])
    clone = FeatureEmbedding.from_config(layer.get_config())
    assert clone.features == layer.features
    mlp = MLP([8, 4], batch_norm=True, dropout=0.1)
    assert MLP.from_config(mlp.get_config()).get_config() == mlp.get_config()


@pytest.mark.skipif(IS_KERAS_3, reason="TFRS 0.7.7 needs tf_keras "
                    "(TF_USE_LEGACY_KERAS=1); runs in the tf_keras pass")
def test_tfrs_ranking_model_from_parts(data):
    import tensorflow_recommenders as tfrs

    x, y, x_test, y_test = data

    class Ranking(tfrs.Model):
        def __init__(self, features):
            super().__init__()
            self.embedding = FeatureEmbedding(features)
            self.mlp = MLP([16])
            self.logit = keras.layers.Dense(1)
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.BinaryCrossentropy(from_logits=True),
                metrics=[keras.metrics.AUC(from_logits=True, name="auc")])

        def call(self, features, training=False):
            rows = self.embedding(features, training=training)
            flat = tf.reshape(rows, [-1, rows.shape[1] * rows.shape[2]])
            return self.logit(self.mlp(flat, training=training))

        def compute_loss(self, batch, training=False):
            features, labels = batch
            return self.task(labels=labels[:, None],
                             predictions=self(features, training=training))

    model = Ranking(simple_features({n: VOCAB for n in NAMES},
                                    embedding_dim=8))
    model.compile(optimizer=ALPTOptimizer(keras.optimizers.Adam(1e-2)))
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(256)
    model.fit(train, epochs=2, verbose=0)
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(1024)
    auc = model.evaluate(test, return_dict=True, verbose=0)["auc"]
    assert auc > 0.7, auc
