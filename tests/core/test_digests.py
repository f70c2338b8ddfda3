"""Bitwise regression digests of 20 training steps over the option matrix.

Recorded on the code before the update core was refactored (issue 11) and
kept as a test: the same model, data and options must give the same
codes, step sizes, optimizer slots, counters and dense weights, bit for bit.
Every table optimizer, step-size rule, step-size mode, bit width, storage,
one- and two-pass step, LPT and MirroredStrategy over two logical CPUs
appear in at least one case (pairwise, not the full product, to keep CI
short).

To record again after an intended change of numbers (say why in the
commit message): `ALPT_RECORD_DIGESTS=1 python -m pytest
tests/core/test_digests.py` under each flavour.
"""

import contextlib
import hashlib
import json
import os

import numpy as np
import pytest

from alpt_keras import ALPTEmbedding, ALPTOptimizer, two_pass
from alpt_keras._keras import keras
from tests.conftest import FLAVOUR
from tests.core.helpers import replica_values, value

DIGESTS = os.path.join(os.path.dirname(__file__), "digests.json")
RECORD = os.environ.get("ALPT_RECORD_DIGESTS") == "1"
STEPS, BATCH = 20, 32

# (embedding optimizer, step-size rule, step-size mode, bits, storage,
#  step-size gradient, extra): pairwise coverage of the options.
CASES = {
    "rwada-rowwise-row-8-int8-1p": ("rowwise_adagrad", "rowwise", "row", 8,
                                    "int8", "one_pass", {}),
    "rwada-rowwise-table-4-packed-1p": ("rowwise_adagrad", "rowwise",
                                        "table", 4, "packed", "one_pass",
                                        {}),
    "ada-adam-row-2-int8-1p": ("adagrad", "adam", "row", 2, "int8",
                               "one_pass", {}),
    "ada-adagrad-table-8-packed-2p": ("adagrad", "adagrad", "table", 8,
                                      "packed", "two_pass", {}),
    "sgd-sgd-row-4-int8-2p": ("sgd", "sgd", "row", 4, "int8", "two_pass",
                              {}),
    "sgd-adam-table-2-packed-1p": ("sgd", "adam", "table", 2, "packed",
                                   "one_pass", {}),
    "adam-rowwise-row-2-packed-2p": ("lazy_adam", "rowwise", "row", 2,
                                     "packed", "two_pass", {}),
    "adam-adagrad-table-4-int8-1p": ("lazy_adam", "adagrad", "table", 4,
                                     "int8", "one_pass", {}),
    "adam-adam-row-8-int8-2p": ("lazy_adam", "adam", "row", 8, "int8",
                                "two_pass", {}),
    "rwada-sgd-table-2-int8-2p": ("rowwise_adagrad", "sgd", "table", 2,
                                  "int8", "two_pass", {}),
    "rwada-adam-row-4-packed-2p": ("rowwise_adagrad", "adam", "row", 4,
                                   "packed", "two_pass", {}),
    "ada-rowwise-row-8-packed-1p-det": ("adagrad", "rowwise", "row", 8,
                                        "packed", "one_pass",
                                        {"rounding": "deterministic"}),
    "lpt-rwada-row-4-int8-1p": ("rowwise_adagrad", "rowwise", "row", 4,
                                "int8", "one_pass",
                                {"learn_step_size": False}),
    "mirrored-rwada-rowwise-row-8-int8-1p": ("rowwise_adagrad", "rowwise",
                                             "row", 8, "int8", "one_pass",
                                             {"mirrored": True}),
    "mirrored-adam-adam-table-4-packed-2p": ("lazy_adam", "adam", "table",
                                             4, "packed", "two_pass",
                                             {"mirrored": True}),
    "mirrored-ada-rowwise-row-2-int8-2p": ("adagrad", "rowwise", "row", 2,
                                           "int8", "two_pass",
                                           {"mirrored": True}),
}
STEP_LR = {"sgd": 0.5}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    n = STEPS * BATCH
    a = rng.integers(0, 40, size=(n, 2))  # two ids per example, table A
    b = np.minimum(rng.zipf(1.5, size=n) - 1, 29)  # skewed ids, table B
    logit = np.sin(a[:, 0]) + np.cos(a[:, 1] * 0.7) + 0.1 * b - 1.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {"a": a.astype(np.int64), "b": b.astype(np.int64)}, labels


