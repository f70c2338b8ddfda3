"""`ALPTEmbeddingGroup`: stacked tables compute bit for bit what the same
tables compute as separate `ALPTEmbedding` layers."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import (
    ALPTEmbedding,
    ALPTEmbeddingGroup,
    ALPTOptimizer,
    two_pass,
)
from alpt_keras._keras import keras
from tests.core.helpers import replica_values, value

STEPS, BATCH, DIM = 20, 32, 8
SIZES = {"table_a": 40, "table_b": 30, "table_c": 25}

# (embedding optimizer, step-size rule, Δ mode, bits, storage, gradient,
#  extra): every option the issue names appears at least once.
CASES = {
    "rwada-row-8-int8-1p": ("rowwise_adagrad", "rowwise", "row", 8, "int8",
                            "one_pass", {}),
    "rwada-table-4-packed-1p": ("rowwise_adagrad", "rowwise", "table", 4,
                                "packed", "one_pass", {}),
    "adam-row-2-packed-2p": ("lazy_adam", "adam", "row", 2, "packed",
                             "two_pass", {}),
    "adam-table-2-int8-1p": ("lazy_adam", "adam", "table", 2, "int8",
                             "one_pass", {}),
    "rwada-table-8-int8-2p": ("rowwise_adagrad", "adagrad", "table", 8,
                              "int8", "two_pass", {}),
    "lpt-row-4-int8-1p": ("rowwise_adagrad", "rowwise", "row", 4, "int8",
                          "one_pass", {"learn_step_size": False}),
    # A table shared by two features: a separate layer called twice gets
    # its two gradients latest call first (backprop order), which the
    # group reproduces by concatenating its features in reverse order.
    "shared-rwada-row-8-int8-1p": ("rowwise_adagrad", "rowwise", "row", 8,
                                   "int8", "one_pass", {"shared": True}),
    "mirrored-rwada-row-8-packed-1p": ("rowwise_adagrad", "rowwise", "row",
                                       8, "packed", "one_pass",
                                       {"mirrored": True}),
    "mirrored-adam-table-4-packed-2p": ("lazy_adam", "adam", "table", 4,
                                        "packed", "two_pass",
                                        {"mirrored": True}),
}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    n = STEPS * BATCH
    a = rng.integers(0, 40, size=(n, 2))
    b = np.minimum(rng.zipf(1.5, size=n) - 1, 29)
    c = rng.integers(0, 25, size=(n, 3))
    a2 = rng.integers(0, 40, size=n)
    logit = (np.sin(a[:, 0]) + np.cos(a[:, 1] * 0.7) + 0.1 * b
             - 0.05 * c.sum(axis=1) + 0.3 * np.sin(a2))
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {"a": a, "b": b, "c": c, "a2": a2}, labels


def _tables(case):
    _, _, mode, bits, storage, _, extra = case
    args = dict(num_bits=bits, step_size=mode, storage=storage,
                learn_step_size=extra.get("learn_step_size", True),
                rounding=extra.get("rounding", "stochastic"))
    return [ALPTEmbedding(40, DIM, seed=1, name="table_a", **args),
            ALPTEmbedding(30, DIM, seed=2, name="table_b", **args),
            ALPTEmbedding(25, DIM, seed=3, combiner="mean", name="table_c",
                          **args)]


def _build(case, stacked):
    emb_opt, step_opt, _, _, _, gradient, extra = case
    shared = extra.get("shared", False)
    keras.utils.set_random_seed(0)
    inputs = {"a": keras.Input((2,), dtype="int64", name="a"),
              "b": keras.Input((), dtype="int64", name="b"),
              "c": keras.Input((3,), dtype="int64", name="c")}
    if shared:
        inputs["a2"] = keras.Input((), dtype="int64", name="a2")
    table_a, table_b, table_c = _tables(case)
    if stacked:
        features = {"a": "table_a", "b": "table_b", "c": "table_c"}
        if shared:
            features["a2"] = "table_a"
        group = ALPTEmbeddingGroup([table_a, table_b, table_c],
                                   features=features, name="group")
        out = group(inputs)
        layers = [group]
    else:
        out = {"a": table_a(inputs["a"]), "b": table_b(inputs["b"]),
               "c": table_c(inputs["c"])}
        if shared:
            out["a2"] = table_a(inputs["a2"])
        layers = [table_a, table_b, table_c]
    parts = [keras.layers.Flatten()(out["a"]), out["b"], out["c"]]
    if shared:
        parts.append(out["a2"])
    x = keras.layers.Concatenate()(parts)
    x = keras.layers.Dense(
        4, activation="relu",
        kernel_initializer=keras.initializers.GlorotUniform(seed=3))(x)
    y = keras.layers.Dense(
        1, activation="sigmoid",
        kernel_initializer=keras.initializers.GlorotUniform(seed=4))(x)
    model = keras.Model(inputs, y)
    optimizer = ALPTOptimizer(
        keras.optimizers.SGD(0.05), embedding_optimizer=emb_opt,
        step_size_optimizer=step_opt, step_size_gradient=gradient,
        step_size_learning_rate=extra.get("step_size_learning_rate"))
    model.compile(optimizer, "binary_crossentropy")
    if gradient == "two_pass":
        two_pass(model)
    return model, optimizer, layers


def _logical_state(model, optimizer, layers, mirrored):
    """Per logical table: codes, Δ and every slot, as NumPy arrays (group
    variables sliced by the table's rows); plus the dense weights."""
    out = {}

    def read(variable):
        if mirrored:
            copies = replica_values(variable)
            assert all(c.tobytes() == copies[0].tobytes() for c in copies)
        return value(variable)

    for table in alpt_keras.tables(model):
        spec = table.spec
        codes = read(table.codes)
        steps = read(table.step_sizes)
        slots = {k: read(v) for k, v in optimizer.table_slots(table).items()}
        for t, logical in enumerate(spec.tables):
            rows = slice(spec.offsets[t], spec.offsets[t + 1])
            delta = steps[rows] if spec.per_row else steps[t:t + 1]
            out[f"{logical.name}/codes"] = codes[rows]
            out[f"{logical.name}/step_sizes"] = delta
            for name, slot in slots.items():
                per_row = slot.shape[0] == spec.input_dim
                out[f"{logical.name}/{name}"] = slot[rows] if per_row \
                    else slot[t:t + 1]
    carriers = {id(layer.gradient_carrier) for layer in layers}
    for i, weight in enumerate(w for w in model.trainable_weights
                               if id(w) not in carriers):
        out[f"dense/{i}"] = read(weight)
    out["table_iterations"] = read(optimizer.table_iterations)
    return out


def _run(case, stacked, strategy):
    mirrored = case[-1].get("mirrored", False)
    scope = strategy.scope() if mirrored else contextlib.nullcontext()
    with scope:
        model, optimizer, layers = _build(case, stacked)
    x, y = _data()
    if not case[-1].get("shared"):
        del x["a2"]
    model(x)
    with strategy.scope() if mirrored else contextlib.nullcontext():
        optimizer.build(model.trainable_variables)
    before = _logical_state(model, optimizer, layers, mirrored)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    after = _logical_state(model, optimizer, layers, mirrored)
    return before, after


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_stacked_tables_match_separate_tables_bitwise(name,
                                                      mirrored_strategy):
    case = CASES[name]
    sep_before, separate = _run(case, False, mirrored_strategy)
    keras.backend.clear_session()
    grp_before, stacked = _run(case, True, mirrored_strategy)
    assert set(separate) == set(stacked), sorted(
        set(separate) ^ set(stacked))
    # Same initial codes and Δ: one initializer call per logical table.
    for key in sep_before:
        if key.endswith(("/codes", "/step_sizes")):
            assert sep_before[key].tobytes() == grp_before[key].tobytes(), key
    # Bitwise, no tolerance: a group must be a pure re-layout.
    differ = sorted(k for k in separate
                    if separate[k].tobytes() != stacked[k].tobytes()
                    or separate[k].shape != stacked[k].shape)
    assert not differ, f"{name}: differ after {STEPS} steps: {differ}"
    assert int(separate["table_iterations"]) == STEPS
    # The codes moved: equality is not that of two frozen tables.
    for table in SIZES:
        assert separate[f"{table}/codes"].tobytes() != \
            sep_before[f"{table}/codes"].tobytes(), table


def test_one_chain_per_group_in_the_forward_pass():
    group = ALPTEmbeddingGroup(_tables(CASES["rwada-row-8-int8-1p"]))
    group.build(None)

    @tf.function
    def lookup(a, b, c):
        return group({"table_a": a, "table_b": b, "table_c": c},
                     training=False)

    graph = lookup.get_concrete_function(
        tf.TensorSpec([None, 2], tf.int64), tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None, 3], tf.int64)).graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("ResourceGather") == 2  # codes rows, Δ rows
    assert ops.count("If") + ops.count("StatelessIf") == 1  # one id check


