"""TF Serving side files: warm-up requests and `models.config`.

- `write_warmup_requests`: `assets.extra/tf_serving_warmup_requests`, a
  TFRecord of `PredictionLog` records that TF Serving replays when it loads
  a version, so the first real request does not pay for graph warm-up. At
  most 1000 records (TF Serving's limit).
- `write_model_config`: a `ModelServerConfig` text proto for
  `tensorflow_model_server --model_config_file=...`.
"""

import os

import numpy as np
import tensorflow as tf

MAX_WARMUP_RECORDS = 1000
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def predict_request(features, model_name, signature_name="serving_default"):
    """A `PredictRequest` with one int64/float tensor per feature."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for name, value in features.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return request


def write_warmup_requests(version_dir, examples, model_name,
                          signature_name="serving_default", batch_size=16,
                          max_records=100):
    """Writes warm-up `PredictionLog`s built from real example rows.

    Args:
        version_dir: the SavedModel version directory.
        examples: dict feature name -> array of rows (the same dtypes and
            shapes the signature takes).
        model_name: the served model name.
        signature_name: defaults to `"serving_default"`.
        batch_size: rows per request. Defaults to `16`.
        max_records: at most this many requests (<= 1000). Defaults to `100`.

    Returns:
        The path of the warm-up file.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    if not 1 <= max_records <= MAX_WARMUP_RECORDS:
        raise ValueError(f"`max_records` must be in [1, {MAX_WARMUP_RECORDS}]."
                         f" Received: max_records={max_records!r}")
    sizes = {len(np.asarray(v)) for v in examples.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("`examples` must hold the same positive number of "
                         f"rows per feature. Received row counts: {sizes}")
    rows = sizes.pop()
    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for start in range(0, min(rows, batch_size * max_records),
                           batch_size):
            batch = {k: np.asarray(v)[start:start + batch_size]
                     for k, v in examples.items()}
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(
                    request=predict_request(batch, model_name,
                                            signature_name)))
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path):
    """The `PredictRequest`s of a warm-up file."""
    from tensorflow_serving.apis import prediction_log_pb2

    requests = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests


def write_model_config(path, models):
    """Writes a `ModelServerConfig` text proto.

    Args:
        path: the file to write (`models.config`).
        models: dict model name -> base path (absolute paths recommended;
            TF Serving resolves them on the server).
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if not models:
        raise ValueError("`models` must name at least one model. "
                         "Received: {}")
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = os.path.abspath(base_path)
        entry.model_platform = "tensorflow"
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text_format.MessageToString(config))
    os.replace(tmp, path)
    return path