def _build(case):
    emb_opt, step_opt, mode, bits, storage, gradient, extra = case
    table_args = dict(num_bits=bits, step_size=mode, storage=storage,
                      rounding=extra.get("rounding", "stochastic"),
                      learn_step_size=extra.get("learn_step_size", True))
    keras.utils.set_random_seed(0)
    a = keras.Input((2,), dtype="int64", name="a")
    b = keras.Input((), dtype="int64", name="b")
    table_a = ALPTEmbedding(40, 8, seed=1, name="table_a", **table_args)
    table_b = ALPTEmbedding(30, 8, seed=2, name="table_b", **table_args)
    x = keras.layers.Concatenate()([
        keras.layers.Flatten()(table_a(a)), table_b(b)])
    x = keras.layers.Dense(
        4, activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=3))(x)
    out = keras.layers.Dense(
        1, activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=4))(x)
    model = keras.Model({"a": a, "b": b}, out)
    optimizer = ALPTOptimizer(
        keras.optimizers.SGD(0.05), embedding_optimizer=emb_opt,
        step_size_optimizer=step_opt,
        step_size_learning_rate=STEP_LR.get(step_opt),
        step_size_gradient=gradient)
    model.compile(optimizer, "binary_crossentropy")
    if gradient == "two_pass":
        two_pass(model)
    return model, optimizer, (table_a, table_b)


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _state(model, optimizer, tables, mirrored):
    variables = [(f"{t.name}/codes", t.codes) for t in tables]
    variables += [(f"{t.name}/step_sizes", t.step_sizes) for t in tables]
    variables += [(f"dense/{i}", v) for i, v in enumerate(
        w for w in model.trainable_weights
        if all(w is not t.gradient_carrier for t in tables))]
    # In order: `.keras` files store optimizer variables by position.
    variables += [(f"optimizer/{i}/{v.name}", v)
                  for i, v in enumerate(optimizer.variables)]
    out = {}
    for name, variable in variables:
        if mirrored:
            copies = replica_values(variable)
            assert all(c.tobytes() == copies[0].tobytes() for c in copies)
        out[name] = _digest(value(variable))
    return out


def _run(case, strategy):
    mirrored = case[-1].get("mirrored", False)
    scope = strategy.scope() if mirrored else contextlib.nullcontext()
    with scope:
        model, optimizer, tables = _build(case)
    x, y = _data()
    model(x)  # build, to read the initial codes
    initial = [_digest(value(t.codes)) for t in tables]
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(value(optimizer.table_iterations)) == STEPS
    state = _state(model, optimizer, tables, mirrored)
    # The codes moved, so the digests tell a wrong step from a right one
    # (a frozen table would match a recording of a frozen table).
    for table, before in zip(tables, initial, strict=True):
        assert state[f"{table.name}/codes"] != before, table.name
    return state


def _load():
    if not os.path.exists(DIGESTS):
        return {}
    with open(DIGESTS, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_twenty_steps_reproduce_the_recorded_digests(name,
                                                     mirrored_strategy):
    got = _run(CASES[name], mirrored_strategy)
    key = f"{FLAVOUR}/{name}"
    if RECORD:
        recorded = _load()
        recorded[key] = got
        tmp = DIGESTS + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(recorded, f, indent=1, sort_keys=True)
        os.replace(tmp, DIGESTS)
        pytest.skip(f"recorded {key}")
    want = _load().get(key)
    assert want is not None, f"no recorded digests for {key}"
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    differ = sorted(k for k in want if got[k] != want[k])
    assert not differ, f"{key}: {len(differ)} variables differ: {differ}"


def test_the_digest_comparison_can_fail(mirrored_strategy):
    """Negative control: one more step changes the digests."""
    name = "rwada-rowwise-row-8-int8-1p"
    want = _load().get(f"{FLAVOUR}/{name}")
    if want is None:
        pytest.skip("digests not recorded yet")
    model, optimizer, tables = _build(CASES[name])
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.fit({k: v[:BATCH] for k, v in x.items()}, y[:BATCH],
              batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    got = _state(model, optimizer, tables, False)
    assert got["table_a/codes"] != want["table_a/codes"]
    assert got["table_b/step_sizes"] != want["table_b/step_sizes"]