def test_an_id_of_another_table_is_refused_before_any_change():
    group = ALPTEmbeddingGroup(_tables(CASES["rwada-row-8-int8-1p"]))
    optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))
    ok = {"table_a": tf.constant([[1, 2]]), "table_b": tf.constant([3]),
          "table_c": tf.constant([[0, 1, 2]])}
    bad = dict(ok, table_b=tf.constant([35]))  # < ΣV, but >= 30
    with tf.GradientTape() as tape:
        loss = sum(tf.reduce_sum(v) for v in group(ok).values())
    variables = group.trainable_weights
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables,
                                  strict=True))
    codes = value(group.codes).copy()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match='feature "table_b" \\(table "table_b", '
                             'input_dim=30\\)'):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(v) for v in group(bad).values())
    assert value(group.codes).tobytes() == codes.tobytes()


def test_non_integer_float_ids_are_refused_naming_the_feature():
    group = ALPTEmbeddingGroup(_tables(CASES["rwada-row-8-int8-1p"]))
    ok = {"table_a": tf.constant([[1.0, 2.0]]), "table_b": tf.constant([3]),
          "table_c": tf.constant([[0, 1, 2]])}
    group(ok)  # whole float ids are fine
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="feature 'table_a'.*must be whole numbers"):
        group(dict(ok, table_a=tf.constant([[1.0, 2.5]])))


