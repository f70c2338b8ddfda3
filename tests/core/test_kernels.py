"""Native CPU kernels (issue 15): bitwise the stock ops they replace, built
atomically on first use, and a clean fallback without a compiler."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTOptimizer, kernels
from alpt_keras._keras import keras
from tests.core import test_group

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

needs_compiler = pytest.mark.skipif(
    kernels.compiler() is None, reason="no C++ compiler on this machine")


@pytest.fixture(scope="module")
def library():
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    return kernels.load("native")


def _stock(ids, values):
    unique, positions = tf.unique(ids)
    return unique, positions, tf.math.unsorted_segment_sum(
        values, positions, tf.shape(unique)[0])


def _inputs():
    """name -> (ids [N] int64, values [N, D] float32)."""
    rng = np.random.default_rng(0)
    zipf = (rng.zipf(1.2, 20_000) % 5_000).astype("int64")
    awkward = rng.standard_normal((12, 3)).astype("float32")
    # -0.0 alone in a segment (stock: +0.0 + -0.0 = +0.0), NaN, ±Inf,
    # and the int64 extremes as ids.
    awkward[0] = [-0.0, np.nan, np.inf]
    awkward[5] = [-0.0, -np.inf, 1e38]
    awkward[7] = [1e38, 1.0, -0.0]
    return {
        "zipf_d16": (zipf, rng.standard_normal((20_000, 16)).astype(
            "float32")),
        "awkward": (np.array([7, -1, 2**63 - 1, -2**63, 7, 0, 3, 7, -1, 0,
                              5, 2**63 - 1], "int64"), awkward),
        "one_column": (zipf[:500], rng.standard_normal((500, 1)).astype(
            "float32")),
        "empty": (np.zeros([0], "int64"), np.zeros([0, 4], "float32")),
        "all_distinct": (np.arange(1000, 0, -1).astype("int64"),
                         rng.standard_normal((1000, 5)).astype("float32")),
    }


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_unique_segment_sum_is_bitwise_the_stock_ops(library, name):
    ids, values = _inputs()[name]
    want = _stock(tf.constant(ids), tf.constant(values))
    got = kernels.unique_segment_sum(library, tf.constant(ids),
                                     tf.constant(values))
    for w, g, what in zip(want, got, ("unique ids", "positions", "sums"),
                          strict=True):
        w, g = w.numpy(), g.numpy()
        assert (w.dtype, w.shape) == (g.dtype, g.shape), what
        # Bitwise: NaN payloads, signed zeros and rounding included.
        assert w.tobytes() == g.tobytes(), what


def test_the_bitwise_comparison_can_fail(library):
    """Negative control: the same sums in another order (rows reversed)
    differ in some bit, so the comparisons above can tell orders apart."""
    ids, values = _inputs()["zipf_d16"]
    _, _, want = _stock(tf.constant(ids), tf.constant(values))
    _, _, reversed_sums = kernels.unique_segment_sum(
        library, tf.constant(ids[::-1]), tf.constant(values[::-1]))
    # Same segments (the reversed ids' unique order differs: realign).
    unique_fwd = tf.unique(tf.constant(ids))[0].numpy()
    unique_rev = tf.unique(tf.constant(ids[::-1]))[0].numpy()
    order = {u: i for i, u in enumerate(unique_rev)}
    realigned = reversed_sums.numpy()[[order[u] for u in unique_fwd]]
    np.testing.assert_allclose(realigned, want.numpy(), rtol=1e-4,
                               atol=1e-4)
    assert realigned.tobytes() != want.numpy().tobytes()


def test_bad_shapes_are_refused(library):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="values must be|Dimension|shape"):
        library.alpt_unique_segment_sum(
            tf.constant([1, 2], tf.int64), tf.zeros([3, 4]))


def _train_step_ops(mode, monkeypatch):
    monkeypatch.setenv(kernels.ENV, mode)
    table = ALPTEmbedding(50, 4, seed=0, name="t")
    optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))
    ids = tf.constant([[1, 2], [2, 3]], tf.int64)
    table(ids)
    optimizer.build(table.trainable_variables)

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(table(ids, training=True))
        variables = table.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                      variables, strict=True))

    graph = step.get_concrete_function(ids).graph.as_graph_def()
    # The step's ops and those of its functions (cond branches).
    return [n.op for n in graph.node] + [
        n.op for f in graph.library.function for n in f.node_def]


@needs_compiler
def test_the_training_step_uses_the_kernel_only_when_asked(monkeypatch):
    native = _train_step_ops("native", monkeypatch)
    assert "AlptUniqueSegmentSum" in native
    assert "Unique" not in native and "UnsortedSegmentSum" not in native
    # The fused step reads and writes the rows in place, and the training
    # lookup is one fused gather.
    assert native.count("AlptTableStep") == 1
    assert not {"ResourceScatterUpdate", "ResourceScatterAdd"} & set(native)
    assert native.count("AlptGatherDequantize") == 1
    assert "ResourceGather" not in native
    stock = _train_step_ops("stock", monkeypatch)
    assert not {"AlptUniqueSegmentSum", "AlptTableStep",
                "AlptGatherDequantize"} & set(stock)
    assert "Unique" in stock and "UnsortedSegmentSum" in stock
    assert "ResourceScatterUpdate" in stock


# `tests/core/test_group.py`'s cases, plus cases for the fused table
# step: 2-bit packed codes with deterministic rounding, and every table
# optimizer and step-size rule with per-row Δ in one pass.
TRAINING_CASES = {
    **test_group.CASES,
    "rwada-row-2-packed-1p-deterministic": (
        "rowwise_adagrad", "rowwise", "row", 2, "packed", "one_pass",
        {"rounding": "deterministic"}),
    "adam-row-4-int8-1p": ("lazy_adam", "adam", "row", 4, "int8",
                           "one_pass", {}),
    "adagrad-row-8-packed-1p": ("adagrad", "adagrad", "row", 8, "packed",
                                "one_pass", {}),
    "sgd-row-4-packed-1p": ("sgd", "sgd", "row", 4, "packed", "one_pass",
                            {"step_size_learning_rate": 1e-3}),
}


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINING_CASES))
def test_kernel_and_stock_paths_train_bitwise_alike(name, monkeypatch,
                                                    mirrored_strategy):
    """20 steps of `TRAINING_CASES` (8/4/2 bits, int8 and packed, row-wise
    Adagrad and lazy Adam, per-row and per-table Δ, one- and two-pass, a
    shared table, MirroredStrategy over 2 CPUs), stacked and, for the
    first case, as separate tables: codes, Δ, every slot, dense weights
    and counters are bitwise equal. The fused table step runs the cases
    with per-row Δ and a one-pass step; the fused lookup runs all but
    stacked per-table Δ."""
    case = TRAINING_CASES[name]
    emb_opt, _, step_size, _, _, gradient, extra = case
    fused_step = step_size == "row" and (
        gradient == "one_pass" or not extra.get("learn_step_size", True))
    layouts = (True, False) if name == sorted(TRAINING_CASES)[0] \
        else (True,)
    used = {"fused_table_step": [], "gather_dequantize": []}

    def spy(real, calls):
        def traced(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(out is not None)
            return out
        return traced

    for function, calls in used.items():  # which fused ops were traced
        monkeypatch.setattr(kernels, function,
                            spy(getattr(kernels, function), calls))
    for stacked in layouts:
        results = {}
        for mode in ("native", "stock"):
            monkeypatch.setenv(kernels.ENV, mode)
            keras.backend.clear_session()
            for calls in used.values():
                calls.clear()
            results[mode] = test_group._run(case, stacked, mirrored_strategy)
            if mode == "native":
                # The comparison is not vacuous: the kernels ran.
                assert any(used["fused_table_step"]) == fused_step
                assert any(used["gather_dequantize"]) == (
                    step_size == "row" or not stacked)
            else:
                assert not any(used["fused_table_step"]) and not any(
                    used["gather_dequantize"])
        (before, native), (_, stock) = results["native"], results["stock"]
        differ = sorted(k for k in native
                        if native[k].tobytes() != stock[k].tobytes())
        assert not differ, f"{name} (stacked={stacked}): {differ}"
        assert int(native["table_iterations"]) == test_group.STEPS
        moved = [k for k in before if k.endswith("/codes")
                 and before[k].tobytes() != native[k].tobytes()]
        assert moved, "the tables did not train"


def _python(code, env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
        text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})


TRAIN = """
    import json, warnings
    import numpy as np
    import alpt_keras
    from alpt_keras import ALPTEmbedding, ALPTOptimizer, kernels
    from alpt_keras.compat import keras
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = keras.Input(shape=(2,), dtype="int64")
        out = keras.layers.Dense(1)(keras.layers.Flatten()(
            ALPTEmbedding(20, 4, seed=0, name="t")(ids)))
        model = keras.Model(ids, out)
        model.compile(ALPTOptimizer(keras.optimizers.SGD(0.1)), "mse")
        x = np.arange(64).reshape(32, 2) % 20
        model.fit(x, np.zeros(32), batch_size=8, epochs=2, verbose=0)
    print(json.dumps({
        "steps": int(model.optimizer.iterations.numpy()),
        "warnings": [str(w.message) for w in caught
                     if "native kernels" in str(w.message)]}))
