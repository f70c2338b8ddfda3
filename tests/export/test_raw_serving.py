"""Raw-feature exports (issue 14, item 7): `serving_default` takes the raw
Criteo columns as strings and preprocesses them in the graph; TF Serving's
loader, the REST and gRPC doubles and the warm-up replay all see the Keras
model's predictions; `serving_ids` keeps the id inputs."""

import os

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import ALPTOptimizer
from alpt_keras.compat import keras
from alpt_keras.export import (
    GrpcPredictClient,
    RestPredictClient,
    ServingError,
    export_for_serving,
    read_warmup_requests,
)
from alpt_keras.export.cli import main as export_main
from alpt_keras.models import RawFeatures, build_ctr_model
from alpt_keras.models.criteo import CriteoPipeline
from tests.export.serving_doubles import (
    GrpcDouble,
    RestDouble,
    SavedModelBackend,
)
from tests.export.test_saved_model import ALLOWED_OPS, _serve
from tests.models.test_raw_features import _criteo_file

ROWS = 64
# The preprocessing's ops, all core TensorFlow ops since 1.x (TF Serving
# 2.11 ships them): vocabulary tables from asset files (initialised once,
# guarded by VarIsInitializedOp), number parsing and binning.
RAW_OPS = frozenset({
    "AsString", "Floor", "HashTableV2", "InitializeTableFromTextFileV2",
    "Log", "LookupTableFindV2", "RegexFullMatch", "StringToNumber",
    "Fill", "Equal", "Greater", "IsFinite", "LogicalAnd",
    "VarIsInitializedOp",
})


@pytest.fixture(scope="module")
def raw_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    pipeline = CriteoPipeline(_criteo_file(base / "train.txt", 1500,
                                           seed=0)).fit()
    model = build_ctr_model(pipeline.feature_configs(embedding_dim=4),
                            model="dnn", hidden_units=(8,))
    model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2)),
                  "binary_crossentropy")
    x, y = pipeline.arrays("train")
    model.fit(x, y, batch_size=256, verbose=0)
    raw = pipeline.raw_rows("test", ROWS)
    ids, _ = pipeline.arrays("test")  # the same lines, in file order
    ids = {k: v[:ROWS] for k, v in ids.items()}
    version_dir = export_for_serving(model, str(base / "serving"), "ctr",
                                     preprocessing=RawFeatures(pipeline),
                                     warmup_examples=raw)
    expected = model.predict(ids, verbose=0)
    return model, pipeline, version_dir, raw, ids, expected, base


@pytest.mark.slow
def test_the_session_loader_serves_raw_columns(raw_export, tmp_path):
    _, pipeline, version_dir, raw, _, expected, _ = raw_export
    assert set(raw) == {f"I{i}" for i in range(1, 14)} | {
        f"C{i}" for i in range(1, 27)}
    assert any("" in v for v in raw.values())  # missing values included
    served = _serve(version_dir, raw, tmp_path)
    assert str(served["_error"]) == ""
    np.testing.assert_allclose(served["probability"], expected, atol=1e-6)
    ops = set(served["_ops"].tolist())
    assert ops <= ALLOWED_OPS | RAW_OPS, sorted(ops - ALLOWED_OPS - RAW_OPS)
    # Vocabularies are asset files, not graph constants.
    assets = sorted(os.listdir(os.path.join(version_dir, "assets")))
    assert len(assets) == 39 and "C1.vocab" in assets
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        assert os.path.getsize(f.name) < 2_000_000
    # A value the integer parse refuses: INVALID_ARGUMENT naming the column.
    bad = dict(raw, I3=np.array(["abc"] + list(raw["I3"][1:])))
    served = _serve(version_dir, bad, tmp_path)
    assert "Criteo column I3 must be a number or empty" in \
        str(served["_error"])


@pytest.mark.slow
def test_serving_ids_keeps_the_id_inputs(raw_export):
    _, _, version_dir, _, ids, expected, _ = raw_export
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "serving_ids"}
    out = loaded.signatures["serving_ids"](
        **{k: tf.constant(v) for k, v in ids.items()})
    np.testing.assert_allclose(out["probability"], expected, atol=1e-6)


@pytest.mark.slow
def test_raw_requests_over_rest_grpc_and_warm_up(raw_export):
    _, _, version_dir, raw, _, expected, _ = raw_export
    backend = SavedModelBackend(version_dir, "ctr")
    rest, grpc_double = RestDouble(backend), GrpcDouble(backend)
    try:
        rows = {k: v[:5].tolist() for k, v in raw.items()}
        for form in ("inputs", "instances"):
            out = RestPredictClient(rest.url, "ctr").predict(rows, form=form)
            np.testing.assert_allclose(out["probability"], expected[:5],
                                       atol=1e-6)
        with GrpcPredictClient(grpc_double.target, "ctr") as client:
            out = client.predict(rows)
            np.testing.assert_allclose(out["probability"], expected[:5],
                                       atol=1e-6)
            with pytest.raises(ServingError, match="INVALID_ARGUMENT.*"
                               "Criteo column I1 must be a number"):
                client.predict(dict(rows, I1=["x"] * 5))
        requests = read_warmup_requests(os.path.join(
            version_dir, "assets.extra", "tf_serving_warmup_requests"))
        assert len(requests) == ROWS // 16
        for i, request in enumerate(requests):
            inputs = {k: tf.make_ndarray(v) for k, v in
                      request.inputs.items()}
            assert inputs["C1"].dtype == object  # strings, as in the file
            out = backend.run(inputs)
            np.testing.assert_allclose(out["probability"],
                                       expected[16 * i:16 * (i + 1)],
                                       atol=1e-6)
    finally:
        rest.stop()
        grpc_double.stop()
        backend.close()


@pytest.mark.slow
def test_alpt_export_vocabulary_flag(raw_export, tmp_path, capsys):
    model, pipeline, _, raw, _, expected, _ = raw_export
    model.save(str(tmp_path / "model.keras"))
    pipeline.save_vocabulary(str(tmp_path / "vocabulary.json"))
    assert export_main([str(tmp_path / "model.keras"),
                        str(tmp_path / "serving"), "--vocabulary",
                        str(tmp_path / "vocabulary.json")]) == 0
    version_dir = capsys.readouterr().out.strip().splitlines()[-1]
    loaded = tf.saved_model.load(version_dir)
    out = loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in raw.items()})
    np.testing.assert_allclose(out["probability"], expected, atol=1e-6)
    # Its warm-up request: empty (missing) raw values, valid for any model.
    requests = read_warmup_requests(os.path.join(
        version_dir, "assets.extra", "tf_serving_warmup_requests"))
    assert requests and set(requests[0].inputs) == set(raw)
    assert export_main([str(tmp_path / "model.keras"),
                        str(tmp_path / "serving"), "--vocabulary",
                        str(tmp_path / "missing.json")]) == 2
    assert "--vocabulary must be an existing file" in \
        capsys.readouterr().err