def test_tables_that_cannot_share_a_group_are_refused():
    with pytest.raises(ValueError, match="num_bits"):
        ALPTEmbeddingGroup([ALPTEmbedding(10, 4, num_bits=8, name="x"),
                            ALPTEmbedding(10, 4, num_bits=4, name="y")])
    with pytest.raises(ValueError, match="storage"):
        ALPTEmbeddingGroup([ALPTEmbedding(10, 4, name="x"),
                            ALPTEmbedding(10, 4, storage="packed", name="y")])
    with pytest.raises(ValueError, match="unique"):
        ALPTEmbeddingGroup([ALPTEmbedding(10, 4, name="x"),
                            ALPTEmbedding(12, 4, name="x")])
    with pytest.raises(ValueError, match="not in the group"):
        ALPTEmbeddingGroup([ALPTEmbedding(10, 4, name="x")],
                           features={"f": "nope"})
    groups = alpt_keras.group.stack([
        ALPTEmbedding(10, 4, name="p"), ALPTEmbedding(10, 4, num_bits=4,
                                                      name="q"),
        ALPTEmbedding(10, 4, name="r")])
    assert [[t.name for t in g] for g in groups] == [["p", "r"], ["q"]]


def test_group_config_round_trips():
    group = ALPTEmbeddingGroup(_tables(CASES["rwada-table-4-packed-1p"]),
                               name="g")
    group.build(None)
    clone = ALPTEmbeddingGroup.from_config(group.get_config())
    clone.build(None)
    assert clone.table_names == group.table_names
    assert clone.offsets == group.offsets == (0, 40, 70, 95)
    assert value(clone.codes).tobytes() == value(group.codes).tobytes()
    assert value(clone.step_sizes).shape == (3, 1)


def _update_op_counts(layer, inputs):
    """Op types of one traced training step of `layer` (a table or a
    group) with `ALPTOptimizer`, counting nested functions' ops too."""
    optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            out = layer(inputs, training=True)
            loss = sum(tf.reduce_sum(v) for v in tf.nest.flatten(out))
        variables = layer.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                      variables, strict=True))

    layer(inputs)
    optimizer.build(layer.trainable_variables)
    graph = train_step.get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():  # cond branches
        types += [node.op for node in function.definition.node_def]
    return {t: types.count(t) for t in set(types)}


