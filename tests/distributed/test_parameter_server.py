"""ParameterServerStrategy: ALPT tables sharded over 2 parameter servers.

`model.fit` under PSS is tf_keras only (Keras 3 refuses it,
keras-team/keras#18624); the in-process cluster (tests/cluster.py) lives
until the pytest process exits, so this module creates exactly one.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

import alpt_keras
from alpt_keras import (
    IS_KERAS_3,
    ALPTEmbedding,
    ALPTOptimizer,
    RowPartitioner,
)
from alpt_keras._keras import keras
from alpt_keras.models.dnn import build_dnn
from alpt_keras.models.synthetic import make_synthetic_ctr
from tests.cluster import (
    alpt_train,
    assert_succeeded,
    cluster_spec,
    in_process_cluster,
    read_report,
    run_cluster,
)

tf_keras_only = pytest.mark.skipif(
    IS_KERAS_3, reason="Keras 3 model.fit does not support "
    "ParameterServerStrategy (keras-team/keras#18624): tf_keras pass")

FIELDS, VOCAB, BATCH, EPOCHS = 4, 301, 256, 3  # 301: shards of 151 + 150
FLOAT32_AUC_FLOOR = 0.82


@pytest.fixture(scope="module")
def data():
    return make_synthetic_ctr(40_000, num_fields=FIELDS, vocab_size=VOCAB,
                              weight_scale=1.0, seed=0).split(0.75)


@pytest.fixture(scope="module")
def resolver():
    return in_process_cluster(num_workers=2, num_ps=2)


def _compile(model, kind):
    inner = keras.optimizers.Adam(5e-3)
    optimizer = inner if kind == "float32" else ALPTOptimizer(inner)
    model.compile(optimizer, "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    return optimizer


def _model(kind="alpt"):
    tf.keras.utils.set_random_seed(0)
    model = build_dnn(FIELDS, VOCAB, embedding=kind, seed=0,
                      hidden_units=(32,))
    return model, _compile(model, kind)


def _auc(model, test):
    return model.evaluate(test.ids, test.labels, batch_size=4096,
                          verbose=0)[1]


def _full(variable):
    return np.asarray(tf.convert_to_tensor(variable))


def _pss_fit(resolver, data, num_shards=2):
    train, _ = data
    strategy = tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=RowPartitioner(num_shards))
    with strategy.scope():
        model, optimizer = _model()
    steps = len(train.labels) // BATCH
    dataset = tf.data.Dataset.from_tensor_slices(
        (train.ids, train.labels)).shuffle(10_000, seed=0).repeat().batch(
        BATCH)
    model.fit(dataset, epochs=EPOCHS, steps_per_epoch=steps, verbose=0)
    return strategy, model, optimizer, steps * EPOCHS


@pytest.mark.slow
@tf_keras_only
def test_sharded_training_lookups_and_checkpoints(resolver, data, tmp_path):
    strategy, model, optimizer, steps = _pss_fit(resolver, data)
    layer = model.get_layer("embedding")

    # Every row-indexed variable is split over both parameter servers with
    # the same boundaries; dense weights and counters stay whole.
    rows = {id(v) for v in optimizer.variables if v.shape[:1] == (VOCAB,)}
    row_variables = [layer.codes, layer.step_sizes] + [
        v for v in optimizer.variables if id(v) in rows]
    assert len(row_variables) == 4  # codes, Δ, accumulator, Δ accumulator
    for variable in row_variables:
        shards = variable.variables
        assert [s.shape[0] for s in shards] == [151, 150], variable.name
        assert [s.device.split("/")[1] for s in shards] == [
            "job:ps", "job:ps"]
        assert {s.device.split("/")[3] for s in shards} == {"task:0",
                                                             "task:1"}
    for variable in model.trainable_variables:  # dense weights, carrier
        assert type(variable).__name__ != "ShardedVariable", variable.name
    # No step lost: the wrapper's own counter (assign_add on a parameter
    # server) counts every worker's steps.
    assert int(optimizer.table_iterations.numpy()) == steps

    # Lookups of unsorted ids with duplicates equal the unsharded table.
    ids = np.array([[300, 0, 151, 150], [7, 300, 149, 152]])
    full = _full(layer.codes).astype(np.float32) * _full(layer.step_sizes)
    np.testing.assert_array_equal(layer(ids, training=False).numpy(),
                                  full[ids])

    # Checkpoint: restore into 1 shard (no strategy) and into 3 shards.
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt"))
    expected = {n: _full(v) for n, v in (
        ("codes", layer.codes), ("steps", layer.step_sizes),
        ("accumulator", row_variables[2]))}
    single, single_opt = _model()
    single_opt.build(single.trainable_variables)
    tf.train.Checkpoint(model=single, optimizer=single_opt).restore(
        path).assert_existing_objects_matched()
    restored = single.get_layer("embedding")
    np.testing.assert_array_equal(_full(restored.codes), expected["codes"])
    np.testing.assert_array_equal(_full(restored.step_sizes),
                                  expected["steps"])
    accumulators = [v for v in single_opt.variables
                    if v.name.split("/")[-1].startswith("embedding_acc")]
    np.testing.assert_array_equal(_full(accumulators[0]),
                                  expected["accumulator"])

    # Accuracy: the float32 reference reaches its floor; the PSS-trained
    # ALPT model (evaluated after the 1-shard restore) is as good as a
    # single-process ALPT run of the same length.
    _, test = data
    train, _ = data
    float_model, _ = _model("float32")
    float_model.fit(train.ids, train.labels, batch_size=BATCH,
                    epochs=EPOCHS, verbose=0)
    float_auc = _auc(float_model, test)
    assert float_auc >= FLOAT32_AUC_FLOOR, float_auc
    alpt_model, _ = _model()
    alpt_model.fit(train.ids, train.labels, batch_size=BATCH, epochs=EPOCHS,
                   verbose=0)
    alpt_auc, pss_auc = _auc(alpt_model, test), _auc(single, test)
    print(f"test AUC: float32 {float_auc:.4f}, ALPT one process "
          f"{alpt_auc:.4f}, ALPT over 2 parameter servers {pss_auc:.4f}")
    assert abs(alpt_auc - float_auc) <= 0.03, (alpt_auc, float_auc)
    assert pss_auc >= alpt_auc - 0.01, (pss_auc, alpt_auc)

    three = tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=RowPartitioner(3))
    with three.scope():
        sharded, sharded_opt = _model()
        sharded_opt.build(sharded.trainable_variables)
    tf.train.Checkpoint(model=sharded, optimizer=sharded_opt).restore(
        path).assert_existing_objects_matched()
    codes = sharded.get_layer("embedding").codes
    assert [s.shape[0] for s in codes.variables] == [101, 100, 100]
    np.testing.assert_array_equal(_full(codes), expected["codes"])


def test_partitioner_shards_only_row_variables():
    from alpt_keras.sharding import row_variables

    partitioner = RowPartitioner(2)
    assert partitioner(tf.TensorShape([300, 16]), tf.float32) == [1, 1]
    with row_variables(300):
        assert partitioner(tf.TensorShape([300, 16]), tf.int8) == [2, 1]
        assert partitioner(tf.TensorShape([300, 1]), tf.float32) == [2, 1]
        assert partitioner(tf.TensorShape([1, 1]), tf.float32) == [1, 1]
        assert partitioner(tf.TensorShape([]), tf.int64) == []
    with row_variables(3):
        assert RowPartitioner(2, min_rows_per_shard=2)(
            tf.TensorShape([3, 4]), tf.int8) == [1, 1]
    with pytest.raises(ValueError, match="num_shards=0"):
        RowPartitioner(0)


# `alpt-train` as chief, 2 workers and 2 parameter servers (processes).
CLI = ["-m", "alpt_keras.cli", "--num-examples", "40000", "--num-fields",
       "4", "--vocab-size", "300", "--zipf-exponent", "0", "--batch-size",
       "256", "--epochs", "2", "--hidden-units", "32", "--learning-rate",
       "5e-3", "--verbose", "0"]


@pytest.mark.slow
@tf_keras_only
def test_alpt_train_on_a_parameter_server_cluster(tmp_path):
    out = tmp_path / "cluster"
    results = run_cluster(
        cluster_spec(chief=1, worker=2, ps=2),
        CLI + ["--output-dir", str(out), "--export-dir",
               str(tmp_path / "serving")],
        str(tmp_path), daemons=("ps", "worker"))
    assert_succeeded(results, ["chief-0"])
    report = read_report(out)
    assert report["cluster"]["kind"] == "parameter_server"
    assert report["config"]["storage"] == "int8"  # auto: no collectives
    # The 4 tables are stacked in one group of 4 x 300 rows; every
    # row-indexed variable of the group (codes, Δ, row-wise accumulator, Δ
    # accumulator) is split in halves over ps:0 and ps:1 at the same row.
    layout = report["shards"]
    assert len(layout) == 4, sorted(layout)
    assert len(report["table_digests"]) == 4  # per logical table
    for name, shards in layout.items():
        assert [rows for _, rows in shards] == [600, 600], name
        devices = [d.split("/") for d, _ in shards]
        assert [d[1] for d in devices] == ["job:ps", "job:ps"], shards
        assert {d[3] for d in devices} == {"task:0", "task:1"}, shards
    # Trained to the single-process float32 floor; the chief evaluated
    # after restoring the sharded checkpoint onto one local copy.
    float32 = alpt_train(CLI + ["--embedding", "float32"],
                         tmp_path / "float32")
    hidden = float32["data"]["hidden_model_test"]["auc"]
    float_auc = float32["metrics"]["test_auc"]
    assert float_auc >= hidden - 0.05, (float_auc, hidden)
    print(f"test AUC: float32 one process {float_auc:.4f}, ALPT chief + 2 "
          f"workers + 2 ps {report['metrics']['test_auc']:.4f}")
    assert report["metrics"]["test_auc"] >= float_auc - 0.02, (
        report["metrics"]["test_auc"], float_auc)
    assert os.path.exists(os.path.join(report["export"]["path"],
                                       "saved_model.pb"))


@pytest.mark.slow
@pytest.mark.skipif(not IS_KERAS_3, reason="the Keras 3 recipe; tf_keras "
                    "uses model.fit (tested above)")
def test_keras3_custom_loop_recipe(resolver, data):
    """README 'Training on a cluster', Keras 3: TF's ClusterCoordinator
    custom loop (Keras 3 `model.fit` refuses ParameterServerStrategy)."""
    train, test = data
    strategy = tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=RowPartitioner(2))
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        ids = keras.Input((FIELDS,), dtype="int64")
        rows = ALPTEmbedding(VOCAB, 16, seed=0, name="embedding")(ids)
        hidden = keras.layers.Dense(32, activation="relu")(
            keras.layers.Flatten()(rows))
        model = keras.Model(
            ids, keras.layers.Dense(1, activation="sigmoid")(hidden))
        optimizer = ALPTOptimizer(keras.optimizers.Adam(5e-3))
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.BinaryCrossentropy()

    def dataset_fn():
        return tf.data.Dataset.from_tensor_slices(
            (train.ids, train.labels)).shuffle(10_000).repeat().batch(BATCH)

    iterator = iter(coordinator.create_per_worker_dataset(dataset_fn))

    @tf.function
    def train_step(iterator):
        def step(features, labels):
            with tf.GradientTape() as tape:
                loss = loss_fn(labels[:, None],
                               model(features, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        return strategy.run(step, args=next(iterator))

    steps = EPOCHS * (len(train.labels) // BATCH)
    for _ in range(steps):
        coordinator.schedule(train_step, args=(iterator,))
    coordinator.join()

    layer = model.get_layer("embedding")
    codes = layer.codes.value
    assert type(codes).__name__ == "ShardedVariable"
    assert [s.shape[0] for s in codes.variables] == [151, 150]
    assert int(optimizer.table_iterations.numpy()) == steps  # none lost
    # Unsorted ids with duplicates read the right rows of the shards.
    probe = np.array([[300, 0, 151, 150], [7, 300, 149, 152]])
    full = _full(codes).astype(np.float32) * _full(layer.step_sizes.value)
    np.testing.assert_array_equal(layer(probe, training=False).numpy(),
                                  full[probe])
    auc = keras.metrics.AUC()
    auc.update_state(test.labels, model(test.ids, training=False))
    float_model, _ = _model("float32")
    float_model.fit(train.ids, train.labels, batch_size=BATCH,
                    epochs=EPOCHS, verbose=0)
    float_auc = _auc(float_model, test)
    print(f"test AUC: float32 {float_auc:.4f}, Keras 3 recipe over 2 "
          f"parameter servers {float(auc.result()):.4f}")
    assert float_auc >= FLOAT32_AUC_FLOOR, float_auc
    assert float(auc.result()) >= float_auc - 0.03, (auc.result(), float_auc)


def _group_model():
    """Three tables (101 + 150 + 50 = 301 rows) stacked in one group."""
    from alpt_keras.models.ctr_models import build_ctr_model
    from alpt_keras.models.features import simple_features

    tf.keras.utils.set_random_seed(0)
    features = simple_features({"a": 101, "b": 150, "c": 50},
                               embedding_dim=8)
    model = build_ctr_model(features, model="dnn", hidden_units=(8,))
    return model, _compile(model, "alpt")


@pytest.mark.slow
@tf_keras_only
def test_a_sharded_group_restores_onto_one_and_three_shards(resolver,
                                                            tmp_path):
    rng = np.random.default_rng(0)
    x = {"a": rng.integers(0, 101, 2048), "b": rng.integers(0, 150, 2048),
         "c": rng.integers(0, 50, 2048)}
    y = (x["a"] % 2).astype(np.float32)[:, None]
    strategy = tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=RowPartitioner(2))
    with strategy.scope():
        model, optimizer = _group_model()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(256)
    model.fit(dataset, epochs=1, steps_per_epoch=8, verbose=0)
    (table,) = alpt_keras.tables(model)
    assert table.spec.offsets == (0, 101, 251, 301)
    # The group's row-indexed variables share the shard boundaries.
    slots = optimizer.table_slots(table)
    for variable in [table.codes, table.step_sizes, *slots.values()]:
        assert [s.shape[0] for s in variable.variables] == [151, 150]
    want = {name: (np.asarray(codes), np.asarray(steps))
            for spec, codes, steps in table.logical_values()
            for name in [spec.name]}
    want_slots = {k: _full(v) for k, v in slots.items()}
    assert int(optimizer.table_iterations.numpy()) == 8
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt"))

    # Restore onto one local copy (no strategy) and onto 3 shards.
    three = tf.distribute.ParameterServerStrategy(
        resolver, variable_partitioner=RowPartitioner(3))
    with three.scope():
        sharded = _group_model()
    for (restored, restored_opt), shards in ((_group_model(), 1),
                                             (sharded, 3)):
        restored_opt.build(restored.trainable_variables)
        tf.train.Checkpoint(model=restored, optimizer=restored_opt).restore(
            path).assert_existing_objects_matched()
        (got,) = alpt_keras.tables(restored)
        if shards == 3:
            assert [s.shape[0] for s in got.codes.variables] == [101, 100,
                                                                  100]
        for spec, codes, steps in got.logical_values():
            np.testing.assert_array_equal(np.asarray(codes),
                                          want[spec.name][0])
            np.testing.assert_array_equal(np.asarray(steps),
                                          want[spec.name][1])
        for name, slot in restored_opt.table_slots(got).items():
            np.testing.assert_array_equal(_full(slot), want_slots[name])
