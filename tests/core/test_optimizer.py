"""ALPTOptimizer: one full step against the NumPy reference, and guards."""

import gc

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer
from alpt_keras._keras import keras
from tests import reference as ref
from tests.core.helpers import (
    assert_bitwise_equal,
    assert_codes_match,
    optimizer_state,
    snapshot,
    step_layer,
    value,
)

V, D = 50, 8
# Learning rates that move rows by several codes per step.
LR = {"rowwise_adagrad": 0.01, "adagrad": 0.01, "sgd": 2.0, "lazy_adam": 1e-3}


def _batches(steps=3, batch=16, fields=3, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, 20, size=(batch, fields))  # many duplicates
        upstream = rng.normal(0, 0.01, size=(batch, fields, D))
        yield ids.astype(np.int64), upstream.astype(np.float32)


def _compare_state(table, opt, tref, uniq):
    state = optimizer_state(opt)

    def slot(suffix):
        matches = [v for k, v in state.items()
                   if k.split("/")[-1].split(":")[0] == f"{table}_{suffix}"]
        assert len(matches) == 1, (suffix, list(state))
        return matches[0]

    # rtol 1e-5: float32 reductions (mean of g², per-table Δ sums) are
    # summed in a different order by TF and NumPy.
    tol = dict(rtol=1e-5, atol=1e-12)
    if tref.emb_opt in ("rowwise_adagrad", "adagrad"):
        np.testing.assert_allclose(slot("accumulator"), tref.acc, **tol)
    if tref.emb_opt == "lazy_adam":
        np.testing.assert_allclose(slot("m"), tref.m, **tol)
        np.testing.assert_allclose(slot("v"), tref.v, **tol)
    # Δ's gradient Σ_j g_ij (R_D(v) - v) cancels: an ulp of difference in
    # w' moves each term, so compare against the slot's own scale.
    def close_to_scale(actual, desired):
        scale = np.abs(desired).max()
        np.testing.assert_allclose(actual, desired, rtol=1e-5,
                                   atol=1e-3 * scale)

    if tref.learn and tref.step_opt == "adam":
        close_to_scale(slot("step_size_m"), tref.sm)
        close_to_scale(slot("step_size_v"), tref.sv)
    if tref.learn and tref.step_opt in ("adagrad", "rowwise"):
        close_to_scale(slot("step_size_accumulator"), tref.sacc)


STEP_LR = {"rowwise": 0.03, "sgd": 0.1}  # adam/adagrad: 2e-5 row, 1e-6 table


def _run_against_reference(emb_opt, bits, step_size, step_opt="rowwise",
                           rounding="stochastic", learn=True):
    layer = ALPTEmbedding(V, D, num_bits=bits, step_size=step_size,
                          rounding=rounding, learn_step_size=learn, seed=3,
                          name="table")
    step_lr = STEP_LR.get(step_opt, 2e-5 if step_size == "row" else 1e-6)
    opt = ALPTOptimizer(keras.optimizers.SGD(0.1), embedding_optimizer=emb_opt,
                        embedding_learning_rate=LR[emb_opt],
                        step_size_optimizer=step_opt,
                        step_size_learning_rate=None if step_opt != "sgd"
                        else step_lr)
    layer.build(None)
    tref = ref.TableRef(
        value(layer.codes), value(layer.step_sizes), bits,
        per_row=step_size == "row", learn=learn, rounding=rounding, seed=3,
        salt=layer.noise_salt, emb_opt=emb_opt, step_opt=step_opt,
        lr=LR[emb_opt], step_lr=step_lr)
    step0 = value(layer.step_sizes).copy()
    for ids, upstream in _batches():
        previous_step = tref.step.copy()
        step_layer(layer, opt, ids, upstream)
        uniq, (scaled, noise) = tref.apply(ids.ravel(),
                                           upstream.reshape(-1, D))
        got = value(layer.codes)
        got_step = value(layer.step_sizes)
        rows = uniq if step_size == "row" else slice(None)
        step_error = np.abs(got_step[rows] / tref.step[rows] - 1)
        assert_codes_match(got[uniq], tref.codes[uniq], scaled, noise,
                            rounding, step_error)
        tref.codes[uniq] = got[uniq]  # keep comparing from identical codes
        np.testing.assert_array_equal(np.delete(got, uniq, 0),
                                      np.delete(tref.codes, uniq, 0))
        # Δ's gradient cancels (see _compare_state): allow 1e-3 of this
        # step's largest Δ update on top of rtol 1e-5.
        update = np.abs(tref.step - previous_step).max()
        np.testing.assert_allclose(value(layer.step_sizes), tref.step,
                                   rtol=1e-5, atol=1e-3 * update)
        _compare_state("table", opt, tref, uniq)
    assert int(value(opt.table_iterations)) == 3
    assert value(layer.codes).dtype == np.int8
    return step0, value(layer.step_sizes)


