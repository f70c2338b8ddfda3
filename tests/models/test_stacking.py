"""`FeatureEmbedding` stacks compatible ALPT tables: the same numbers as
separate tables, and files that move between the two layouts."""

import numpy as np
import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.ctr_models import build_ctr_model
from alpt_keras.models.features import (
    FeatureConfig,
    TableConfig,
    simple_features,
)
from alpt_keras.models.synthetic import make_synthetic_ctr

NAMES = ["f0", "f1", "f2", "f3", "f4"]


def _features(shared=False):
    # The 8-bit tables stack; the 4-bit one stays a table of its own; "f4"
    # is multi-hot, with a table of its own or sharing the table of "f0".
    features = simple_features({n: 60 + 7 * i for i, n in
                                enumerate(NAMES[:3])}, embedding_dim=8)
    features.append(FeatureConfig("f3", TableConfig("f3", 50, 8, num_bits=4,
                                                    seed=9)))
    table = features[0].table if shared else TableConfig("f4", 50, 8, seed=7)
    features.append(FeatureConfig("f4", table, max_ids=2, combiner="sum"))
    return features


def _data(n=640, seed=0):
    d = make_synthetic_ctr(n, num_fields=5, vocab_size=50, seed=seed)
    x = {n_: d.ids[:, i].astype(np.int64) for i, n_ in enumerate(NAMES)}
    x["f4"] = np.stack([d.ids[:, 4], (d.ids[:, 4] * 7) % 50], axis=1)
    x["f4"][::3, 1] = -1  # padding
    return x, d.labels


def _model(stack_tables, model="deepfm", shared=False):
    keras.utils.set_random_seed(0)
    built = build_ctr_model(_features(shared), model=model,
                            hidden_units=(8,), stack_tables=stack_tables)
    built.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2)),
                  "binary_crossentropy")
    return built


def _logical(model):
    out = {}
    for table in alpt_keras.tables(model):
        for spec, codes, steps in table.logical_values():
            out[spec.name] = (np.asarray(codes), np.asarray(steps))
    return out


def _train_both(model, shared):
    x, y = _data()
    results = []
    for stack_tables in (False, True):
        keras.backend.clear_session()
        built = _model(stack_tables, model, shared)
        built.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        results.append((_logical(built), built.predict(x, verbose=0),
                        len(alpt_keras.tables(built))))
    return results


@pytest.mark.slow
def test_stacked_and_separate_models_train_bitwise_alike():
    (separate, p_sep, n_sep), (stacked, p_st, n_st) = _train_both(
        "deepfm", shared=False)
    # deepfm: 5 + 5 linear tables separate; stacked: the 8-bit embedding
    # tables, the 8-bit linear tables, and the two 4-bit tables alone.
    assert (n_sep, n_st) == (10, 4)
    assert sorted(separate) == sorted(stacked)
    for name in separate:
        for a, b in zip(separate[name], stacked[name], strict=True):
            assert a.tobytes() == b.tobytes(), name
    # Same tables, same dense weights, same graph order: bitwise.
    assert p_sep.tobytes() == p_st.tobytes()


@pytest.mark.slow
def test_a_table_shared_by_a_one_hot_and_a_multi_hot_feature_is_bounded():
    """The one case that is not bitwise. A separate table looked up by two
    features receives its two gradients in the order backprop reaches the
    lookups, which depends on the graph between them and the loss (here a
    one-hot and a multi-hot feature: not the latest-call-first order the
    group uses). Rows touched by both features then sum their gradients in
    another order: float32 reassociation, a few ulps. Bound: after 20
    steps the codes are identical and Δ within 1e-5 relative (seen: 2e-7).
    The dense layers' Adam divides by the root of tiny second moments, which
    turns those ulps into ~1e-4 differences of the probabilities (seen:
    3e-4): bound 2e-3."""
    (separate, p_sep, _), (stacked, p_st, _) = _train_both("dnn", True)
    for name in separate:
        (codes_a, steps_a), (codes_b, steps_b) = separate[name], stacked[name]
        assert codes_a.tobytes() == codes_b.tobytes(), name
        np.testing.assert_allclose(steps_b, steps_a, rtol=1e-5, atol=0)
    np.testing.assert_allclose(p_st, p_sep, rtol=0, atol=2e-3)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_files_move_between_stacked_and_separate_models(tmp_path, suffix):
    x, y = _data(128)
    for source, target in ((False, True), (True, False)):
        keras.backend.clear_session()
        model = _model(source, model="dnn")
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        path = str(tmp_path / f"m{int(source)}{suffix}")
        if suffix == ".keras":
            model.save(path)
        else:
            model.save_weights(path)
        other = _model(target, model="dnn")
        other(x)  # build
        before = _logical(other)
        if suffix == ".keras":
            weights_path = str(tmp_path / "w.weights.h5")
            keras.models.load_model(path).save_weights(weights_path)
            other.load_weights(weights_path)
        else:
            other.load_weights(path)
        got, want = _logical(other), _logical(model)
        assert any(before[n][0].tobytes() != want[n][0].tobytes()
                   for n in want)  # loading changed something
        for name in want:
            for a, b in zip(want[name], got[name], strict=True):
                assert a.tobytes() == b.tobytes(), (source, name)
        np.testing.assert_array_equal(other.predict(x, verbose=0),
                                      model.predict(x, verbose=0))


