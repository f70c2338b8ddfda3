"""Exports load and serve the way TF Serving does, with low-bit tables."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import IS_KERAS_3, ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.export import (
    export_for_serving,
    export_size_report,
    serving_input_signature,
)
from alpt_keras.export import saved_model as saved_model_module
from alpt_keras.models import (
    FeatureConfig,
    FeatureEmbedding,
    TableConfig,
    build_ctr_model,
    simple_features,
)

HERE = os.path.dirname(__file__)
# Every op our exports use, all shipped by TensorFlow Serving 2.11 (and
# later). An op outside this set would make older servers refuse the model.
# Groups of stacked tables add ArgMax, StringFormat (their id check's
# error message), Size and SplitV (one lookup split back per feature): core
# ops since TF 1.x (StringFormat: 1.12). Packed tables unpack with Bitcast,
# BitwiseOr, LeftShift and, for the serving host's byte order, Equal,
# ReverseV2 and StatelessIf (TF 1.x core ops; StatelessIf: 2.0).
ALLOWED_OPS = frozenset({
    "AddV2", "All", "Any", "ArgMax", "Assert", "AssignVariableOp",
    "BatchMatMulV2", "BiasAdd", "Bitcast", "BitwiseAnd", "BitwiseOr",
    "BroadcastTo", "Cast", "ConcatV2", "Const", "Cumsum", "EnsureShape",
    "Equal", "ExpandDims", "GatherNd", "GatherV2", "GreaterEqual", "Identity",
    "If", "LeftShift", "Less", "LogicalNot", "LogicalOr", "MatMul",
    "MatrixBandPart", "Max", "Maximum", "MergeV2Checkpoints", "Mul", "NoOp",
    "NotEqual", "OnesLike", "Pack", "Placeholder", "Prod", "Range",
    "ReadVariableOp", "RealDiv", "Relu", "Reshape", "ResourceGather",
    "RestoreV2", "ReverseV2", "RightShift", "Rsqrt", "SaveV2", "Select",
    "SelectV2", "Shape", "ShardedFilename", "Sigmoid", "Size", "SplitV",
    "Square", "Squeeze", "StatefulPartitionedCall", "StatelessIf",
    "StaticRegexFullMatch", "StridedSlice", "StringFormat", "StringJoin",
    "Sub", "Sum", "Tile", "Transpose", "Unpack", "UnsortedSegmentSum",
    "VarHandleOp", "Where",
})


def _features(kind="alpt", **table):
    return simple_features({"user": 100, "item": 50}, embedding_dim=8,
                           kind=kind, **table) + [
        FeatureConfig("genres", TableConfig("genre", 20, 8, kind=kind,
                                            **table),
                      max_ids=3)]


def _inputs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"user": rng.integers(0, 100, n), "item": rng.integers(0, 50, n),
            "genres": rng.integers(-1, 20, (n, 3))}


def _trained(model_name, kind="alpt", **table):
    model = build_ctr_model(_features(kind, **table), model=model_name,
                            hidden_units=(16,))
    inner = keras.optimizers.Adam(1e-2)
    model.compile(inner if kind == "float32" else ALPTOptimizer(inner),
                  "binary_crossentropy")
    x = _inputs(512, seed=1)
    model.fit(x, (x["user"] % 2).astype("float32"), verbose=0)
    return model


def _serve(version_dir, inputs, tmp_path):
    """Session-loader run in a process that does not import alpt_keras."""
    np.savez(tmp_path / "in.npz", **inputs)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "serving_check.py"), version_dir,
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("model_name, kind", [
    ("dnn", "alpt"), ("deepfm", "alpt"), ("dcn", "lpt"), ("dlrm", "float32")])
def test_session_loader_serves_keras_predictions(model_name, kind, tmp_path):
    model = _trained(model_name, kind)
    version_dir = export_for_serving(model, str(tmp_path / "base"), "ctr")
    assert version_dir == str(tmp_path / "base" / "ctr" / "1")
    x = _inputs()
    served = _serve(version_dir, x, tmp_path)
    assert str(served["_error"]) == ""
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(served["probability"], expected, atol=1e-6)
    logit = keras.Model(model.inputs, model.get_layer("logit").output)
    np.testing.assert_allclose(served["logit"], logit.predict(x, verbose=0),
                               atol=1e-5)
    ops = set(served["_ops"].tolist())
    assert ops <= ALLOWED_OPS, sorted(ops - ALLOWED_OPS)


@pytest.mark.slow
def test_saved_model_cli_run(tmp_path):
    model = _trained("wide_deep")
    version_dir = export_for_serving(model, str(tmp_path / "base"), "ctr")
    x = _inputs()
    args = []
    for name, value in x.items():
        np.save(tmp_path / f"{name}.npy", value)
        args.append(f"{name}={tmp_path / f'{name}.npy'}")
    proc = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli",
         "run", "--dir", version_dir, "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", ";".join(args),
         "--outdir", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "cli" / "probability.npy")
    np.testing.assert_allclose(served, model.predict(x, verbose=0),
                               atol=1e-6)


def test_export_holds_integer_codes_and_nothing_else(tmp_path):
    model = _trained("deepfm")
    version_dir = export_for_serving(model, str(tmp_path), "ctr")
    report = export_size_report(version_dir)["variables"]
    codes = {k: v for k, v in report.items() if ".codes" in k}
    # user, item and genre stacked in one group; their 1-wide linear tables
    # (per-table Δ) in another.
    assert len(codes) == 2
    assert {v["dtype"] for v in codes.values()} == {"int8"}
    names = " ".join(report)
    for unwanted in ("carrier", "accumulator", "optimizer", "iteration"):
        assert unwanted not in names, unwanted
    carriers = [w for w in model.weights if "gradient_carrier" in w.name]
    assert len(report) == len(model.weights) - len(carriers)
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function
                                for n in f.node_def]
    assert not [n.name for n in nodes if "debug_name" in n.attr]
    assert not [n.name for n in nodes if n.op == "DisableCopyOnRead"]


def test_out_of_range_ids_fail_the_request(tmp_path):
    model = build_ctr_model(_features(), model="dnn", hidden_units=(8,))
    version_dir = export_for_serving(model, str(tmp_path), "ctr")
    x = _inputs(4)
    x["user"][2] = 100  # one past the table
    served = _serve(version_dir, x, tmp_path)
    # The stacked group's check names the feature and its own table.
    assert 'feature "user" (table "user", input_dim=100)' in \
        str(served["_error"]).replace("\\", ""), served["_error"]


def _gathers(version_dir):
    """ResourceGather nodes (row lookups in a variable) of an export's
    serving function."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    # The serving function's body is stored more than once (the signature
    # and the traced call): count within one function.
    return max(sum(n.op == "ResourceGather" for n in f.node_def)
               for f in graph.library.function)