"""


def test_no_compiler_falls_back_to_stock_ops_with_one_warning(tmp_path):
    """A machine without a compiler (CXX names none, empty cache): training
    runs on the stock ops, after exactly one warning."""
    env = {"CXX": str(tmp_path / "no-such-compiler"),
           kernels.CACHE_ENV: str(tmp_path / "cache"), kernels.ENV: "auto"}
    proc = _python(TRAIN, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 8
    assert len(result["warnings"]) == 1, result
    assert "no C++ compiler" in result["warnings"][0]
    assert not os.listdir(tmp_path / "cache") if (
        tmp_path / "cache").exists() else True


def test_native_without_compiler_is_a_clear_error(tmp_path):
    env = {"CXX": str(tmp_path / "no-such-compiler"),
           kernels.CACHE_ENV: str(tmp_path / "cache"),
           kernels.ENV: "native"}
    proc = _python(TRAIN, env)
    assert proc.returncode != 0
    assert "native kernels were required" in proc.stderr
    assert "no C++ compiler" in proc.stderr


@needs_compiler
def test_concurrent_first_builds_share_one_library(tmp_path):
    """Two processes building into one empty cache at once: both load the
    same library; no temporary file is left behind."""
    code = """
        from alpt_keras import kernels
        import tensorflow as tf
        path = kernels.build()
        tf.load_op_library(path)
        print(path)
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           kernels.CACHE_ENV: str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith(".so")] == \
        [os.path.basename(paths.pop())]
    assert not [f for f in files if f.endswith(".tmp")]


