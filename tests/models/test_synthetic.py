"""The synthetic CTR generator: reproducible, learnable, known optimum."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.ctr_models import build_ctr_model
from alpt_keras.models.features import simple_features
from alpt_keras.models.synthetic import make_synthetic_ctr


def test_same_seed_same_data_and_field_sizes():
    a = make_synthetic_ctr(500, num_fields=3, vocab_size=[5, 100, 7],
                           zipf_exponent=1.3, seed=4)
    b = make_synthetic_ctr(500, num_fields=3, vocab_size=[5, 100, 7],
                           zipf_exponent=1.3, seed=4)
    c = make_synthetic_ctr(500, num_fields=3, vocab_size=[5, 100, 7],
                           zipf_exponent=1.3, seed=5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.ids, c.ids)
    assert (a.ids.max(axis=0) < [5, 100, 7]).all() and a.ids.min() >= 0
    # Power law: id 0 of the wide field is far more frequent than id 50.
    assert np.sum(a.ids[:, 1] == 0) > 10 * max(1, np.sum(a.ids[:, 1] == 50))
    for bad, message in [(dict(vocab_size=[5, 5]), "vocab_size"),
                         (dict(vocab_size=1), "vocab_size=1"),
                         (dict(zipf_exponent=1.0), "zipf_exponent=1.0"),
                         (dict(num_examples=0), "num_examples=0")]:
        args = dict(num_examples=10, num_fields=3)
        args.update(bad)
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            make_synthetic_ctr(**args)


def test_hidden_metrics_match_brute_force():
    d = make_synthetic_ctr(300, num_fields=2, vocab_size=4, seed=0)
    p, y = d.probabilities.astype(np.float64), d.labels.astype(bool)
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    metrics = d.hidden_metrics()
    np.testing.assert_allclose(metrics["auc"], pairs.mean(), rtol=1e-12)
    logloss = -np.mean(np.where(y, np.log(p), np.log(1 - p)))
    np.testing.assert_allclose(metrics["logloss"], logloss, rtol=1e-6)


@pytest.mark.slow
def test_alpt_model_gets_within_003_of_the_hidden_model():
    train, test = make_synthetic_ctr(40_000, num_fields=4, vocab_size=300,
                                     seed=0).split(0.75)
    best = test.hidden_metrics()["auc"]
    tf.keras.utils.set_random_seed(0)
    model = build_ctr_model(simple_features({f"f{i}": 300 for i in range(4)}),
                            model="dnn", hidden_units=(32,), batch_norm=False)
    model.compile(ALPTOptimizer(keras.optimizers.Adam(5e-3)),
                  "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    model.fit(train.features(), train.labels, batch_size=256, epochs=3,
              verbose=0)
    _, auc = model.evaluate(test.features(), test.labels, batch_size=4096,
                            verbose=0)
    assert best - auc <= 0.03, (auc, best)