def test_one_gather_per_group_in_the_served_graph(tmp_path):
    counts, sizes, metas = {}, {}, {}
    for stack_tables in (True, False):
        model = build_ctr_model(_features(), model="deepfm",
                                hidden_units=(8,), stack_tables=stack_tables)
        version_dir = export_for_serving(
            model, str(tmp_path / str(stack_tables)), "ctr")
        counts[stack_tables] = _gathers(version_dir)
        sizes[stack_tables] = export_size_report(version_dir)["tables"]
        with open(os.path.join(version_dir, "assets.extra",
                               "alpt_tables.json")) as f:
            metas[stack_tables] = json.load(f)
    # Stacked: the embedding group gathers codes and per-row Δ; the linear
    # group (per-table Δ) gathers its codes only. Separate: three tables x
    # 2 and three linear tables x 1.
    assert counts == {True: 3, False: 9}, counts
    # The same bytes per logical table, under the same names.
    assert {k: v["bytes"] for k, v in sizes[True].items()} == \
        {k: v["bytes"] for k, v in sizes[False].items()}, sizes
    group = metas[True]["embedding.embedding_group_0"]
    assert group["input_dim"] == 170
    assert group["tables"] == {
        "user": {"input_dim": 100, "row_offset": 0},
        "item": {"input_dim": 50, "row_offset": 100},
        "genre": {"input_dim": 20, "row_offset": 150}}
    assert metas[False]["embedding.user"]["tables"] == {
        "user": {"input_dim": 100, "row_offset": 0}}


