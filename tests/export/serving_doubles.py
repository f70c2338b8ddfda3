"""Loopback test doubles of TF Serving, backed by a real SavedModel.

`SavedModelBackend` runs the export exactly as TF Serving does (TF1 session,
"serve" tag, signature tensors). The gRPC double implements the
`tensorflow_serving.apis` `PredictionService` servicer; the REST double
follows the REST API docs: `POST /v1/models/<name>:predict` with
`{"instances": [...]}` (reply `{"predictions": [...]}`) or `{"inputs": ...}`
(reply `{"outputs": ...}`), and errors as `{"error": "..."}` with HTTP 400
(404 for an unknown model). Both bind 127.0.0.1 on an ephemeral port.
"""

import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


class SavedModelBackend:
    def __init__(self, version_dir, model_name):
        self.model_name = model_name
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"],
                                                    version_dir)
        self.signature = meta.signature_def["serving_default"]
        self.lock = threading.Lock()

    def run(self, inputs):
        """inputs: dict name -> np.ndarray. Raises ValueError like TF
        Serving's INVALID_ARGUMENT."""
        expected = self.signature.inputs
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise ValueError(f"input names mismatch: unknown {unknown}, "
                             f"missing {missing}")
        feed = {}
        for name, value in inputs.items():
            want = tf.dtypes.as_dtype(expected[name].dtype)
            if not np.can_cast(value.dtype, want.as_numpy_dtype,
                               casting="same_kind") or value.dtype.kind == "f":
                raise ValueError(f"Expects arg[{name}] to be {want.name} but "
                                 f"{tf.as_dtype(value.dtype).name} is "
                                 "provided")
            feed[expected[name].name] = value.astype(want.as_numpy_dtype)
        fetch = {k: v.name for k, v in self.signature.outputs.items()}
        with self.lock:
            try:
                return self.session.run(fetch, feed)
            except tf.errors.InvalidArgumentError as error:
                # TF Serving forwards the runtime's message (the assert's).
                raise ValueError(" ".join(error.message.split())) from None

    def close(self):
        self.session.close()


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, backend):
        self.backend = backend

    def Predict(self, request, context):
        if request.model_spec.name != self.backend.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Latest("
                          f"{request.model_spec.name})")
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        try:
            outputs = self.backend.run(inputs)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return response


class GrpcDouble:
    def __init__(self, backend):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _Servicer(backend), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(grace=None)


class RestDouble:
    def __init__(self, backend):
        handler = _rest_handler(backend)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _rest_handler(backend):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, code, payload):
            data = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            path = f"/v1/models/{backend.model_name}:predict"
            if self.path != path:
                return self._reply(404, {"error": "Servable not found for "
                                         f"request: {self.path}"})
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                return self._reply(400, {"error": "JSON Parse error"})
            try:
                if "instances" in body:
                    rows = body["instances"]
                    inputs = {k: np.asarray([r[k] for r in rows])
                              for k in rows[0]}
                elif "inputs" in body:
                    inputs = {k: np.asarray(v)
                              for k, v in body["inputs"].items()}
                else:
                    raise ValueError("Missing 'inputs' or 'instances' key")
                outputs = backend.run(inputs)
            except (ValueError, KeyError, IndexError) as error:
                return self._reply(400, {"error": str(error)})
            if "instances" in body:
                n = len(next(iter(outputs.values())))
                return self._reply(200, {"predictions": [
                    {k: v[i].tolist() for k, v in outputs.items()}
                    for i in range(n)]})
            return self._reply(200, {"outputs": {
                k: v.tolist() for k, v in outputs.items()}})

    return Handler