@pytest.mark.parametrize("step_size", ["row", "table"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("emb_opt",
                         ["rowwise_adagrad", "adagrad", "sgd", "lazy_adam"])
def test_one_step_matches_numpy_reference(emb_opt, bits, step_size):
    step0, step3 = _run_against_reference(emb_opt, bits, step_size)
    # ALPT: Δ moved under the default step-size learning rate.
    assert np.mean(step3 != step0) > 0.3


@pytest.mark.parametrize("step_size", ["row", "table"])
@pytest.mark.parametrize("step_opt", ["adam", "adagrad", "sgd"])
def test_step_size_optimizers_match_reference(step_opt, step_size):
    step0, step3 = _run_against_reference("rowwise_adagrad", 8, step_size,
                                          step_opt=step_opt)
    assert np.mean(step3 != step0) > 0.3


def test_lpt_deterministic_matches_reference_and_keeps_step():
    step0, step3 = _run_against_reference(
        "rowwise_adagrad", 4, "row", rounding="deterministic", learn=False)
    np.testing.assert_array_equal(step0, step3)


def test_default_settings_move_step_sizes_in_training():
    """ALPT must not silently degrade into LPT with the defaults."""
    layer = ALPTEmbedding(200, 16, seed=0)
    opt = ALPTOptimizer(keras.optimizers.Adam())
    layer.build(None)
    before = value(layer.step_sizes).copy()
    rng = np.random.default_rng(0)
    touched = set()
    for _ in range(20):
        # CTR-sized gradients: the mean loss over a large batch gives tiny
        # per-row gradients, so LSQ's γ makes Δ's gradient ~1e-9.
        ids = rng.integers(0, 200, size=(256, 4))
        upstream = rng.normal(0, 1e-5, size=(256, 4, 16)).astype(np.float32)
        step_layer(layer, opt, ids, upstream)
        touched.update(ids.ravel().tolist())
    after = value(layer.step_sizes)
    rows = sorted(touched)
    rel = np.abs(after[rows] / before[rows] - 1)
    assert np.mean(after[rows] != before[rows]) > 0.99
    assert np.median(rel) > 1e-3


def test_non_finite_gradient_skips_table_update_bitwise():
    layer = ALPTEmbedding(V, D, seed=1)
    opt = ALPTOptimizer(keras.optimizers.SGD(0.1),
                        embedding_optimizer="lazy_adam")
    ids, upstream = next(_batches())
    step_layer(layer, opt, ids, upstream)
    before = snapshot(layer, opt)
    for bad in (np.nan, np.inf):
        poisoned = upstream.copy()
        poisoned[0, 0, 0] = bad
        step_layer(layer, opt, ids, poisoned)
        assert_bitwise_equal(
            {k: v for k, v in before.items() if "skipped" not in k},
            {k: v for k, v in snapshot(layer, opt).items()
             if "skipped" not in k})
    assert int(value(opt.skipped_table_updates)) == 2
    assert int(value(opt.table_iterations)) == 1
    step_layer(layer, opt, ids, upstream)  # a finite step applies again
    assert int(value(opt.table_iterations)) == 2
    assert not np.array_equal(value(layer.codes), before["codes"])


def test_plain_optimizer_gets_clear_error():
    gc.collect()  # no unbuilt ALPTOptimizer from earlier tests may linger
    inputs = keras.Input(shape=(2,), dtype="int64")
    layer = ALPTEmbedding(10, 4, seed=0)
    x = keras.layers.Flatten()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(keras.optimizers.Adam(), "mse")
    codes, steps = value(layer.codes).copy(), value(layer.step_sizes).copy()
    ids = np.zeros((8, 2), np.int64)
    with pytest.raises(TypeError, match="ALPTOptimizer"):
        model.fit(ids, np.zeros((8, 1)), epochs=1, verbose=0)
    assert value(layer.codes).tobytes() == codes.tobytes()
    assert value(layer.step_sizes).tobytes() == steps.tobytes()


def test_wrapper_argument_validation():
    inner = keras.optimizers.Adam()
    cases = [
        (dict(embedding_optimizer="adam"), ValueError, "embedding_optimizer"),
        (dict(step_size_optimizer="rmsprop"), ValueError,
         "step_size_optimizer='rmsprop'"),
        (dict(embedding_learning_rate=-1.0), ValueError,
         "embedding_learning_rate=-1.0"),
        (dict(beta_1=1.0), ValueError, "beta_1=1.0"),
        (dict(epsilon=0), ValueError, "epsilon=0"),
        (dict(clipnorm=1.0), TypeError, "clipnorm"),
        (dict(step_size_optimizer="sgd"), ValueError,
         "step_size_learning_rate=None"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ALPTOptimizer(inner, **kwargs)
    with pytest.raises(TypeError, match="inner_optimizer"):
        ALPTOptimizer("adam")
    with pytest.raises(ValueError, match="another ALPTOptimizer"):
        ALPTOptimizer(ALPTOptimizer(inner))


def test_loss_scale_optimizer_inside_is_refused_clearly():
    """Inside, the table gradients would stay scaled; the message says how
    to wrap it (outside: tests/core/test_mixed_precision.py)."""
    if hasattr(keras.optimizers, "LossScaleOptimizer"):
        lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    else:
        lso = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD())
    with pytest.raises(NotImplementedError, match=r"Wrap it the other way, "
                       r"`keras.mixed_precision.LossScaleOptimizer\("
                       r"ALPTOptimizer"):
        ALPTOptimizer(lso)


def test_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    opt = ALPTOptimizer(keras.optimizers.Adam(schedule, clipnorm=1.0),
                        embedding_optimizer="lazy_adam",
                        embedding_learning_rate=3e-3,
                        step_size_optimizer="adagrad",
                        step_size_learning_rate=1e-5, epsilon=1e-7)
    config = opt.get_config()
    clone = ALPTOptimizer.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.inner_optimizer, type(opt.inner_optimizer))
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, ALPTOptimizer)
    assert restored.get_config() == config


def test_inner_schedule_and_clipnorm_apply_to_dense_variables():
    """Dense variables follow the inner optimizer exactly (schedule, clip)."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [1.0,
                                                                       0.1])
    dense_ref = tf.Variable([[1.0, 2.0]])
    dense = tf.Variable([[1.0, 2.0]])
    plain = keras.optimizers.SGD(schedule, clipnorm=0.5)
    wrapped = ALPTOptimizer(keras.optimizers.SGD(schedule, clipnorm=0.5))
    for _ in range(3):
        grad = tf.constant([[3.0, 4.0]])
        plain.apply_gradients([(grad, dense_ref)])
        wrapped.apply_gradients([(grad, dense)])
    np.testing.assert_allclose(dense.numpy(), dense_ref.numpy(), rtol=1e-6)
    assert int(wrapped.iterations.numpy()) == 3


def test_minimize_exists_exactly_where_the_flavour_has_it():
    opt = ALPTOptimizer(keras.optimizers.SGD())
    has_minimize = hasattr(keras.optimizers.SGD(), "minimize")
    assert hasattr(opt, "minimize") == has_minimize
    if not has_minimize:  # Keras 3
        return
    layer = ALPTEmbedding(V, D, seed=0)
    ids = tf.constant([[1, 2]])
    layer(ids)
    codes = value(layer.codes).copy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids, training=True))
    opt.minimize(loss, layer.trainable_variables, tape=tape)
    assert int(value(opt.table_iterations)) == 1
    assert not np.array_equal(value(layer.codes)[[1, 2]], codes[[1, 2]])