def test_versions_are_atomic_and_checked(tmp_path, monkeypatch):
    model = build_ctr_model(_features(), model="dnn", hidden_units=(8,))
    base = str(tmp_path)
    assert export_for_serving(model, base, "ctr").endswith("ctr/1")
    assert export_for_serving(model, base, "ctr").endswith("ctr/2")
    with pytest.raises(ValueError, match="Version 2 already exists"):
        export_for_serving(model, base, "ctr", version=2)
    with pytest.raises(ValueError, match="version=0"):
        export_for_serving(model, base, "ctr", version=0)
    with pytest.raises(ValueError, match="model_name='../x'"):
        export_for_serving(model, base, "../x")

    def broken_save(*args, **kwargs):
        os.makedirs(args[1], exist_ok=True)
        open(os.path.join(args[1], "saved_model.pb"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(saved_model_module.tf.saved_model, "save",
                        broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_for_serving(model, base, "ctr")
    assert sorted(os.listdir(os.path.join(base, "ctr"))) == ["1", "2"]


@pytest.mark.slow
def test_export_size_with_a_2_20_row_table(tmp_path):
    sizes = {}
    for kind in ("float32", "alpt"):
        features = [FeatureConfig("id", TableConfig("id", 2**20, 16,
                                                    kind=kind))]
        model = build_ctr_model(features, model="dnn", hidden_units=(16,))
        report = export_size_report(export_for_serving(
            model, str(tmp_path / kind), "ctr"))
        (table,) = report["tables"].values()  # the one table, "id"
        rows_bytes = 4 * 2**20 * 16
        assert table["float32_bytes"] == rows_bytes
        sizes[kind] = (table["bytes"], report["total_bytes"])
    assert sizes["float32"][0] == 4 * 2**20 * 16  # the report is not empty
    # int8 codes (16 B) + per-row Δ (4 B) vs 64 B per row: 0.3125.
    assert sizes["alpt"][0] <= 0.32 * sizes["float32"][0], sizes
    assert sizes["alpt"][1] <= 0.35 * sizes["float32"][1], sizes


@pytest.mark.slow
def test_packed_tables_serve_and_stay_packed(tmp_path):
    model = _trained("deepfm", num_bits=4, storage="packed")
    version_dir = export_for_serving(model, str(tmp_path / "base"), "ctr")
    x = _inputs()
    served = _serve(version_dir, x, tmp_path)
    assert str(served["_error"]) == ""
    np.testing.assert_allclose(served["probability"],
                               model.predict(x, verbose=0), atol=1e-6)
    ops = set(served["_ops"].tolist())
    assert ops <= ALLOWED_OPS, sorted(ops - ALLOWED_OPS)
    report = export_size_report(version_dir)
    codes = {k: v for k, v in report["variables"].items()
             if k.endswith(".codes")}
    # One group of three tables, one of DeepFM's three linear ones.
    assert len(codes) == 2
    # 8-wide (and 1-wide linear) 4-bit rows: one int32 word per row.
    assert all(v["dtype"] == "int32" and v["shape"][1] == 1
               for v in codes.values()), codes
    table = report["tables"]["embedding.user"]
    assert table["num_bits"] == 4 and table["storage"] == "packed"
    assert table["float32_bytes"] == 4 * 100 * 8


def test_packed_exports_shrink_with_the_bits(tmp_path):
    """The codes of 4-bit and 2-bit exports take 1/2 and 1/4 of the 8-bit
    bytes, measured in the export's checkpoint."""
    sizes = {}
    for bits in (8, 4, 2):
        features = [FeatureConfig("id", TableConfig(
            "id", 4096, 16, num_bits=bits, storage="packed",
            step_size="table"))]
        model = build_ctr_model(features, model="dnn", hidden_units=(4,))
        report = export_size_report(export_for_serving(
            model, str(tmp_path / str(bits)), "ctr"))
        sizes[bits] = report["variables"]["embedding.id.codes"]["bytes"]
        table = report["tables"]["embedding.id"]
        assert table["float32_bytes"] == 4 * 4096 * 16
    assert sizes[8] == 4096 * 16  # one byte per code
    assert sizes[8] == 2 * sizes[4] == 4 * sizes[2], sizes


def test_models_without_symbolic_inputs_need_a_signature(tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.embedding = FeatureEmbedding(simple_features({"user": 10}))
            self.logit = keras.layers.Dense(1)

        def call(self, features, training=False):
            rows = self.embedding(features, training=training)
            return tf.sigmoid(self.logit(tf.reshape(rows, [-1, 16])))

    model = Subclassed()
    x = {"user": np.arange(4)}
    expected = model(x, training=False).numpy()
    with pytest.raises(ValueError, match="pass `input_signature`"):
        export_for_serving(model, str(tmp_path), "sub")
    version_dir = export_for_serving(
        model, str(tmp_path), "sub",
        input_signature={"user": tf.TensorSpec([None], tf.int64)})
    served = _serve(version_dir, x, tmp_path)
    np.testing.assert_allclose(served["probability"], expected, atol=1e-6)


@pytest.mark.skipif(IS_KERAS_3, reason="TFRS 0.7.7 needs tf_keras "
                    "(TF_USE_LEGACY_KERAS=1); runs in the tf_keras pass")
def test_tfrs_ranking_model_exports(tmp_path):
    import tensorflow_recommenders as tfrs

    from alpt_keras.models import MLP

    class Ranking(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.embedding = FeatureEmbedding(
                simple_features({"user": 100, "item": 50}, embedding_dim=8))
            self.mlp = MLP([8])
            self.head = keras.layers.Dense(1)
            self.task = tfrs.tasks.Ranking(
                loss=keras.losses.BinaryCrossentropy(from_logits=True))

        def call(self, features, training=False):
            rows = self.embedding(features, training=training)
            logit = self.head(self.mlp(tf.reshape(rows, [-1, 16]),
                                       training=training))
            return tf.sigmoid(logit)

        def compute_loss(self, batch, training=False):
            features, labels = batch
            logit = self.head(self.mlp(tf.reshape(self.embedding(
                features, training=training), [-1, 16]), training=training))
            return self.task(labels=labels, predictions=logit)

    model = Ranking()
    model.compile(optimizer=ALPTOptimizer(keras.optimizers.Adam(1e-2)))
    x = {k: v for k, v in _inputs(256).items() if k != "genres"}
    data = tf.data.Dataset.from_tensor_slices(
        (x, (x["user"] % 2).astype("float32")[:, None])).batch(64)
    model.fit(data, epochs=1, verbose=0)
    version_dir = export_for_serving(
        model, str(tmp_path), "tfrs",
        input_signature={"user": tf.TensorSpec([None], tf.int64),
                         "item": tf.TensorSpec([None], tf.int64)})
    served = _serve(version_dir, x, tmp_path)
    np.testing.assert_allclose(served["probability"],
                               model(x, training=False).numpy(), atol=1e-6)


def test_staging_folders_of_dead_exports_are_removed(tmp_path):
    """A killed export leaves its staging folder; the next export removes
    it (its process is dead), but never one of a live export."""
    model = build_ctr_model(_features(), model="dnn", hidden_units=(8,))
    model_dir = tmp_path / "ctr"
    model_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; "
                           "print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = saved_model_module.socket.gethostname().replace("-", "_")
    leftovers = {
        "dead": f".tmp-1-{host}-{dead}-0123abcd",
        "alive": f".tmp-1-{host}-{os.getpid()}-4567abcd",
        "old_format": ".tmp-1-89abcdef",
    }
    for name in leftovers.values():
        (model_dir / name).mkdir()
        (model_dir / name / "saved_model.pb").write_bytes(b"half")
    old = model_dir / leftovers["old_format"]
    os.utime(old, (0, 0))  # untouched for decades: stale
    assert export_for_serving(model, str(tmp_path), "ctr").endswith("ctr/1")
    assert sorted(os.listdir(model_dir)) == sorted(["1", leftovers["alive"]])


def test_an_export_that_loses_the_race_for_a_version_takes_the_next(
        tmp_path, monkeypatch):
    """Two exports that both chose version 1: the second to publish moves
    to version 2 (automatic versions) or gets a clear error (explicit)."""
    model = build_ctr_model(_features(), model="dnn", hidden_units=(8,))
    base = str(tmp_path)
    real_publish = saved_model_module._publish

    def rival_publishes_first(staging, model_dir, version, auto_version):
        rival = os.path.join(model_dir, str(version))
        os.makedirs(rival)
        open(os.path.join(rival, "saved_model.pb"), "w").close()
        return real_publish(staging, model_dir, version, auto_version)

    monkeypatch.setattr(saved_model_module, "_publish",
                        rival_publishes_first)
    assert export_for_serving(model, base, "ctr").endswith("ctr/2")
    with pytest.raises(ValueError, match="Version 3 was published by "
                       "another export"):
        export_for_serving(model, base, "ctr", version=3)
    assert sorted(os.listdir(tmp_path / "ctr")) == ["1", "2", "3"]
    assert os.path.getsize(tmp_path / "ctr" / "3" / "saved_model.pb") == 0


@pytest.mark.parametrize("case", ["out_of_range", "missing_feature"])
def test_bad_warmup_examples_are_a_clear_error_and_publish_nothing(
        tmp_path, case):
    model = build_ctr_model(_features(), model="dnn", hidden_units=(8,))
    rows = _inputs(20)
    if case == "out_of_range":
        name = sorted(rows)[0]
        rows[name] = rows[name].copy()
        rows[name][3] = 10**6
        match = (r"warm-up request 1 fails.*ids must be in \[0, input_dim\)"
                 r" of their table.*for feature \"genres\" \(table "
                 r"\"genre\", input_dim=20\)")
    else:
        rows.pop(sorted(rows)[0])
        match = "warm-up request 1 fails"
    with pytest.raises(ValueError, match=match):
        export_for_serving(model, str(tmp_path), "ctr",
                           warmup_examples=rows)
    assert os.listdir(tmp_path / "ctr") == []  # no version, no staging


def test_serving_input_signature_names_the_features():
    # What `export_for_serving` and `alpt-export --warmup-rows` build the
    # signature (and warm-up rows) from: one named spec per model input.
    model = build_ctr_model(_features(), model="dnn", hidden_units=(4,))
    signature = serving_input_signature(model)
    assert sorted(signature) == ["genres", "item", "user"]
    assert signature["genres"].shape.as_list() == [None, 3]
    assert signature["user"].name == "user"
    given = serving_input_signature(
        model, {"user": tf.TensorSpec([None], tf.int32)})
    assert given["user"].dtype == tf.int32 and given["user"].name == "user"
    with pytest.raises(TypeError, match="tf.TensorSpec"):
        serving_input_signature(model, {"user": [None]})