def test_stack_tables_false_keeps_separate_tables_and_round_trips():
    model = _model(False, model="dnn")
    assert len(alpt_keras.tables(model)) == 5
    config = model.get_layer("embedding").get_config()
    assert config["stack_tables"] is False
    clone = keras.Model.from_config(model.get_config())
    assert len(alpt_keras.tables(clone)) == 5


@pytest.mark.slow
@pytest.mark.parametrize("step_size", ["row", "table"])
def test_one_hot_features_take_the_matrix_lookup_bitwise(step_size):
    """Every feature one-hot in one group (the default CTR layout): the
    group looks up one `[B, F]` id matrix (`lookup_matrix`), with each
    table's ids in batch order, so 20 steps give bitwise what separate
    tables give, per-table Δ included."""
    features = simple_features({n: 50 + 9 * i for i, n in enumerate(NAMES)},
                               embedding_dim=4, step_size=step_size)
    x, y = _data()
    x["f4"] = x["f4"][:, 0]
    results = []
    for stack_tables in (False, True):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = build_ctr_model(features, model="dnn", hidden_units=(8,),
                                stack_tables=stack_tables)
        model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2)),
                      "binary_crossentropy")
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        results.append((_logical(model), model.predict(x, verbose=0)))
    (separate, p_sep), (stacked, p_st) = results
    assert sorted(separate) == sorted(stacked) == NAMES
    for name in separate:
        for a, b in zip(separate[name], stacked[name], strict=True):
            assert a.tobytes() == b.tobytes(), name
    assert p_sep.tobytes() == p_st.tobytes()


def test_the_matrix_lookup_names_the_feature_of_a_bad_id():
    from alpt_keras.models import FeatureEmbedding

    layer = FeatureEmbedding(simple_features({"user": 10, "item": 20}))
    ok = {"user": np.array([1, 2]), "item": np.array([3, 4])}
    layer(ok)
    # 15 < 10 + 20 rows of the group, but not an id of "user".
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r'feature "user" \(table "user", '
                             r'input_dim=10\); first 10: \[15\]'):
        layer({"user": np.array([1, 15]), "item": np.array([3, 4])})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r'feature "item" \(table "item", '
                             r'input_dim=20\); first 10: \[-3\]'):
        layer({"user": np.array([1, 2]), "item": np.array([-3, 4])})


def _gather_ops(layer, x):
    specs = {k: tf.TensorSpec([None], tf.int64) for k in x}
    graph = tf.function(lambda ids: layer(ids, training=False)) \
        .get_concrete_function(specs).graph
    return sum(op.type in ("ResourceGather", "GatherV2")
               for op in graph.get_operations())


@pytest.mark.parametrize("layout", ["one_alpt_table", "one_float_table",
                                    "group_with_a_shared_table"])
def test_inference_looks_up_shared_tables_once(layout):
    """Features sharing tables (one table for every field, or a group
    holding a shared table): inference looks up one `[B, F]` id matrix,
    a constant number of gathers whatever `F`, with bitwise the rows of
    the per-feature path that training takes."""
    from alpt_keras.models import FeatureEmbedding

    kind = "float32" if layout == "one_float_table" else "alpt"
    if layout == "group_with_a_shared_table":
        features = simple_features({n: 50 + 9 * i for i, n in
                                    enumerate(NAMES[:4])}, embedding_dim=4)
        features.append(FeatureConfig("f4", features[0].table))
    else:
        table = TableConfig("ids", 90, 4, kind=kind, seed=3)
        features = [FeatureConfig(n, table) for n in NAMES]
    layer = FeatureEmbedding(features)
    x = {n: tf.constant(np.arange(6) * (i + 1) % 50, tf.int64)
         for i, n in enumerate(NAMES)}
    per_feature = layer(x)  # training=None: the per-feature path
    rows = layer(x, training=False)
    assert rows.shape == (6, 5, 4)
    assert rows.numpy().tobytes() == per_feature.numpy().tobytes()
    # The inference graph: one gather (float) or two (codes and Δ), where
    # the per-feature path would take one or two per feature.
    assert _gather_ops(layer, x) <= 2
    if layout == "group_with_a_shared_table":
        assert layer.groups[0].shares_tables
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r'feature "f4" \(table "f0"'):
            layer(dict(x, f4=tf.constant([0, 1, 2, 3, 4, 50], tf.int64)),
                  training=False)
