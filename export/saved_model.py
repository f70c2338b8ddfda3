"""`export_for_serving`: a TF Serving SavedModel that keeps low-bit tables.

What is written, under `<base_path>/<model_name>/<version>/`:
- `saved_model.pb` with one signature, `serving_default`: named int64
  feature inputs (`[batch]`, or `[batch, max_ids]` for multi-hot features)
  and the outputs `probability` (and `logit` for models with a layer named
  `"logit"`, such as every model of `alpt_keras.models`). With
  `preprocessing` (e.g. `alpt_keras.models.RawFeatures`), `serving_default`
  takes the raw columns instead and runs the preprocessing in the graph,
  its vocabularies as SavedModel assets, and `serving_ids` keeps the id
  inputs;
- `variables/`: only what inference reads. ALPT tables stay integer codes
  plus step sizes, dequantized in the graph with stock ops (`ResourceGather`,
  `Cast`, `Mul`). No optimizer state, no gradient carriers, and no variable
  stored twice (Keras 3's `model.export` stores every variable twice,
  keras-team/keras#23553, and saving the whole model drags optimizer slots
  along).

Out-of-range ids fail the request with `InvalidArgumentError` ("ids must be
in [0, input_dim=...)"); they are never read as another row.

The version directory is written under a temporary name in the same folder
and renamed into place, so TF Serving (which only loads integer-named
directories) never sees a half-written version, and a failure leaves nothing
behind.
"""

import json
import os
import shutil
import socket
import time
import uuid

import tensorflow as tf

from alpt_keras import tables
from alpt_keras.compat import flatten_layers, keras, tf_variable
from alpt_keras.table import find_table
from alpt_keras.validation import check_int

SIGNATURE_KEY = "serving_default"
# With raw-feature preprocessing, the id inputs stay reachable under this
# name (and `serving_default` takes the raw columns).
IDS_SIGNATURE_KEY = "serving_ids"
# Describes each ALPT table of an export (shape, bits, storage), so tools
# can decode the codes and size reports know `D` of packed tables. TF
# Serving ignores `assets.extra/` files other than its warm-up requests.
TABLES_FILE = "alpt_tables.json"


