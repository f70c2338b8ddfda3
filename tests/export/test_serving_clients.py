"""Warm-up file, models.config, and the gRPC/REST clients on loopback."""

import http.server
import threading

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from alpt_keras.export import export_for_serving
from alpt_keras.export.client import (
    GrpcPredictClient,
    RestPredictClient,
    ServingError,
)
from alpt_keras.export.serving_files import (
    read_warmup_requests,
    write_model_config,
)
from alpt_keras.models import build_ctr_model, simple_features
from tests.export.serving_doubles import (
    GrpcDouble,
    RestDouble,
    SavedModelBackend,
)


def _rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"user": rng.integers(0, 100, n), "item": rng.integers(0, 50, n)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving")
    model = build_ctr_model(simple_features({"user": 100, "item": 50},
                                            embedding_dim=8),
                            model="dnn", hidden_units=(8,))
    version_dir = export_for_serving(model, str(base), "ctr",
                                     warmup_examples=_rows())
    backend = SavedModelBackend(version_dir, "ctr")
    grpc_double, rest_double = GrpcDouble(backend), RestDouble(backend)
    yield model, version_dir, backend, grpc_double, rest_double
    grpc_double.stop()
    rest_double.stop()
    backend.close()


def test_warmup_requests_parse_and_replay(served):
    model, version_dir, backend, _, _ = served
    requests = read_warmup_requests(
        f"{version_dir}/assets.extra/tf_serving_warmup_requests")
    assert len(requests) == 3  # 40 rows in requests of 16
    rows = _rows()
    for i, request in enumerate(requests):
        assert request.model_spec.name == "ctr"
        assert request.model_spec.signature_name == "serving_default"
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        np.testing.assert_array_equal(inputs["user"],
                                      rows["user"][16 * i:16 * (i + 1)])
        outputs = backend.run(inputs)  # replays through the session loader
        np.testing.assert_allclose(outputs["probability"],
                                   model.predict(inputs, verbose=0),
                                   atol=1e-6)


def test_models_config_is_a_model_server_config(tmp_path):
    path = write_model_config(str(tmp_path / "models.config"),
                              {"ctr": "/srv/models/ctr", "ranker": "x"})
    config = model_server_config_pb2.ModelServerConfig()
    with open(path, encoding="utf-8") as f:
        text_format.Parse(f.read(), config)
    entries = {c.name: c for c in config.model_config_list.config}
    assert entries["ctr"].base_path == "/srv/models/ctr"
    assert entries["ranker"].base_path.endswith("/x")
    assert entries["ctr"].model_platform == "tensorflow"
    with pytest.raises(ValueError, match="at least one model"):
        write_model_config(str(tmp_path / "empty.config"), {})


def test_grpc_client_predicts_and_reports_errors(served):
    model, _, _, grpc_double, _ = served
    rows = _rows(5, seed=3)
    with GrpcPredictClient(grpc_double.target, "ctr", timeout=10) as client:
        out = client.predict(rows)
        np.testing.assert_allclose(out["probability"],
                                   model.predict(rows, verbose=0), atol=1e-6)
        assert out["logit"].shape == (5, 1)
        with pytest.raises(ServingError, match=r"INVALID_ARGUMENT.*unknown "
                           r"\['userid'\]"):
            client.predict({"userid": rows["user"], "item": rows["item"]})
        with pytest.raises(ServingError, match="to be int64 but float"):
            client.predict({"user": rows["user"] * 1.5, "item": rows["item"]})
        with pytest.raises(ServingError, match="input_dim=100"):
            client.predict({"user": [100], "item": [1]})
    with GrpcPredictClient(grpc_double.target, "other") as client:
        with pytest.raises(ServingError, match="NOT_FOUND"):
            client.predict(rows)


def test_grpc_client_server_down_is_clear():
    with GrpcPredictClient("127.0.0.1:1", "ctr", timeout=2) as client:
        with pytest.raises(ServingError, match="unavailable"):
            client.predict(_rows(2))