def test_modes_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="`kernels` must be one of"):
        ALPTOptimizer(keras.optimizers.SGD(), kernels="fast")
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="ALPT_KERNELS='fast'"):
        kernels.resolve("auto")
    assert kernels.resolve("stock") == "stock"  # the argument wins
    optimizer = ALPTOptimizer(keras.optimizers.SGD(), kernels="stock")
    assert ALPTOptimizer.from_config(optimizer.get_config()).kernels == \
        "stock"


def test_parameter_server_and_gpu_tables_take_the_stock_path():
    class ParameterServerStrategyV2:  # the name is what is checked
        pass

    assert not kernels.usable_here(ParameterServerStrategyV2())
    assert kernels.usable_here(tf.distribute.get_strategy()) == (
        not tf.config.list_logical_devices("GPU"))


# ------------------------------------------- the fused one-pass table step
# (bits, storage, D, rounding, learn Δ, logical tables, min_step_size):
# every bit width, both storages, codes straddling packed words (3, 5, 6,
# 7 bits), widths that exercise each part of the column-reduction order
# (1, 5, 9, 16, 37 = 4 interleaved blocks + 5, 70), groups of 1-3 tables,
# LPT, and a Δ floor that binds.
FUSED_CASES = {
    "8-int8-d16-3tables": (8, "int8", 16, "stochastic", True, 3, 1e-8),
    "4-packed-d16": (4, "packed", 16, "stochastic", True, 1, 1e-8),
    "2-packed-d5-deterministic": (2, "packed", 5, "deterministic", True, 2,
                                  1e-8),
    "3-packed-d37-2tables": (3, "packed", 37, "stochastic", True, 2, 1e-8),
    "5-packed-d70-lpt": (5, "packed", 70, "stochastic", False, 1, 1e-8),
    "7-int8-d1": (7, "int8", 1, "stochastic", True, 1, 1e-8),
    "6-packed-d9-3tables-floor": (6, "packed", 9, "stochastic", True, 3,
                                  0.02),
    "8-packed-d16": (8, "packed", 16, "stochastic", True, 2, 1e-8),
}


