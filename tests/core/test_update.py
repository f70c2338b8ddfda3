"""The pure update core (`alpt_keras.update`), checked directly: against
the NumPy reference, for purity, for its float contract and its specs."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import ALPTEmbedding, update
from alpt_keras._keras import keras
from tests import reference as ref
from tests.core.helpers import assert_codes_match

U, D = 24, 8
STEP = 3  # bias corrections and noise at a step other than 0
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def column_sum_reference(x):
    """The documented CPU order of `tf.reduce_sum(x, axis=-1)` (see
    `alpt_keras/update/step.py`, "Reduction order"), in NumPy float32."""
    x = np.asarray(x, np.float32)
    rows, width = x.shape
    blocks = width // 8
    scalar = np.zeros(rows, np.float32)
    for j in range(8 * blocks, width):
        scalar = scalar + x[:, j]
    if blocks == 0:
        return scalar
    interleaved = (blocks // 4) * 4
    acc = [np.zeros((rows, 8), np.float32) for _ in range(4)]
    for k in range(0, interleaved, 4):
        for a in range(4):
            acc[a] = acc[a] + x[:, 8 * (k + a):8 * (k + a + 1)]
    lanes = ((acc[0] + acc[1]) + acc[2]) + acc[3] if interleaved else acc[0]
    for k in range(interleaved, blocks):
        lanes = lanes + x[:, 8 * k:8 * (k + 1)]
    half = lanes[:, :4] + lanes[:, 4:]
    quarter = half[:, :2] + half[:, 2:]
    return scalar + (quarter[:, 0] + quarter[:, 1])


@pytest.mark.parametrize("width", list(range(1, 71)))
def test_column_reductions_follow_the_documented_order(width):
    """Bitwise: a native kernel that follows the documented order gets the
    stock path's bits. Fails if TensorFlow's CPU reduction order changes
    (e.g. a build with wider vector registers)."""
    rng = np.random.default_rng(width)
    x = (rng.normal(size=(4000, width))
         * rng.lognormal(size=(4000, 1))).astype(np.float32)
    want = column_sum_reference(x)
    got_sum = tf.reduce_sum(x, axis=-1).numpy()
    got_mean = tf.reduce_mean(x, axis=-1).numpy()
    assert got_sum.tobytes() == want.tobytes()
    assert got_mean.tobytes() == (want / np.float32(width)).tobytes()
    # Negative control: plain left-to-right order differs from 4 columns on.
    if width >= 8:
        sequential = np.zeros(4000, np.float32)
        for j in range(width):
            sequential = sequential + x[:, j]
        assert sequential.tobytes() != want.tobytes()


STEP_LR = {"rowwise": 0.03, "sgd": 0.1, "adam": 2e-3, "adagrad": 2e-3}
EMB_LR = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 2.0,
          "lazy_adam": 0.01}


def _inputs(emb_opt, step_opt, mode, bits, seed=0):
    rng = np.random.default_rng(seed)
    low, high = ref.code_range(bits)
    codes = rng.integers(low, high + 1, size=(U, D)).astype(np.int32)
    rows = U if mode == "row" else 1
    step = rng.uniform(0.01, 0.02, size=(rows, 1)).astype(np.float32)
    grads = rng.normal(0, 0.05, size=(U, D)).astype(np.float32)
    state = {
        "accumulator": rng.uniform(0, 0.01, size=(
            U, D if emb_opt == "adagrad" else 1)).astype(np.float32),
        "m": rng.normal(0, 0.01, size=(U, D)).astype(np.float32),
        "v": rng.uniform(0, 1e-3, size=(U, D)).astype(np.float32),
        "step_size_m": rng.normal(0, 1e-3, (rows, 1)).astype(np.float32),
        "step_size_v": rng.uniform(0, 1e-5, (rows, 1)).astype(np.float32),
        "step_size_accumulator": rng.uniform(0, 1e-3, (rows, 1)).astype(
            np.float32),
    }
    return codes, step, grads, state


@pytest.mark.parametrize("emb_opt", sorted(update.TABLE_RULES))
@pytest.mark.parametrize("step_opt", sorted(update.STEP_SIZE_RULES))
@pytest.mark.parametrize("mode, bits", [("row", 4), ("table", 8)])
def test_table_step_matches_the_numpy_reference(emb_opt, step_opt, mode,
                                                bits):
    codes, step, grads, state = _inputs(emb_opt, step_opt, mode, bits)
    spec = update.TableSpec(U, D, num_bits=bits, step_size_mode=mode,
                            seed=5, salt=77)
    table_rule = update.get_table_rule(emb_opt)
    step_rule = update.get_step_size_rule(step_opt)
    out = update.table_step(
        tf.constant(codes), tf.constant(step), tf.constant(grads),
        {s.name: tf.constant(state[s.name]) for s in table_rule.slots},
        {s.name: tf.constant(state[s.name]) for s in step_rule.slots},
        tf.constant(STEP, tf.int64), tf.range(U, dtype=tf.int64), spec,
        table_rule, update.Hyperparameters(EMB_LR[emb_opt]),
        step_rule, update.Hyperparameters(STEP_LR[step_opt],
                                          epsilon=1e-12))
    tref = ref.TableRef(codes, step, bits, mode == "row", True,
                        "stochastic", 5, 77, emb_opt, step_opt,
                        EMB_LR[emb_opt], STEP_LR[step_opt])
    tref.t = STEP
    tref.acc[...] = state["accumulator"]
    tref.m[...], tref.v[...] = state["m"], state["v"]
    tref.sm[...], tref.sv[...] = state["step_size_m"], state["step_size_v"]
    tref.sacc[...] = state["step_size_accumulator"]
    _, (scaled, noise) = tref.apply(np.arange(U), grads)

    # rtol 1e-5: TF and NumPy sum `mean_j g²` and LSQ's Σ_j in different
    # orders (see the reduction-order test); Δ's gradient cancels, so its
    # state is compared to the state's own scale.
    new_step = out.step_size.numpy()
    np.testing.assert_allclose(new_step, tref.step, rtol=1e-5)
    step_error = float(np.max(np.abs(new_step / tref.step - 1)))
    assert_codes_match(out.codes.numpy(), tref.codes, scaled, noise,
                       "stochastic", step_error)
    assert not np.array_equal(out.codes.numpy(), codes), "nothing moved"

    expected = {"accumulator": tref.acc, "m": tref.m, "v": tref.v,
                "step_size_m": tref.sm, "step_size_v": tref.sv,
                "step_size_accumulator": tref.sacc}
    assert set(out.state) == {s.name for s in table_rule.slots
                              + step_rule.slots}
    for name, value in out.state.items():
        if isinstance(value, update.Increment):
            # Additive state: value = old + increment, bitwise.
            np.testing.assert_array_equal(
                value.value.numpy(), state[name] + value.increment.numpy())
            value = value.value
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-5,
                                   atol=1e-3 * scale)


def test_learning_rates_and_step_size_drive_the_result():
    """Negative control for the reference test: another learning rate
    gives other rows."""
    codes, step, grads, state = _inputs("sgd", "sgd", "row", 8)
    spec = update.TableSpec(U, D)
    rule = update.get_table_rule("sgd")

    def rows(lr):
        return update.row_update(tf.constant(codes), tf.constant(step),
                                 tf.constant(grads), {}, tf.constant(0),
                                 rule, update.Hyperparameters(lr))

    a, b = rows(1.0), rows(2.0)
    assert not np.allclose(a.new_weights.numpy(), b.new_weights.numpy())
    np.testing.assert_array_equal(a.weights.numpy(),
                                  codes.astype(np.float32) * step)
    assert spec.num_shared == D


def test_a_skipped_step_size_update_keeps_delta_and_state_bitwise():
    codes, step, grads, state = _inputs("rowwise_adagrad", "rowwise", "row",
                                        4)
    spec = update.TableSpec(U, D, num_bits=4, seed=1, salt=2)
    rule = update.get_step_size_rule("rowwise")
    old = {"step_size_accumulator": tf.constant(
        state["step_size_accumulator"])}
    new_weights = tf.constant(codes * step * np.float32(1.3), tf.float32)
    args = (new_weights, tf.constant(step), tf.constant(grads), old,
            tf.constant(STEP, tf.int64), tf.range(U, dtype=tf.int64), spec,
            rule, update.Hyperparameters(0.03, epsilon=1e-12))
    kept = update.step_size_update(*args, update_step_size=tf.constant(False))
    moved = update.step_size_update(*args, update_step_size=tf.constant(True))
    assert kept.step_size.numpy().tobytes() == step.tobytes()
    increment = kept.state["step_size_accumulator"].increment.numpy()
    assert not increment.any()
    assert moved.step_size.numpy().tobytes() != step.tobytes()
    # The codes are requantized with the kept Δ.
    want = update.requantize(new_weights, tf.constant(step),
                             tf.range(U, dtype=tf.int64),
                             tf.constant(STEP, tf.int64), spec)
    np.testing.assert_array_equal(kept.codes.numpy(), want.numpy())


def test_lpt_tables_keep_delta_and_have_no_step_size_state():
    codes, step, grads, _ = _inputs("sgd", "rowwise", "row", 8)
    spec = update.TableSpec(U, D, learn_step_size=False)
    out = update.step_size_update(
        tf.constant(codes * step, tf.float32), tf.constant(step),
        tf.constant(grads), {},
        tf.constant(0, tf.int64), tf.range(U, dtype=tf.int64), spec, None,
        None)
    assert out.state == {}
    assert out.step_size.numpy().tobytes() == step.tobytes()


def test_the_step_functions_read_and_write_no_variable():
    """Pure: the traced graph of a whole step holds no variable op."""
    spec = update.TableSpec(U, D, num_bits=4)
    table_rule = update.get_table_rule("lazy_adam")
    step_rule = update.get_step_size_rule("adam")
    f32 = tf.TensorSpec([None, D], tf.float32)
    column = tf.TensorSpec([None, 1], tf.float32)

    @tf.function(input_signature=[
        tf.TensorSpec([None, D], tf.int32), column, f32, f32, f32, column,
        column, tf.TensorSpec([], tf.int64), tf.TensorSpec([None], tf.int64)])
    def step(codes, delta, grads, m, v, sm, sv, t, ids):
        return update.table_step(
            codes, delta, grads, {"m": m, "v": v},
            {"step_size_m": sm, "step_size_v": sv}, t, ids, spec,
            table_rule, update.Hyperparameters(1e-3), step_rule,
            update.Hyperparameters(2e-5, epsilon=1e-12))

    graph = step.get_concrete_function().graph
    ops = {op.type for op in graph.get_operations()}
    assert ops, "nothing traced"
    stateful = {t for t in ops if "Variable" in t or t.startswith(
        ("Resource", "Assign"))}
    assert not stateful, stateful
    assert "Floor" in ops  # the rounding is in there


def test_rule_specs_bytes_and_registry():
    assert {name: rule.bytes_per_row(16) for name, rule in
            update.TABLE_RULES.items()} == {
        "rowwise_adagrad": 4, "adagrad": 64, "sgd": 0, "lazy_adam": 128}
    assert {name: rule.bytes_per_step_size() for name, rule in
            update.STEP_SIZE_RULES.items()} == {
        "rowwise": 4, "adam": 8, "adagrad": 4, "sgd": 0}
    with pytest.raises(ValueError, match=r"embedding_optimizer='adamw'"):
        update.get_table_rule("adamw")
    with pytest.raises(ValueError, match=r"one of \('rowwise', 'adam'"):
        update.get_step_size_rule("lion")
    assert alpt_keras.optimizer.SUPPORTED_EMBEDDING_OPTIMIZERS == tuple(
        update.TABLE_RULES)


def test_optimizer_state_bytes_come_from_the_specs():
    layer = ALPTEmbedding(100, 16, name="t")
    layer.build(None)
    for emb, step_rule, per_row in [("rowwise_adagrad", "rowwise", 4 + 4),
                                    ("lazy_adam", "adam", 128 + 8),
                                    ("sgd", "sgd", 0)]:
        opt = alpt_keras.ALPTOptimizer(
            keras.optimizers.SGD(), embedding_optimizer=emb,
            step_size_optimizer=step_rule, step_size_learning_rate=0.1)
        opt.build(layer.trainable_variables)
        (table,) = alpt_keras.tables(layer)
        created = sum(int(np.prod(v.shape)) * 4
                      for v in opt.table_slots(table).values())
        assert opt.state_bytes(table.spec) == created == 100 * per_row


def test_readme_optimizer_tables_are_generated_from_the_specs():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- rules:begin -->\n(.*?)\n<!-- rules:end -->",
                      text, flags=re.S)
    assert block is not None
    assert block.group(1) == update.rules_markdown()


def test_tables_are_found_by_tag_not_by_name():
    ids = keras.Input((), dtype="int64", name="x")
    alpt = ALPTEmbedding(10, 4, name="not_an_embedding")
    floats = keras.layers.Embedding(10, 4, name="codes")  # a misleading name
    out = keras.layers.Concatenate()([alpt(ids), floats(ids)])
    model = keras.Model(ids, out)
    found = alpt_keras.tables(model)
    assert [t.name for t in found] == ["not_an_embedding"]
    assert found[0].codes is alpt.codes and found[0].layer is alpt
    model.trainable = False  # the carrier is no longer trainable
    assert [t.name for t in alpt_keras.tables(model)] == ["not_an_embedding"]
