"""Clients for a TF Serving model: gRPC `PredictionService` and REST.

    with GrpcPredictClient("127.0.0.1:8500", "ctr") as client:
        client.predict({"user": [1, 2], "item": [3, 4]})["probability"]
    RestPredictClient("http://127.0.0.1:8501", "ctr").predict({...})

Both take a dict of feature arrays and return a dict of NumPy outputs, with
a timeout on every call. Failures raise `ServingError` saying what happened:
the server is unreachable, the call timed out, or the server rejected the
request (wrong input name, wrong dtype, out-of-range id), with the server's
own message.
"""

import json
import urllib.error
import urllib.request

import numpy as np


class ServingError(RuntimeError):
    """A prediction request that TF Serving did not answer successfully."""


def _error_message(body, fallback):
    """The `"error"` of a TF Serving error reply, else its text (or
    `fallback` when it has none)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:200] or fallback
    if isinstance(payload, dict) and "error" in payload:
        return payload["error"]
    return text[:200] or fallback


def _check_features(features):
    if not isinstance(features, dict) or not features:
        raise ValueError("`features` must be a non-empty dict feature name "
                         f"-> values. Received: {features!r}")
    arrays = {name: np.asarray(value) for name, value in features.items()}
    rows = {len(a) if a.ndim else 1 for a in arrays.values()}
    if len(rows) != 1:
        shapes = {k: a.shape for k, a in arrays.items()}
        raise ValueError("Every feature must have the same number of rows. "
                         f"Received shapes: {shapes}")
    return arrays


class GrpcPredictClient:
    """`tensorflow.serving.PredictionService/Predict` over gRPC.

    Args:
        target: `"host:port"` of the gRPC endpoint (TF Serving: 8500).
        model_name: the served model name.
        signature_name: defaults to `"serving_default"`.
        timeout: seconds per call. Defaults to `10.0`.
    """

    def __init__(self, target, model_name, signature_name="serving_default",
                 timeout=10.0):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target, self.model_name = target, model_name
        self.signature_name, self.timeout = signature_name, timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(
            self._channel)

    def predict(self, features):
        """Returns dict output name -> `np.ndarray`."""
        import grpc
        import tensorflow as tf

        from alpt_keras.export.serving_files import predict_request

        arrays = _check_features(features)
        request = predict_request(arrays, self.model_name,
                                  self.signature_name)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ServingError(
                    f"TF Serving at {self.target} is unavailable "
                    f"(is the server running?): {error.details()}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServingError(
                    f"TF Serving at {self.target} did not answer within "
                    f"{self.timeout} s") from None
            raise ServingError(
                f"TF Serving rejected the request for model "
                f"'{self.model_name}' ({code.name}): {error.details()}"
            ) from None
        try:
            return {name: tf.make_ndarray(proto)
                    for name, proto in response.outputs.items()}
        except (TypeError, ValueError) as error:
            raise ServingError(
                f"TF Serving's reply for model '{self.model_name}' holds an "
                f"output that is not a tensor: {error}") from None

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RestPredictClient:
    """TF Serving's REST predict API: `POST /v1/models/<name>:predict`.

    Args:
        url: base URL of the REST endpoint (TF Serving: port 8501).
        model_name: the served model name.
        signature_name: defaults to `"serving_default"`.
        timeout: seconds per call. Defaults to `10.0`.
    """

    def __init__(self, url, model_name, signature_name="serving_default",
                 timeout=10.0):
        self.url = url.rstrip("/")
        self.model_name, self.signature_name = model_name, signature_name
        self.timeout = timeout

    def predict(self, features, form="inputs"):
        """Returns dict output name -> `np.ndarray`.

        Args:
            features: dict feature name -> rows.
            form: `"inputs"` (columnar request, `{"outputs": ...}` reply) or
                `"instances"` (row request, `{"predictions": [...]}` reply).
        """
        arrays = _check_features(features)
        if form == "inputs":
            body = {"signature_name": self.signature_name,
                    "inputs": {k: a.tolist() for k, a in arrays.items()}}
        elif form == "instances":
            rows = len(next(iter(arrays.values())))
            body = {"signature_name": self.signature_name,
                    "instances": [{k: a[i].tolist() for k, a in
                                   arrays.items()} for i in range(rows)]}
        else:
            raise ValueError("`form` must be 'inputs' or 'instances'. "
                             f"Received: form={form!r}")
        endpoint = f"{self.url}/v1/models/{self.model_name}:predict"
        request = urllib.request.Request(
            endpoint, data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request,
                                        timeout=self.timeout) as reply:
                text = reply.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            raise ServingError(
                f"TF Serving rejected the request for model "
                f"'{self.model_name}' (HTTP {error.code}): "
                f"{_error_message(error.read(), error.reason)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServingError(
                f"TF Serving at {self.url} is unreachable or did not answer "
                f"within {self.timeout} s: {reason}") from None
        try:
            payload = json.loads(text)
        except ValueError:
            raise ServingError(
                f"TF Serving's reply for model '{self.model_name}' is not "
                f"JSON. Received: {text[:200]!r}") from None
        if isinstance(payload, dict) and "error" in payload:
            raise ServingError(
                f"TF Serving rejected the request for model "
                f"'{self.model_name}': {payload['error']}")
        try:
            return self._parse(payload, form)
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise ServingError(
                f"TF Serving's reply for model '{self.model_name}' is not a "
                f"predict reply of the {form!r} form ({type(error).__name__}"
                f": {error}). Received: {text[:200]!r}") from None

    @staticmethod
    def _parse(payload, form):
        if not isinstance(payload, dict):
            raise TypeError("the reply must be a JSON object")
        if form == "inputs":
            outputs = payload["outputs"]
            if not isinstance(outputs, dict):  # a single output
                outputs = {"output": outputs}
            return {k: np.asarray(v) for k, v in outputs.items()}
        predictions = payload["predictions"]
        if not isinstance(predictions, list):
            raise TypeError("'predictions' must be a list")
        if predictions and isinstance(predictions[0], dict):
            return {k: np.asarray([p[k] for p in predictions])
                    for k in predictions[0]}
        return {"output": np.asarray(predictions)}