def test_one_update_chain_per_group():
    """A group of three tables runs the update chain of one table: one
    dedup, one gradient segment sum, one scatter per variable."""
    tables = _tables(CASES["rwada-row-8-int8-1p"])
    ids = {"table_a": tf.constant([[1, 2], [3, 1]], tf.int64),
           "table_b": tf.constant([4, 4], tf.int64),
           "table_c": tf.constant([[0, 1, 2], [2, 3, 4]], tf.int64)}
    group = _update_op_counts(ALPTEmbeddingGroup(tables), ids)
    single = _update_op_counts(_tables(CASES["rwada-row-8-int8-1p"])[0],
                               ids["table_a"])
    for counts in (group, single):  # the native kernels fuse pieces
        fused = counts.get("AlptUniqueSegmentSum", 0)
        counts["dedup"] = counts.get("Unique", 0) + fused
        counts["segment sum"] = counts.get("UnsortedSegmentSum", 0) + fused
        # The fused table step reads and writes every variable in place.
        counts["row writes"] = sum(counts.get(op, 0) for op in (
            "ResourceScatterUpdate", "ResourceScatterAdd",
            "AlptTableStep"))
        # The training lookup: stock gathers or one fused gather.
        counts["row reads"] = counts.get("ResourceGather", 0) + counts.get(
            "AlptGatherDequantize", 0)
    for op in ("dedup", "segment sum", "row writes", "row reads"):
        assert group.get(op, 0) == single.get(op, 0) > 0, (
            op, group.get(op), single.get(op))
    for op in ("ResourceScatterUpdate", "ResourceScatterAdd",
               "AlptTableStep", "ResourceGather",
               "AlptGatherDequantize"):
        assert group.get(op, 0) == single.get(op, 0), op


@pytest.mark.parametrize("mode", ["row", "table"])
def test_one_id_per_feature_takes_the_matrix_lookup_bitwise(mode):
    """One id per example and feature, looked up as one `[B, F]` matrix
    (`lookup_matrix`: no per-feature split or concat, what
    `FeatureEmbedding` does for one-hot features): 20 steps match separate
    tables bitwise."""
    rng = np.random.default_rng(0)
    sizes = {"u": 30, "v": 40, "w": 25}
    batches = [{n: tf.constant(np.minimum(rng.zipf(1.3, BATCH) - 1, v - 1))
                for n, v in sizes.items()} for _ in range(STEPS)]
    upstream = tf.constant(rng.standard_normal((BATCH, DIM)), tf.float32)

    def train(stacked):
        keras.backend.clear_session()
        tables = [ALPTEmbedding(v, DIM, seed=i, name=n, step_size=mode)
                  for i, (n, v) in enumerate(sizes.items())]
        layers = [ALPTEmbeddingGroup(tables)] if stacked else tables
        optimizer = ALPTOptimizer(keras.optimizers.SGD(0.1))

        def lookup(batch):
            if stacked:
                rows = layers[0].lookup_matrix(
                    list(sizes), tf.stack([batch[n] for n in sizes], axis=1),
                    training=True)
                return dict(zip(sizes, tf.unstack(rows, axis=1),
                                strict=True))
            return {t.name: t(batch[t.name], training=True) for t in tables}

        lookup(batches[0])
        variables = [v for layer in layers for v in layer.trainable_weights]
        optimizer.build(variables)

        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                out = lookup(batch)
                loss = sum(tf.reduce_sum(out[n] * upstream * (i + 1))
                           for i, n in enumerate(sizes))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                          variables, strict=True))

        if stacked:  # the matrix path, not the per-feature one
            graph = step.get_concrete_function(batches[0]).graph
            ops = [op.type for op in graph.get_operations()]
            assert ops.count("SplitV") == 0 and ops.count("Unpack") == 1
        def state():
            out = {}
            for table in alpt_keras.table.tables_of(
                    [w for layer in layers for w in layer.weights]):
                for spec, codes, steps in table.logical_values():
                    out[spec.name] = (np.asarray(codes), np.asarray(steps))
            return out

        before = state()
        for batch in batches:
            step(batch)
        return before, state()

    (start, separate), (_, stacked) = train(False), train(True)
    assert sorted(separate) == sorted(stacked) == sorted(sizes)
    for name in sizes:
        for a, b in zip(separate[name], stacked[name], strict=True):
            assert a.tobytes() == b.tobytes(), name
        assert separate[name][0].tobytes() != start[name][0].tobytes()