# (table optimizer, step-size rule) pairs: every rule of each kind, and
# each with more than one partner.
RULE_PAIRS = [("rowwise_adagrad", "rowwise"), ("adagrad", "adagrad"),
              ("sgd", "sgd"), ("lazy_adam", "adam"), ("lazy_adam", "rowwise"),
              ("sgd", "adam"), ("adagrad", "rowwise")]
EMB_LR = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 2.0,
          "lazy_adam": 0.01}
STEP_LR = {"rowwise": 0.03, "sgd": 0.1, "adam": 2e-3, "adagrad": 2e-3}


def _config(rules=RULE_PAIRS[0]):
    from alpt_keras.update import UpdateConfig
    return UpdateConfig(
        embedding_optimizer=rules[0], embedding_learning_rate=EMB_LR[rules[0]],
        step_size_optimizer=rules[1],
        step_size_learning_rate=STEP_LR[rules[1]])


def _fused_setup(case, config=None, seed=0):
    """A group's variables with random codes, Δ and optimizer state (every
    slot of `config`'s rules), and a step's unique ids and summed
    gradients (some rows clip, some Δ hit the floor)."""
    from types import SimpleNamespace

    from alpt_keras import quantizers, update
    from alpt_keras.storage import make_storage, pack_codes, words_per_row
    config = config or _config()
    bits, kind, dim, rounding, learn, num_tables, floor = case
    rng = np.random.default_rng(seed)
    sizes = [400, 250, 150][:num_tables]
    specs = tuple(update.TableSpec(
        size, dim, num_bits=bits, rounding=rounding, learn_step_size=learn,
        seed=11, salt=100 + t, min_step_size=floor, name=f"t{t}")
        for t, size in enumerate(sizes))
    group = update.GroupSpec(specs)
    rows = group.input_dim
    q_min, q_max = quantizers.code_range(bits)
    codes = rng.integers(q_min, q_max + 1, (rows, dim))
    if kind == "packed":
        codes0 = pack_codes(codes, bits)
        assert codes0.shape[1] == words_per_row(dim, bits)
    else:
        codes0 = tf.constant(codes, tf.int8)
    variables = {
        "codes": tf.Variable(codes0),
        "step_sizes": tf.Variable(rng.lognormal(-4, 0.5, (rows, 1)).astype(
            "float32")),
    }
    slots = list(config.table_rule.slots) + list(
        config.step_size_rule.slots if learn else ())
    for slot in slots:
        shape = (rows, dim if slot.per_element else 1)
        if slot.name.endswith("m"):  # first moments: any sign
            value = rng.normal(0, 1e-3, shape)
        else:  # accumulators, second moments: >= 0, some exactly 0
            value = np.where(rng.random(shape) < 0.1, 0.0,
                             rng.lognormal(-8, 2, shape))
        variables[slot.name] = tf.Variable(value.astype("float32"))
    ids = rng.permutation(rows)[:rows // 2].astype("int64")
    grads = (rng.standard_normal((ids.size, dim))
             * rng.lognormal(-4, 2, (ids.size, 1))).astype("float32")
    table = SimpleNamespace(
        spec=group, storage=make_storage(kind, variables["codes"], bits, dim),
        step_sizes=variables["step_sizes"])
    return table, variables, tf.constant(ids), tf.constant(grads)


def _fused_stock(table, variables, ids, grads, step, config):
    """The stock path: `update.table_step` on gathered rows, then the
    optimizer's writes (scatter_update, or scatter_add of increments)."""
    from alpt_keras import update
    group = table.spec
    rule = config.step_size_rule if group.learn_step_size else None

    def rows(slots):
        return {s.name: tf.gather(variables[s.name], ids) for s in slots}

    out = update.table_step(
        table.storage.read_rows(ids), tf.gather(variables["step_sizes"], ids),
        grads, rows(config.table_rule.slots), rows(rule.slots) if rule else {},
        step, ids, group, config.table_rule,
        config.embedding_hyperparameters, rule,
        config.step_size_hyperparameters("row"))
    table.storage.write_rows(ids, out.codes)
    for name, value in out.state.items():
        if isinstance(value, update.Increment):
            variables[name].scatter_add(tf.IndexedSlices(value.increment,
                                                         ids))
        else:
            variables[name].scatter_update(tf.IndexedSlices(value, ids))
    if rule is not None:
        variables["step_sizes"].scatter_update(tf.IndexedSlices(
            out.step_size, ids))


def _fused_native(library, table, variables, ids, grads, step, config,
                  apply=True):
    ops = kernels.fused_table_step(
        library, tf.distribute.get_strategy(), table, variables, ids, grads,
        step, tf.constant(apply), config,
        config.step_size_hyperparameters("row"))
    assert ops is not None and len(ops) == 1


def _values(variables):
    return {k: v.numpy().tobytes() for k, v in variables.items()}


@pytest.mark.parametrize("rules", RULE_PAIRS, ids="-".join)
@pytest.mark.parametrize("name", sorted(FUSED_CASES))
def test_fused_table_step_is_bitwise_the_stock_step(library, name, rules):
    """One step on random rows: codes, Δ and every slot of the kernel and
    of `update.table_step` + scatters are bitwise equal, for every table
    optimizer and step-size rule."""
    config = _config(rules)
    step = tf.constant(7, tf.int64)  # Adam's bias corrections at t = 8
    results = []
    for path in ("native", "stock"):
        table, variables, ids, grads = _fused_setup(FUSED_CASES[name],
                                                    config)
        before = _values(variables)
        if path == "native":
            _fused_native(library, table, variables, ids, grads, step, config)
        else:
            _fused_stock(table, variables, ids, grads, step, config)
        results.append(_values(variables))
    native, stock = results
    differ = sorted(k for k in native if native[k] != stock[k])
    assert not differ, differ
    assert native["codes"] != before["codes"]  # the step did something
    learn = FUSED_CASES[name][4]
    assert (native["step_sizes"] != before["step_sizes"]) == learn
    changed = {k for k in native if native[k] != before[k]}
    assert changed == set(native) - ({"step_sizes"} if not learn else set())


def test_fused_table_step_comparison_can_fail(library):
    """Negative control: the stock step at another step (other rounding
    noise) differs from the kernel's in some code."""
    config = _config()
    case = FUSED_CASES["8-int8-d16-3tables"]
    table, variables, ids, grads = _fused_setup(case)
    _fused_native(library, table, variables, ids, grads,
                  tf.constant(7, tf.int64), config)
    other_table, other, _, _ = _fused_setup(case)
    _fused_stock(other_table, other, ids, grads, tf.constant(8, tf.int64),
                 config)
    assert _values(variables)["codes"] != _values(other)["codes"]


def test_fused_table_step_skipped_or_refused_changes_nothing(library):
    """`apply=False` (a step with non-finite gradients) and an id outside
    the table (an error) leave every variable bitwise unchanged; a reader's
    earlier snapshot never sees the in-place write."""
    config = _config()
    step = tf.constant(3, tf.int64)
    table, variables, ids, grads = _fused_setup(FUSED_CASES["4-packed-d16"])
    before = _values(variables)
    _fused_native(library, table, variables, ids, grads, step, config,
                  apply=False)
    assert _values(variables) == before
    bad = tf.concat([ids[:-1], [table.spec.input_dim]], 0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="not in \\[0, 400\\)"):
        _fused_native(library, table, variables, bad, grads, step, config)
    assert _values(variables) == before
    snapshot = variables["codes"].read_value()
    _fused_native(library, table, variables, ids, grads, step, config)
    assert snapshot.numpy().tobytes() == before["codes"]
    assert _values(variables)["codes"] != before["codes"]


# ------------------------------------------------ the fused training lookup
@pytest.mark.parametrize("name", sorted(FUSED_CASES))
@pytest.mark.parametrize("per_row", [True, False])
def test_gather_dequantize_is_bitwise_the_stock_lookup(library, name,
                                                        per_row):
    """`AlptGatherDequantize` gives the stock lookup's bits for every bit
    width and storage, per-row Δ and a table's single Δ, repeated ids."""
    from alpt_keras import quantizers
    table, variables, _, _ = _fused_setup(FUSED_CASES[name])
    if not per_row:
        import dataclasses
        from types import SimpleNamespace

        from alpt_keras import update
        spec = dataclasses.replace(table.spec.tables[0],
                                   step_size_mode="table")
        variables["step_sizes"] = tf.Variable([[0.0123]])
        table = SimpleNamespace(spec=spec, storage=table.storage,
                                step_sizes=variables["step_sizes"])
        assert update.table_spec.as_group(spec).num_tables == 1
    rows = int(variables["codes"].shape[0])
    ids = tf.constant(np.random.default_rng(3).integers(0, rows, 5000))
    want = quantizers.dequantize(
        table.storage.read_rows(ids),
        tf.gather(variables["step_sizes"], ids) if per_row
        else tf.convert_to_tensor(variables["step_sizes"]))
    got = kernels.gather_dequantize(library, table, ids)
    assert got.shape == want.shape
    assert got.numpy().tobytes() == want.numpy().tobytes()
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in"):
        kernels.gather_dequantize(library, table,
                                  tf.constant([0, rows], tf.int64))


def test_gather_dequantize_leaves_out_per_table_groups(library):
    """A per-table Δ of several logical tables needs each id's table:
    the stock lookup handles it (`None` here)."""
    from types import SimpleNamespace

    from alpt_keras import update
    specs = tuple(update.TableSpec(10, 4, step_size_mode="table",
                                   name=f"t{i}") for i in range(2))
    table = SimpleNamespace(spec=update.GroupSpec(specs))
    assert kernels.gather_dequantize(
        library, table, tf.constant([1], tf.int64)) is None


@needs_compiler
def test_inference_lookups_never_use_the_kernels(monkeypatch):
    """`training=False` (predict, export) and `training=None` keep the
    stock lookup, so served graphs never hold the op."""
    monkeypatch.setenv(kernels.ENV, "native")
    table = ALPTEmbedding(50, 4, seed=0, name="t")
    ids = tf.constant([[1, 2], [2, 3]], tf.int64)
    table(ids)  # build outside the traced functions
    for training in (False, None, True):
        graph = tf.function(lambda x, t=training: table(x, training=t)) \
            .get_concrete_function(ids).graph
        ops = [op.type for op in graph.get_operations()]
        assert ("AlptGatherDequantize" in ops) == (training is True), training