def next_version(model_dir):
    """1 + the largest integer-named directory in `model_dir` (else 1)."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def serving_input_signature(model, input_signature=None):
    """The serving signature's inputs: feature name -> `tf.TensorSpec`
    named after the feature. Taken from `input_signature` if given (checked),
    else from the model's symbolic inputs (functional models; subclassed
    and TFRS models must pass `input_signature`)."""
    if input_signature is not None:
        if not isinstance(input_signature, dict) or not all(
                isinstance(s, tf.TensorSpec) for s in
                input_signature.values()):
            raise TypeError(
                "`input_signature` must be a dict feature name -> "
                f"tf.TensorSpec. Received: {input_signature!r}")
        return {name: tf.TensorSpec(spec.shape, spec.dtype, name=name)
                for name, spec in input_signature.items()}
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            "This model has no symbolic inputs (a subclassed or TFRS "
            "model): pass `input_signature`, e.g. {'user': tf.TensorSpec("
            "[None], tf.int64, name='user')}. Received: "
            "input_signature=None")
    signature = {}
    for tensor in inputs:
        name = tensor.name.split(":")[0]
        signature[name] = tf.TensorSpec(tuple(tensor.shape),
                                        tf.as_dtype(tensor.dtype), name=name)
    return signature


class _ServingModule(tf.Module):
    """Tracks the serving variables and the signature function only."""

    def __init__(self, model, signature, variables, preprocessing=None):
        super().__init__(name="alpt_serving")
        # Only these are tracked (not the model: that would drag optimizer
        # state into the export).
        self.serving_variables = dict(variables)
        logit_layer = None
        try:
            logit_layer = model.get_layer("logit")
        except (ValueError, AttributeError):
            logit_layer = None
        if logit_layer is not None and getattr(model, "inputs", None):
            outputs_model = keras.Model(model.inputs,
                                        [logit_layer.output, model.output])
        else:
            outputs_model = None

        def serve(features):
            if outputs_model is not None:
                logit, probability = outputs_model(features, training=False)
                return {"probability": tf.cast(probability, tf.float32),
                        "logit": tf.cast(logit, tf.float32)}
            output = model(features, training=False)
            return {"probability": tf.cast(output, tf.float32)}

        self.serve = tf.function(serve, input_signature=[signature])
        self.serve_raw = None
        if preprocessing is not None:
            # Tracked, so its lookup tables and vocabulary assets are saved.
            self.preprocessing = preprocessing

            def serve_raw(raw):
                ids = preprocessing(raw)
                return serve({name: tf.cast(ids[name], spec.dtype)
                              for name, spec in signature.items()})

            self.serve_raw = tf.function(
                serve_raw, input_signature=[preprocessing.input_signature()])


def _variable_paths(model):
    """id(variable) -> "layer/sublayer/name", the same in both flavours
    (tf_keras variable names omit the enclosing layers)."""
    paths = {}

    def walk(layer, prefix):
        for sub in flatten_layers(layer, recursive=False):
            walk(sub, f"{prefix}/{sub.name}" if prefix else sub.name)
        for variable in layer.weights:  # deeper layers claimed theirs
            if id(variable) not in paths:
                leaf = variable.name.split("/")[-1].split(":")[0]
                paths[id(variable)] = f"{prefix}/{leaf}" if prefix else leaf

    walk(model, "")
    return paths


def serving_variables(model):
    """The variables inference reads, keyed by a readable path: the model's
    weights without the ALPT gradient carriers (the variables that carry
    an ALPT table's tag; optimizer variables are not model weights)."""
    paths = _variable_paths(model)
    out = {}
    for variable in model.weights:
        path = paths.get(id(variable), variable.name.split(":")[0])
        if find_table(variable) is not None:  # a gradient carrier
            continue
        key, n = path.replace("/", "."), 1
        while key in out:
            n += 1
            key = f"{path.replace('/', '.')}_{n}"
        out[key] = tf_variable(variable)
    return out


# Written by TF >= 2.14 but unknown to older servers: TF Serving 2.11-2.13
# refuse the whole SavedModel ("Op type not registered 'DisableCopyOnRead'
# ... While importing FunctionDef: __inference__traced_save",
# tensorflow/tensorflow#62489; "NodeDef mentions attribute debug_name which
# is not in the op definition", tensorflow/tfjs#8260). Both only serve
# checkpoint *saving*, which a server never does.
_NEWER_OPS = ("DisableCopyOnRead",)
_NEWER_ATTRS = ("debug_name",)


def _strip_newer_ops(version_dir):
    """Removes `_NEWER_OPS` nodes and `_NEWER_ATTRS` attributes in place."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(version_dir, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        saved_model.ParseFromString(f.read())

    def clean(nodes):
        dropped = {n.name for n in nodes if n.op in _NEWER_OPS}
        keep = [n for n in nodes if n.op not in _NEWER_OPS]
        for node in keep:
            for attr in _NEWER_ATTRS:
                if attr in node.attr:
                    del node.attr[attr]
            inputs = [i for i in node.input if i.lstrip("^") not in dropped]
            del node.input[:]
            node.input.extend(inputs)
        del nodes[:]
        nodes.extend(keep)
        return dropped

    for meta_graph in saved_model.meta_graphs:
        clean(meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            dropped = clean(function.node_def)
            for key in [k for k, v in function.control_ret.items()
                        if v in dropped]:
                del function.control_ret[key]
            outputs = [o for o in function.signature.control_output
                       if o in function.control_ret]
            del function.signature.control_output[:]
            function.signature.control_output.extend(outputs)
    with open(path, "wb") as f:
        f.write(saved_model.SerializeToString())


def alpt_tables(model, variables):
    """Export key prefix -> settings of every ALPT table among `variables`
    (as returned by `serving_variables`), with the keys of its codes and
    step-size variables and the logical tables it stacks (`"tables"`:
    name -> input_dim, row_offset)."""
    keys = {id(v): k for k, v in variables.items()}
    out = {}
    for table in tables(model):
        codes = keys.get(id(tf_variable(table.codes)))
        step_sizes = keys.get(id(tf_variable(table.step_sizes)))
        if codes is None or step_sizes is None:
            continue
        spec = table.spec
        prefix = codes.rpartition(".")[0]
        out[prefix] = {
            "input_dim": spec.input_dim, "output_dim": spec.output_dim,
            "num_bits": spec.num_bits, "storage": table.storage.kind,
            # "step_size" (the mode, as the layer argument) kept for
            # readers of exports written before "step_size_mode".
            "step_size": spec.step_size_mode,
            "step_size_mode": spec.step_size_mode,
            "variables": {"codes": codes, "step_sizes": step_sizes},
            # The logical tables stacked in these variables (one for an
            # ALPTEmbedding): table t owns rows [row_offset, +input_dim).
            "tables": {t.name: {"input_dim": t.input_dim,
                                "row_offset": spec.offsets[i]}
                       for i, t in enumerate(spec.tables)}}
    return out


def export_for_serving(model, base_path, model_name="model", version=None,
                       input_signature=None, warmup_examples=None,
                       preprocessing=None):
    """Writes a TF Serving SavedModel and returns its version directory.

    Args:
        model: a built Keras model of the active flavour (any model of
            `alpt_keras.models`, or your own functional, subclassed or TFRS
            model containing `ALPTEmbedding` layers).
        base_path: str. The model base path TF Serving watches.
        model_name: str. The folder under `base_path` (and the name clients
            use). Defaults to `"model"`.
        version: positive int, or `None` for the next integer version.
        input_signature: dict feature name -> `tf.TensorSpec`; required for
            models without symbolic inputs (subclassed, TFRS).
        warmup_examples: optional dict feature name -> rows; written as TF
            Serving warm-up requests (`assets.extra/`) for
            `serving_default` (raw columns, as strings, with
            `preprocessing`).
        preprocessing: optional `tf.Module` with `input_signature()` (dict
            column -> `tf.TensorSpec`) that maps those columns to the
            model's features when called, e.g.
            `alpt_keras.models.RawFeatures(pipeline)`. `serving_default`
            then takes the raw columns, and `serving_ids` the features.

    Returns:
        str, the path `<base_path>/<model_name>/<version>`.
    """
    if not isinstance(model_name, str) or not model_name or \
            os.sep in model_name or model_name.startswith("."):
        raise ValueError("`model_name` must be a non-empty folder name. "
                         f"Received: model_name={model_name!r}")
    model_dir = os.path.join(base_path, model_name)
    auto_version = version is None
    if auto_version:
        version = next_version(model_dir)
    version = check_int("version", version, minimum=1)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise ValueError(f"Version {version} already exists: {final}. "
                         "Received: a version that TF Serving may be "
                         "serving; choose another or omit `version`.")
    signature = serving_input_signature(model, input_signature)
    if preprocessing is not None:
        produced = set(getattr(preprocessing, "field_names", signature))
        lacking = sorted(set(signature) - produced)
        if lacking or not callable(getattr(preprocessing, "input_signature",
                                           None)):
            raise ValueError(
                "`preprocessing` must be a callable tf.Module with "
                "`input_signature()` whose output holds every model input. "
                f"Received: {type(preprocessing).__name__}, missing "
                f"{lacking}")
    variables = serving_variables(model)
    module = _ServingModule(model, signature, variables, preprocessing)
    os.makedirs(model_dir, exist_ok=True)
    remove_dead_staging(model_dir)
    staging = os.path.join(model_dir, _staging_name(version))
    try:
        if module.serve_raw is None:
            signatures = {SIGNATURE_KEY: module.serve.get_concrete_function()}
        else:
            signatures = {
                SIGNATURE_KEY: module.serve_raw.get_concrete_function(),
                IDS_SIGNATURE_KEY: module.serve.get_concrete_function()}
        tf.saved_model.save(module, staging, signatures=signatures)
        _strip_newer_ops(staging)
        extra = os.path.join(staging, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, TABLES_FILE), "w") as f:
            json.dump(alpt_tables(model, variables), f, indent=1,
                      sort_keys=True)
        if warmup_examples is not None:
            from alpt_keras.export.serving_files import write_warmup_requests

            write_warmup_requests(staging, warmup_examples, model_name)
            replay_warmup_requests(staging)
        final = _publish(staging, model_dir, version, auto_version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


# Staging folders are named `.tmp-<version>-<host>-<pid>-<uuid>`: the next
# export removes those of dead processes on this host (and, from other hosts
# or older releases, those untouched for a day).
_STAGING_PREFIX = ".tmp-"
_STALE_SECONDS = 24 * 3600


def _staging_name(version):
    host = socket.gethostname().replace("-", "_")
    return (f"{_STAGING_PREFIX}{version}-{host}-{os.getpid()}-"
            f"{uuid.uuid4().hex}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_staging(model_dir):
    """Removes the staging folders that killed exports left in
    `model_dir`; returns their names."""
    removed = []
    host = socket.gethostname().replace("-", "_")
    for name in sorted(os.listdir(model_dir)):
        if not name.startswith(_STAGING_PREFIX):
            continue
        path = os.path.join(model_dir, name)
        parts = name[len(_STAGING_PREFIX):].split("-")
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit():
            dead = not _alive(int(parts[2]))
        else:
            try:
                dead = time.time() - os.path.getmtime(path) > _STALE_SECONDS
            except OSError:  # removed meanwhile
                continue
        if dead:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _publish(staging, model_dir, version, auto_version):
    """Renames `staging` to its version folder (atomic: TF Serving sees
    the whole version or none). When another export took that version
    meanwhile, an automatic version moves to the next free one; an
    explicit one is a clear error."""
    for _ in range(100):
        final = os.path.join(model_dir, str(version))
        try:
            if os.path.exists(final):
                raise FileExistsError(final)
            os.rename(staging, final)
            return final
        except OSError:
            if not os.path.exists(final):
                raise
            if not auto_version:
                raise ValueError(
                    f"Version {version} was published by another export "
                    f"while this one was being written: {final}. Received: "
                    f"version={version}; choose another or omit `version`."
                ) from None
            version = next_version(model_dir)
    raise RuntimeError(f"Could not find a free version in {model_dir}")


def replay_warmup_requests(version_dir):
    """Runs every warm-up request of `version_dir` through the SavedModel
    there, as TF Serving does when it loads the version; a request that
    fails (a missing feature, an out-of-range id) raises `ValueError`
    quoting the error, so a version TF Serving would refuse to load is
    never published."""
    from tensorflow_serving.apis import prediction_log_pb2

    from alpt_keras.export.serving_files import WARMUP_FILE

    loaded = tf.saved_model.load(version_dir)
    path = os.path.join(version_dir, WARMUP_FILE)
    for number, record in enumerate(tf.data.TFRecordDataset(path), 1):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        signature = loaded.signatures[request.model_spec.signature_name]
        try:
            signature(**{k: tf.constant(tf.make_ndarray(v))
                         for k, v in request.inputs.items()})
        except (TypeError, ValueError, tf.errors.OpError) as error:
            message = getattr(error, "message", None) or str(error)
            if "assertion failed:" in message:  # the id check's own words
                message = message.split("assertion failed:", 1)[1]
                message = message.strip().split("\n", 1)[0]
                message = message.replace("\\'", "'").replace('\\"', '"')
            raise ValueError(
                f"`warmup_examples`: warm-up request {number} fails on the "
                "exported model, so TF Serving would refuse to load this "
                f"version. Received: {message.strip()[:500]}") from None


def export_size_report(version_dir):
    """Bytes per variable (from the checkpoint index), per embedding table
    next to its float32 equivalent (`V·D·4`), and of the whole export.
    Tables listed in `assets.extra/alpt_tables.json` also report their
    `num_bits` and `storage`; the logical tables of a group are reported
    one by one, under the name a separate table would have, with their
    rows' share of the group's bytes, their `group` and `row_offset`."""
    meta_path = os.path.join(version_dir, "assets.extra", TABLES_FILE)
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    reader = tf.train.load_checkpoint(
        os.path.join(version_dir, "variables", "variables"))
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    variables = {}
    for key, shape in shapes.items():
        if key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):
            continue
        # "serving_variables/<path>/.ATTRIBUTES/VARIABLE_VALUE" -> <path>
        name = key.split("/")[1] if key.startswith(
            "serving_variables/") else key
        # Checkpoint keys escape "." as ".." and "/" as ".S".
        name = name.replace("..", "\x00").replace(".S", "/").replace(
            "\x00", ".")
        count = 1
        for dim in shape:
            count *= dim
        variables[name] = {"shape": list(shape), "dtype": dtypes[key].name,
                           "bytes": count * dtypes[key].size}
    tables = {}
    for prefix, settings in meta.items():
        # Exports written before the "variables" entry: the layer's names.
        names = settings.get("variables", {
            "codes": f"{prefix}.codes", "step_sizes": f"{prefix}.step_sizes"})
        codes = variables[names["codes"]]
        steps = variables[names["step_sizes"]]
        logical = settings.get("tables", {})
        if len(logical) <= 1:
            tables[prefix] = {
                "bytes": codes["bytes"] + steps["bytes"],
                "float32_bytes": 4 * codes["shape"][0] * settings[
                    "output_dim"],
                "num_bits": settings["num_bits"],
                "storage": settings["storage"]}
            continue
        # A group: each logical table under the name a separate table
        # would have had (`<parent>.<table>`), with its share of the rows.
        parent = prefix.rpartition(".")[0]
        row_bytes = codes["bytes"] // codes["shape"][0]
        step_bytes = steps["bytes"] // steps["shape"][0]
        per_row = settings["step_size_mode"] == "row"
        for name, table in logical.items():
            rows = table["input_dim"]
            key = f"{parent}.{name}" if parent else name
            tables[key] = {
                "bytes": rows * row_bytes + step_bytes * (
                    rows if per_row else 1),
                "float32_bytes": 4 * rows * settings["output_dim"],
                "num_bits": settings["num_bits"],
                "storage": settings["storage"], "group": prefix,
                "row_offset": table["row_offset"]}
    for name, info in variables.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "embeddings" and len(info["shape"]) == 2:  # float tables
            tables[prefix] = {"bytes": info["bytes"],
                              "float32_bytes": info["bytes"]}
    total = 0
    for root, _, files in os.walk(version_dir):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return {"variables": variables, "tables": tables, "total_bytes": total}
