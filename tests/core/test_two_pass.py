"""The paper-exact two-pass ALPT step: NumPy reference, inference-mode
second pass, hook wiring (subclass, functional, tfrs.Model), strategies."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer, TwoPassTrainStep, two_pass
from alpt_keras._keras import IS_KERAS_3, keras
from tests import reference as ref
from tests.core.helpers import assert_codes_match, replica_values, value

V, D, F, B = 12, 4, 3, 8
EMB_LR, DENSE_LR = 2.0, 0.1
STEP_LR = {"sgd": 0.5, "rowwise": 0.03}


class SubclassedModel(TwoPassTrainStep, keras.Model):
    def __init__(self, embedding, dense):
        super().__init__()
        self.embedding = embedding
        self.flatten = keras.layers.Flatten()
        self.dense = dense

    def call(self, ids, training=None):
        return self.dense(self.flatten(self.embedding(ids)))


def _kernel():
    return np.random.default_rng(1).normal(0, 0.5, (F * D, 1)).astype(
        np.float32)


def _build(kind, bits, step_opt, gradient="two_pass", learn=True):
    keras.utils.set_random_seed(0)
    embedding = ALPTEmbedding(
        V, D, num_bits=bits, seed=3, name="table", learn_step_size=learn,
        embeddings_initializer=keras.initializers.RandomUniform(-1, 1, seed=0))
    dense = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(_kernel()))
    if kind == "subclass":
        model = SubclassedModel(embedding, dense)
    else:
        ids = keras.Input((F,), dtype="int32")
        model = keras.Model(ids, dense(keras.layers.Flatten()(embedding(ids))))
        two_pass(model)
    optimizer = ALPTOptimizer(
        keras.optimizers.SGD(DENSE_LR), embedding_optimizer="sgd",
        embedding_learning_rate=EMB_LR, step_size_optimizer=step_opt,
        step_size_learning_rate=STEP_LR[step_opt],
        step_size_gradient=gradient)
    model.compile(optimizer, loss="mse")
    model(np.zeros((1, F), np.int32))
    return model, embedding, dense


def _batches(steps=3, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, V, size=(B, F)).astype(np.int32)
        y = rng.normal(0, 1, size=(B, 1)).astype(np.float32)
        yield ids, y


class _DenseRef:
    """Embedding → Flatten → Dense(1) → MSE in float32 NumPy."""

    def __init__(self, kernel, bias):
        self.kernel, self.bias = kernel.copy(), bias.copy()

    def grads(self, rows, y):
        """rows (B, F, D) → (dL/d rows, dL/d kernel, dL/d bias)."""
        x = rows.reshape(B, F * D)
        residual = x @ self.kernel + self.bias - y
        dp = (np.float32(2.0 / B) * residual).astype(np.float32)
        return ((dp @ self.kernel.T).reshape(B * F, D), x.T @ dp,
                dp.sum(axis=0))


@pytest.mark.parametrize("kind", ["subclass", "functional"])
@pytest.mark.parametrize("bits, step_opt", [(4, "sgd"), (8, "rowwise"),
                                            (2, "sgd")])
def test_two_pass_step_matches_numpy_reference(kind, bits, step_opt):
    model, embedding, dense = _build(kind, bits, step_opt)
    tref = ref.TableRef(
        value(embedding.codes), value(embedding.step_sizes), bits,
        per_row=True, learn=True, rounding="stochastic", seed=3,
        salt=embedding.noise_salt, emb_opt="sgd", step_opt=step_opt,
        lr=EMB_LR, step_lr=STEP_LR[step_opt])
    one_pass = ref.TableRef(
        value(embedding.codes), value(embedding.step_sizes), bits,
        per_row=True, learn=True, rounding="stochastic", seed=3,
        salt=embedding.noise_salt, emb_opt="sgd", step_opt=step_opt,
        lr=EMB_LR, step_lr=STEP_LR[step_opt])
    net = _DenseRef(value(dense.kernel), value(dense.bias))
    differs = []
    for ids, y in _batches():
        rows = tref.codes[ids] * tref.step[ids]  # (B, F, D)
        g_rows, g_kernel, g_bias = net.grads(rows.astype(np.float32), y)
        # Pass 2 sees the already-updated dense layer.
        net.kernel = net.kernel - np.float32(DENSE_LR) * g_kernel
        net.bias = net.bias - np.float32(DENSE_LR) * g_bias

        def second_pass(uniq, fake, ids=ids, y=y):
            table = (tref.codes * tref.step).astype(np.float32)
            table[uniq] = fake
            return net.grads(table[ids], y)[0]

        one_pass.codes, one_pass.step = tref.codes.copy(), tref.step.copy()
        one_pass.sacc = tref.sacc.copy()
        one_pass.t = tref.t
        one_pass.apply(ids.ravel(), g_rows)
        previous_step = tref.step.copy()
        uniq, (scaled, noise) = tref.apply(ids.ravel(), g_rows, second_pass)

        model.train_on_batch(ids, y)
        got_step = value(embedding.step_sizes)
        step_error = np.abs(got_step[uniq] / tref.step[uniq] - 1)
        got = value(embedding.codes).astype(np.int32)
        assert_codes_match(got[uniq], tref.codes[uniq], scaled, noise,
                           "stochastic", step_error)
        # Untouched rows keep their codes exactly.
        np.testing.assert_array_equal(np.delete(got, uniq, 0),
                                      np.delete(tref.codes, uniq, 0))
        # Δ's gradient sums terms that cancel (see test_optimizer): 1e-3 of
        # this step's largest Δ update on top of float32 rtol 1e-5.
        update = np.abs(tref.step - previous_step).max()
        np.testing.assert_allclose(got_step, tref.step, rtol=1e-5,
                                   atol=1e-3 * update)
        # rtol 1e-5: float32 matmuls summed in a different order.
        np.testing.assert_allclose(value(dense.kernel), net.kernel,
                                   rtol=1e-5, atol=1e-6)
        differs.append(np.abs(one_pass.step[uniq] - tref.step[uniq])
                       / update)
        tref.codes[uniq] = got[uniq]  # keep comparing from identical codes
    # The quadratic loss makes ĝ differ from g: the one-pass form would
    # have learned different step sizes, by far more than the tolerance
    # above (1e-3 of the step's largest Δ update).
    print("median |one-pass Δ - two-pass Δ| / update:",
          np.median(np.concatenate(differs)))
    assert np.median(np.concatenate(differs)) > 0.05
    assert int(value(model.optimizer.table_iterations)) == 3


def _bn_model(gradient):
    keras.utils.set_random_seed(0)
    ids = keras.Input((F,), dtype="int32")
    x = ALPTEmbedding(V, D, num_bits=4, seed=3, name="table")(ids)
    x = keras.layers.Flatten()(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.5, seed=1)(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = two_pass(keras.Model(ids, out))
    model.compile(
        ALPTOptimizer(keras.optimizers.Adam(1e-2),
                      step_size_optimizer="sgd", step_size_learning_rate=1.0,
                      step_size_gradient=gradient),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")])
    return model


def test_second_pass_runs_in_inference_mode():
    """BatchNorm statistics and metrics after a two-pass step equal those
    of a one-pass step from the same start: pass 2 touched neither."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(32, F)).astype(np.int32)
    y = rng.integers(0, 2, size=(32, 1)).astype(np.float32)
    results = {}
    for gradient in ("one_pass", "two_pass"):
        model = _bn_model(gradient)
        logs = model.train_on_batch(ids, y, return_dict=True)
        bn = model.get_layer("bn")
        metric_state = [value(v) for m in model.metrics for v in m.variables]
        results[gradient] = dict(
            logs=logs, mean=value(bn.moving_mean),
            var=value(bn.moving_variance), metrics=metric_state,
            step=value(model.get_layer("table").step_sizes))
    one, two = results["one_pass"], results["two_pass"]
    np.testing.assert_array_equal(two["mean"], one["mean"])
    np.testing.assert_array_equal(two["var"], one["var"])
    assert len(two["metrics"]) == len(one["metrics"]) > 0
    for a, b in zip(two["metrics"], one["metrics"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert two["logs"] == one["logs"]
    # ...while Δ did learn something else from the second pass.
    assert np.any(two["step"] != one["step"])


def test_lpt_tables_have_no_second_pass():
    """Δ fixed: a two-pass optimizer trains bitwise like a one-pass one."""
    codes = {}
    for gradient in ("one_pass", "two_pass"):
        model, embedding, _ = _build("functional", 4, "sgd", gradient,
                                     learn=False)
        for ids, y in _batches():
            model.train_on_batch(ids, y)
        assert model.optimizer.pending_carriers == []
        codes[gradient] = value(embedding.codes)
    np.testing.assert_array_equal(codes["two_pass"], codes["one_pass"])


def test_two_pass_without_the_hook_is_a_clear_error():
    keras.utils.set_random_seed(0)
    ids = keras.Input((F,), dtype="int32")
    out = keras.layers.Dense(1)(keras.layers.Flatten()(
        ALPTEmbedding(V, D, num_bits=4, name="table")(ids)))
    model = keras.Model(ids, out)
    model.compile(ALPTOptimizer(keras.optimizers.SGD(0.1),
                                step_size_gradient="two_pass"), loss="mse")
    with pytest.raises(RuntimeError, match="TwoPassTrainStep"):
        model.train_on_batch(np.zeros((4, F), np.int32),
                             np.zeros((4, 1), np.float32))


def test_two_pass_argument_and_misuse_errors():
    with pytest.raises(ValueError, match="step_size_gradient='three'"):
        ALPTOptimizer(keras.optimizers.SGD(), step_size_gradient="three")
    optimizer = ALPTOptimizer(keras.optimizers.SGD(),
                              step_size_gradient="two_pass")
    assert optimizer.get_config()["step_size_gradient"] == "two_pass"
    assert ALPTOptimizer.from_config(
        optimizer.get_config()).step_size_gradient == "two_pass"
    with pytest.raises(RuntimeError, match="no two-pass step is waiting"):
        optimizer.apply_step_size_gradients([])


def test_one_pass_model_with_the_hook_is_a_plain_train_step():
    """The mixin costs nothing in one-pass mode: bitwise the same run."""
    codes = []
    for kind in ("subclass", "functional"):
        model, embedding, _ = _build(kind, 4, "sgd", "one_pass")
        for ids, y in _batches():
            model.train_on_batch(ids, y)
        codes.append(value(embedding.codes))
    np.testing.assert_array_equal(codes[0], codes[1])


def test_two_pass_under_mirrored_strategy(mirrored_strategy):
    """Two replicas: bit-identical copies, and the same Δ as one device on
    the same global batches (float32 summation order aside)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(64, F)).astype(np.int32)
    y = rng.normal(0, 1, size=(64, 1)).astype(np.float32)
    steps = {}
    for name, strategy in (("one", None), ("mirrored", mirrored_strategy)):
        if strategy is None:
            model, embedding, _ = _build("subclass", 8, "rowwise")
        else:
            with strategy.scope():
                model, embedding, _ = _build("subclass", 8, "rowwise")
        model.fit(ids, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        if strategy is not None:
            for variable in (embedding.codes, embedding.step_sizes):
                copies = replica_values(variable)
                assert copies[0].tobytes() == copies[1].tobytes()
        steps[name] = value(embedding.step_sizes)
        assert int(value(model.optimizer.table_iterations)) == 4
    # rtol 1e-4: 4 steps of float32 sums in a different order (per replica
    # then across replicas); a lost or doubled replica gradient would
    # change Δ by far more.
    np.testing.assert_allclose(steps["mirrored"], steps["one"], rtol=1e-4)
    assert np.any(steps["one"] != value(_build("subclass", 8, "rowwise")[1]
                                        .step_sizes))


@pytest.mark.skipif(IS_KERAS_3, reason="TFRS needs tf_keras")
def test_tfrs_model_with_two_pass_step_trains():
    import tensorflow_recommenders as tfrs

    class Ranker(TwoPassTrainStep, tfrs.Model):
        def __init__(self):
            super().__init__()
            self.embedding = ALPTEmbedding(V, D, num_bits=4, seed=3,
                                           name="table")
            self.head = keras.Sequential([keras.layers.Flatten(),
                                          keras.layers.Dense(1)])
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.MeanSquaredError(),
                metrics=[keras.metrics.RootMeanSquaredError(name="rmse")])

        def call(self, ids, training=None):
            return self.head(self.embedding(ids, training=training))

        def compute_loss(self, inputs, training=False):
            ids, y = inputs
            return self.task(labels=y, predictions=self(ids,
                                                        training=training))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(64, F)).astype(np.int32)
    y = rng.normal(0, 1, size=(64, 1)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((ids, y)).batch(16)
    runs = {}
    for gradient in ("one_pass", "two_pass"):
        keras.utils.set_random_seed(0)
        model = Ranker()
        model.compile(ALPTOptimizer(keras.optimizers.SGD(0.1),
                                    step_size_optimizer="sgd",
                                    step_size_learning_rate=1.0,
                                    step_size_gradient=gradient))
        model(ids[:1])  # build
        step0 = value(model.embedding.step_sizes)
        history = model.fit(data, epochs=1, verbose=0)
        runs[gradient] = dict(
            step0=step0, step=value(model.embedding.step_sizes),
            rmse_count=value(model.task._ranking_metrics[0].count),
            rmse=history.history["rmse"][-1],
            iterations=int(value(model.optimizer.table_iterations)))
    one, two = runs["one_pass"], runs["two_pass"]
    assert two["iterations"] == one["iterations"] == 4
    # The second pass updated no metric: 64 examples counted once.
    assert two["rmse_count"] == one["rmse_count"] == 64
    assert np.mean(two["step"] != two["step0"]) > 0.3  # Δ learned
    assert np.any(two["step"] != one["step"])          # from ĝ, not g
    np.testing.assert_array_equal(two["step0"], one["step0"])


def test_two_pass_optimizer_saves_and_loads_like_one_pass(tmp_path):
    """The bookkeeping between the passes never becomes optimizer state:
    same variables as one pass, and a `.keras` file restores all of them."""
    counts = {}
    for gradient in ("one_pass", "two_pass"):
        model, embedding, _ = _build("functional", 4, "sgd", gradient)
        for ids, y in _batches(steps=1):
            model.train_on_batch(ids, y)
        counts[gradient] = len(model.optimizer.variables)
    assert counts["two_pass"] == counts["one_pass"]
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.step_size_gradient == "two_pass"
    for saved, restored in zip(model.optimizer.variables,
                               loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(value(saved), value(restored))
    np.testing.assert_array_equal(value(loaded.get_layer("table").codes),
                                  value(embedding.codes))