@pytest.mark.parametrize("form", ["inputs", "instances"])
def test_rest_client_both_forms(served, form):
    model, _, _, _, rest_double = served
    rows = _rows(6, seed=4)
    client = RestPredictClient(rest_double.url, "ctr", timeout=10)
    out = client.predict(rows, form=form)
    np.testing.assert_allclose(out["probability"],
                               model.predict(rows, verbose=0), atol=1e-6)
    with pytest.raises(ServingError, match=r"HTTP 400.*unknown \['userid'\]"):
        client.predict({"userid": rows["user"], "item": rows["item"]},
                       form=form)


def test_rest_client_errors_are_clear(served):
    _, _, _, _, rest_double = served
    with pytest.raises(ServingError, match="HTTP 404"):
        RestPredictClient(rest_double.url, "nope").predict(_rows(2))
    with pytest.raises(ServingError, match="unreachable"):
        RestPredictClient("http://127.0.0.1:1", "ctr", timeout=2).predict(
            _rows(2))
    with pytest.raises(ValueError, match="form='rows'"):
        RestPredictClient(rest_double.url, "ctr").predict(_rows(2),
                                                          form="rows")
    with pytest.raises(ValueError, match="same number of rows"):
        RestPredictClient(rest_double.url, "ctr").predict(
            {"user": [1, 2], "item": [1]})


class _CannedReplies(http.server.BaseHTTPRequestHandler):
    """Replies of a misbehaving server, by model name."""

    REPLIES = {
        "error200": (200, b'{"error": "Servable not found for request"}'),
        "notjson": (200, b"<html>bad gateway</html>"),
        "list400": (400, b'["not", "an", "object"]'),
        "text500": (500, b"upstream crashed"),
        "nooutputs": (200, b'{"model_version": 1}'),
        "badrows": (200, b'{"predictions": [{"a": 1}, {"b": 2}]}'),
        "notalist": (200, b'{"predictions": 3}'),
    }

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        name = self.path.split("/")[3].split(":")[0]
        status, body = self.REPLIES[name]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def canned_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             _CannedReplies)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("model, form, message", [
    ("error200", "inputs", "rejected.*Servable not found"),
    ("notjson", "inputs", "not JSON.*bad gateway"),
    ("list400", "inputs", r"HTTP 400.*\[\"not\""),
    ("text500", "inputs", "HTTP 500.*upstream crashed"),
    ("nooutputs", "inputs", "not a predict reply.*'outputs'"),
    ("badrows", "instances", "not a predict reply.*KeyError"),
    ("notalist", "instances", "not a predict reply"),
])
def test_rest_client_malformed_replies_are_serving_errors(canned_server,
                                                          model, form,
                                                          message):
    client = RestPredictClient(canned_server, model, timeout=5)
    with pytest.raises(ServingError, match=message):
        client.predict(_rows(2), form=form)


@pytest.mark.parametrize("case", ["invalid_dtype", "truncated_content"])
def test_grpc_client_non_tensor_output_is_a_serving_error(case):
    """A reply whose output does not decode to an array (no valid dtype,
    or content shorter than its shape) is a `ServingError` naming the
    model, not a raw `TypeError`/`ValueError` from protobuf decoding."""
    from concurrent import futures

    import grpc
    from tensorflow.core.framework import (
        tensor_pb2,
        tensor_shape_pb2,
        types_pb2,
    )
    from tensorflow_serving.apis import (
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    if case == "invalid_dtype":
        bad = tensor_pb2.TensorProto(dtype=0)
    else:
        bad = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)]),
            tensor_content=b"\x00\x01")

    class Broken(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            response = predict_pb2.PredictResponse()
            response.outputs["probability"].CopyFrom(bad)
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcPredictClient(f"127.0.0.1:{port}", "ctr",
                               timeout=10) as client:
            with pytest.raises(ServingError, match="reply for model 'ctr' "
                               "holds an output that is not a tensor"):
                client.predict(_rows(2))
    finally:
        server.stop(grace=None)
