"""`alpt-train`: train a CTR model with float32, LPT or ALPT tables.

    alpt-train                                 # synthetic default, ALPT-8
    alpt-train --dataset criteo --data-path train.txt --model dcn --bits 4
    alpt-train --embedding float32 --output-dir runs/fp32

Trains on the chosen data set (the built-in synthetic CTR data by default),
evaluates on the test split and prints the metrics next to the bytes of the
tables and their optimizer state (and of their float32 equivalent). It
writes `report.json`, the model, the final weights and the vocabulary to
`--output-dir` (by default a new `runs/...` folder), and keeps a
`BackupAndRestore` backup there: rerunning the same command with that
`--output-dir` resumes from the last finished epoch.

The steps of `main`: parse and check the flags, pick the strategy, load
the data, build the model, fit, evaluate, export, save. This package (the
CLI) is the only one that imports both `models` and `export`.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import typing

import numpy as np

from alpt_keras.cli import run_dir
from alpt_keras.models.features import EMBEDDING_KINDS

DATASETS = ("synthetic", "criteo", "avazu", "movielens")


class _Parser(argparse.ArgumentParser):
    """argparse, with a user error as one line on stderr (exit status 2)
    instead of the usage block plus the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def _formatter(prog):
    # A fixed width, so `--help` (and README's copy of its usage) does not
    # depend on the terminal.
    return argparse.ArgumentDefaultsHelpFormatter(prog, width=79)


def _parser():
    from alpt_keras.models.ctr_models import SUPPORTED_MODELS
    from alpt_keras.update import STEP_SIZE_RULES, TABLE_RULES

    p = _Parser(
        prog="alpt-train", formatter_class=_formatter,
        description="Train a CTR model with low-precision (ALPT) tables.")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="Training data.")
    p.add_argument("--data-path",
                   metavar="FILE",
                   help="Criteo TSV or Avazu CSV file (plain or gzip).")
    p.add_argument("--model", choices=SUPPORTED_MODELS, default="dnn",
                   help="CTR model.")
    p.add_argument("--embedding", choices=EMBEDDING_KINDS, default="alpt",
                   help="Table kind: float32, plain low precision, ALPT.")
    p.add_argument("--bits", type=int, choices=range(2, 9), default=8,
                   metavar="{2..8}", help="Bits per code (LPT, ALPT).")
    p.add_argument("--storage", choices=("auto", "int8", "packed"),
                   default="auto",
                   help="ALPT codes as int8 or bit-packed into int32 words "
                        "(4-bit tables take half the bytes of 8-bit ones). "
                        "auto: packed below 8 bits and in a multi-worker "
                        "cluster (whose collectives refuse int8), else "
                        "int8.")
    p.add_argument("--stack-tables", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="Stack ALPT tables with the same settings into one "
                        "physical table each (one lookup and one update "
                        "chain per group; the same numbers).")
    p.add_argument("--rounding", choices=("stochastic", "deterministic"),
                   default="stochastic", help="Rounding of the codes.")
    p.add_argument("--step-size", choices=("row", "table"), default="row",
                   help="One step size per row or per table.")
    p.add_argument("--embedding-dim", type=int, default=16,
                   metavar="N",
                   help="Width of every table.")
    p.add_argument("--embedding-optimizer", choices=tuple(TABLE_RULES),
                   default="rowwise_adagrad", help="Table optimizer.")
    p.add_argument("--step-size-optimizer", choices=tuple(STEP_SIZE_RULES),
                   default="rowwise", help="Step-size rule.")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   metavar="LR",
                   help="Adam learning rate of the dense layers.")
    p.add_argument("--embedding-learning-rate", type=float, default=None,
                   metavar="LR",
                   help="Table learning rate (None: the rule's default).")
    p.add_argument("--step-size-learning-rate", type=float, default=None,
                   metavar="LR",
                   help="Step-size learning rate (None: the rule's "
                        "default).")
    p.add_argument("--hidden-units", default="256,128",
                   metavar="UNITS",
                   help="MLP widths, comma-separated.")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="BatchNorm in the MLP. Off by default: its moving "
                        "statistics (momentum 0.99) are still 14%% their "
                        "initial values after one epoch of the default "
                        "job (196 steps), which left the test logloss at "
                        "0.65 against 0.53 without it.")
    p.add_argument("--mixed-precision", choices=("none", "bfloat16",
                                                  "float16"),
                   default="none",
                   help="Compute dtype of the model (Keras's mixed_bfloat16 "
                        "or mixed_float16 policy; float16 adds loss "
                        "scaling). Tables keep integer codes and float32 "
                        "Δ and updates.")
    p.add_argument("--epochs", type=int, default=1, metavar="N",
                   help="Training epochs.")
    p.add_argument("--batch-size", type=int, default=2048,
                   metavar="N",
                   help="Examples per step.")
    p.add_argument("--num-examples", type=int, default=500_000,
                   metavar="N",
                   help="Synthetic: size of the data set (>= 100).")
    p.add_argument("--num-fields", type=int, default=26,
                   metavar="N",
                   help="Synthetic: categorical fields.")
    p.add_argument("--vocab-size", type=int, default=None,
                   metavar="N",
                   help="Synthetic: ids per field (None: Criteo-like "
                        "sizes from 10 to ~30,000).")
    p.add_argument("--zipf-exponent", type=float, default=1.2,
                   metavar="A",
                   help="Synthetic: power-law exponent of id frequencies "
                        "(0 = uniform ids).")
    p.add_argument("--min-count", type=int, default=2,
                   metavar="N",
                   help="Rarer values map to one OOV id per field.")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="Seed of the run.")
    p.add_argument("--devices", type=int, default=1,
                   metavar="N",
                   help="MirroredStrategy replicas (GPUs, else CPU parts).")
    p.add_argument("--output-dir", default=None,
                   metavar="DIR",
                   help="report.json, model, weights, vocabulary and the "
                        "resume backup; rerunning with the same DIR "
                        "resumes a killed run. None: a new "
                        "runs/<dataset>-<model>-<embedding><bits>-<time>/ "
                        "(a single process; a cluster saves only with "
                        "--output-dir).")
    p.add_argument("--export-dir", default=None,
                   metavar="DIR",
                   help="Also export for TF Serving under this base path.")
    p.add_argument("--model-name", default="ctr",
                   metavar="NAME",
                   help="Folder name under --export-dir.")
    p.add_argument("--tensorboard", action="store_true",
                   help="Write TensorBoard logs under --output-dir.")
    p.add_argument("--max-skipped-steps", type=int, default=10,
                   metavar="N",
                   help="Stop with an error after this many consecutive "
                        "steps skipped for NaN/Inf gradients.")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                   help="Keras verbosity (None: progress bar on a tty, "
                        "else one line per epoch). 1 or 2 also shows "
                        "TensorFlow's start-up log lines, hidden by "
                        "default; set TF_CPP_MIN_LOG_LEVEL=0 for all of "
                        "its C++ logs.")
    return p


def _fail(message):
    """A user error: one line on stderr, exit status 2 (as argparse)."""
    print(f"alpt-train: {message}", file=sys.stderr)
    raise SystemExit(2)


# Synthetic runs need every split (8:1:1) to hold examples.
MIN_SYNTHETIC_EXAMPLES = 100


def _check(args):
    """Every flag checked before any data is built (`_fail`: one line,
    exit status 2)."""
    if args.dataset in ("criteo", "avazu"):
        if not args.data_path:
            _fail(f"--dataset {args.dataset} needs --data-path (the file is "
                  "not downloadable here).")
        if not os.path.isfile(args.data_path):
            what = "a directory" if os.path.isdir(args.data_path) else \
                "not found"
            _fail(f"--data-path must be an existing file. Received: "
                  f"{args.data_path} ({what})")
    elif args.data_path:
        _fail(f"--data-path does not apply to --dataset {args.dataset} "
              f"(only criteo and avazu read a file). Received: "
              f"--data-path {args.data_path}")
    for name in ("epochs", "batch_size", "num_examples", "devices",
                 "embedding_dim", "num_fields", "max_skipped_steps",
                 "min_count"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1. Received: "
                  f"{getattr(args, name)}")
    if args.dataset == "synthetic" and \
            args.num_examples < MIN_SYNTHETIC_EXAMPLES:
        _fail(f"--num-examples must be >= {MIN_SYNTHETIC_EXAMPLES} (the "
              "8:1:1 split needs examples in every split). Received: "
              f"{args.num_examples}")
    for name in ("learning_rate", "embedding_learning_rate",
                 "step_size_learning_rate"):
        value = getattr(args, name)
        if value is not None and not (0 < value < float("inf")):
            _fail(f"--{name.replace('_', '-')} must be a finite number > 0."
                  f" Received: {value}")
    if args.vocab_size is not None and args.vocab_size < 2:
        _fail(f"--vocab-size must be >= 2. Received: {args.vocab_size}")
    if args.zipf_exponent and args.zipf_exponent <= 1:
        _fail("--zipf-exponent must be 0 (uniform) or > 1. Received: "
              f"{args.zipf_exponent}")
    if args.embedding == "float32" and args.storage == "packed":
        _fail("--storage packed does not apply to --embedding float32 "
              "(float tables have no codes). Received: --storage packed")
    for name in ("output_dir", "export_dir"):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            _fail(f"--{name.replace('_', '-')} must be a directory. "
                  f"Received: {path} (a file)")
    try:
        args.hidden_units = [int(u) for u in args.hidden_units.split(",")
                             if u]
    except ValueError:
        _fail("--hidden-units must be integers separated by commas. "
              f"Received: {args.hidden_units!r}")
    if not args.hidden_units or min(args.hidden_units) < 1:
        _fail("--hidden-units must be positive integers separated by "
              f"commas. Received: {','.join(map(str, args.hidden_units))}")


def cluster_from_env(environ=None):
    """The `TF_CONFIG` cluster this process belongs to, or `None`.

    Returns a dict with `task_type`, `task_index`, `num_workers`,
    `num_ps`, `is_chief` (the `chief` task, else worker 0) and `kind`:
    `"parameter_server"` when the cluster has `ps` tasks
    (ParameterServerStrategy: the chief trains, workers and parameter
    servers serve), else `"multi_worker"` (MultiWorkerMirroredStrategy).
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            "alpt-train: TF_CONFIG must be JSON with 'cluster' and 'task' "
            "({'type': ..., 'index': ...}). Received: "
            f"TF_CONFIG={raw!r} ({error})") from None
    kind = "parameter_server" if "ps" in cluster else "multi_worker"
    types = ("chief", "worker", "ps") if kind == "parameter_server" else (
        "chief", "worker")
    if task_type not in types or task_type not in cluster:
        raise SystemExit(
            f"alpt-train: the TF_CONFIG task type must be one of {types} "
            "and listed in the cluster. Received: task type "
            f"{task_type!r}, cluster tasks {sorted(cluster)}")
    if kind == "parameter_server" and "chief" not in cluster:
        raise SystemExit(
            "alpt-train: a ParameterServerStrategy cluster (with 'ps' "
            "tasks) needs a 'chief' task, which runs the training loop. "
            f"Received: cluster tasks {sorted(cluster)}")
    num_workers = len(cluster.get("worker", [])) + len(cluster.get("chief",
                                                                   []))
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_index == 0 and "chief" not in cluster)
    return {"kind": kind, "task_type": task_type,
            "task_index": task_index, "num_workers": num_workers,
            "num_ps": len(cluster.get("ps", [])), "is_chief": is_chief}


def _serve_task(cluster):
    """Workers and parameter servers of a ParameterServerStrategy cluster
    only serve: the chief sends them work. Runs until killed."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(
        resolver.cluster_spec(), job_name=cluster["task_type"],
        task_index=cluster["task_index"],
        protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"alpt-train: {cluster['task_type']} {cluster['task_index']} "
          f"serving at {server.target}", flush=True)
    server.join()
    return 0


def _parameter_server_strategy(args, cluster):
    from alpt_keras.compat import IS_KERAS_3

    if args.devices != 1:
        raise SystemExit("alpt-train: --devices applies to one machine. "
                         f"Received: --devices {args.devices}")
    if IS_KERAS_3:
        raise SystemExit(
            "alpt-train: Keras 3 `model.fit` does not support "
            "ParameterServerStrategy (keras-team/keras#18624). Run the "
            "cluster with tf_keras (TF_USE_LEGACY_KERAS=1), or train with "
            "the ClusterCoordinator custom loop shown in README 'Training "
            "on a cluster'.")
    import tensorflow as tf

    from alpt_keras import RowPartitioner

    return tf.distribute.ParameterServerStrategy(
        tf.distribute.cluster_resolver.TFConfigClusterResolver(),
        variable_partitioner=RowPartitioner(cluster["num_ps"]))


def _multi_worker_strategy(args, cluster):
    from alpt_keras.compat import IS_KERAS_3

    if args.devices != 1:
        raise SystemExit("alpt-train: --devices applies to one machine; in "
                         "a TF_CONFIG cluster every worker uses its local "
                         f"devices. Received: --devices {args.devices}")
    if IS_KERAS_3:
        raise SystemExit(
            "alpt-train: Keras 3 `model.fit` cannot train under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585: "
            "'PerReplica' conversion error). Run the workers with tf_keras: "
            "TF_USE_LEGACY_KERAS=1.")
    if args.storage == "int8" and args.embedding != "float32":
        raise SystemExit(
            "alpt-train: MultiWorkerMirroredStrategy broadcasts variables "
            "with collectives, which refuse int8: use --storage packed (or "
            "auto). Received: --storage int8")
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def table_digests(model):
    """sha256 of each logical ALPT table's codes and step sizes (workers
    of one cluster must agree bit for bit)."""
    import hashlib

    from alpt_keras import tables

    digests = {}
    for table in tables(model):
        # Per logical table, so stacked and separate tables compare.
        for spec, codes, steps in table.logical_values():
            h = hashlib.sha256()
            for values in (codes, steps):
                h.update(np.asarray(values).tobytes())
            digests[spec.name] = h.hexdigest()
    return digests


def _float_tables(model):
    """The `keras.layers.Embedding` layers of `model` (float32 tables)."""
    from alpt_keras.compat import flatten_layers, keras

    return [layer for layer in flatten_layers(model)
            if isinstance(layer, keras.layers.Embedding)]


def shard_layout(model, optimizer):
    """Variable name -> [[device, rows], ...] of every sharded variable
    (ParameterServerStrategy), for the report."""
    from alpt_keras import tables

    candidates = []
    for table in tables(model):
        candidates += [(f"{table.name}/codes", table.codes),
                       (f"{table.name}/step_sizes", table.step_sizes)]
    candidates += [(f"{layer.name}/embeddings", layer.embeddings)
                   for layer in _float_tables(model)]
    candidates += [(None, v) for v in optimizer.variables]
    layout = {}
    for name, variable in candidates:
        shards = getattr(variable, "variables", None)
        if type(variable).__name__ != "ShardedVariable" or not shards:
            continue
        if name is None:  # "<name>/part_0:0"
            name = shards[0].name.split(":")[0].rsplit("/part_", 1)[0]
        layout[name] = [[s.device, int(s.shape[0])] for s in shards]
    return layout


RUNS_DIR = "runs"


def new_run_dir(args):
    """Creates and returns `runs/<dataset>-<model>-<embedding><bits>-<time>`
    (relative to the working directory; `-2`, `-3`... if two runs start in
    the same second)."""
    kind = "float32" if args.embedding == "float32" else \
        f"{args.embedding}{args.bits}"
    base = os.path.join(RUNS_DIR, f"{args.dataset}-{args.model}-{kind}-"
                        f"{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)  # fails if another run took the name
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"


def _setup_devices(devices):
    """Logical CPU devices for `--devices N` when there is no GPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if devices > 1 and len(gpus) < devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    if devices == 1:
        return None
    kind = "GPU" if len(gpus) >= devices else "CPU"
    names = [d.name for d in tf.config.list_logical_devices(kind)][:devices]
    return tf.distribute.MirroredStrategy(names)


def _load_data(args, table_kwargs):
    """Returns feature configs, the three splits and data facts."""
    import tensorflow as tf

    def from_arrays(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(
            args.batch_size)

    info = {"dataset": args.dataset}
    if args.dataset == "synthetic":
        from alpt_keras.models.features import simple_features
        from alpt_keras.models.synthetic import criteo_like_synthetic

        data = criteo_like_synthetic(args.num_examples, args.seed,
                                     args.num_fields, args.vocab_size,
                                     args.zipf_exponent)
        train, rest = data.split(0.8)
        validation, test = rest.split(0.5)
        names = [f"C{i + 1}" for i in range(data.ids.shape[1])]
        sizes = data.vocab_size if isinstance(data.vocab_size, list) \
            else [data.vocab_size] * len(names)
        features = simple_features(dict(zip(names, sizes, strict=True)),
                                   **table_kwargs)
        splits = [from_arrays(s.features(names), s.labels)
                  for s in (train, validation, test)]
        info["rows"] = {"train": len(train.labels),
                        "validation": len(validation.labels),
                        "test": len(test.labels)}
        info["hidden_model_test"] = test.hidden_metrics()
        return features, splits, info, None
    if args.dataset == "movielens":
        from alpt_keras.models.movielens import MovieLensCTR

        data = MovieLensCTR(min_count=args.min_count, seed=args.seed)
        features = data.feature_configs(**table_kwargs)
        arrays = {s: data.arrays(s) for s in ("train", "validation", "test")}
        splits = [from_arrays(*a) for a in arrays.values()]
        info["rows"] = {s: len(a[1]) for s, a in arrays.items()}
        return features, splits, info, None
    if args.dataset == "criteo":
        from alpt_keras.models.criteo import CriteoPipeline as Pipeline
    else:
        from alpt_keras.models.avazu import AvazuPipeline as Pipeline
    from alpt_keras.models.pipeline import EmptyDataError

    try:
        pipeline = Pipeline(args.data_path, min_count=args.min_count,
                            seed=args.seed).fit()
    except (EmptyDataError, OSError) as error:
        _fail(f"--data-path {args.data_path}: {error}")
    report = pipeline.report
    info["malformed_lines"] = report["malformed"]
    info["malformed_examples"] = report["malformed_examples"]
    if report["malformed"]:
        first = "; ".join(f"line {m['line']}: {m['reason']}"
                          for m in report["malformed_examples"][:3])
        print(f"alpt-train: skipped {report['malformed']:,} malformed "
              f"line(s) of {report['lines']:,} ({first}"
              f"{'; ...' if report['malformed'] > 3 else ''})")
    rows = info["rows"] = dict(report["rows"])
    if min(rows.values()) == 0:
        _fail(f"--data-path {args.data_path}: too few data lines to train "
              "and evaluate: the 8:1:1 split gives train "
              f"{rows['train']}, validation {rows['validation']}, test "
              f"{rows['test']}; every split needs at least one.")
    features = pipeline.feature_configs(**table_kwargs)
    splits = [pipeline.dataset(s, args.batch_size)
              for s in ("train", "validation", "test")]
    return features, splits, info, pipeline


def non_finite_weights(model):
    """Names of `model`'s floating-point weights holding NaN/Inf."""
    import tensorflow as tf

    from alpt_keras import _keras

    bad = []
    for weight in model.weights:
        variable = _keras.tf_variable(weight)
        if variable.dtype.is_floating and not bool(tf.reduce_all(
                tf.math.is_finite(tf.convert_to_tensor(variable)))):
            bad.append(weight.path if hasattr(weight, "path")
                       else weight.name)
    return bad


def _nbytes(variable):
    import tensorflow as tf

    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size


def table_bytes(model, optimizer):
    """Bytes of the embedding tables, their optimizer state (from the rule
    specs), and of the float32 equivalent (float32 table + Keras Adam's two
    slots)."""
    from alpt_keras import tables
    from alpt_keras.callbacks import alpt_optimizer

    optimizer = alpt_optimizer(optimizer)  # inside a LossScaleOptimizer
    alpt, floats = tables(model), _float_tables(model)
    table_bytes_ = sum(_nbytes(t.codes) + _nbytes(t.step_sizes)
                       for t in alpt)
    table_bytes_ += sum(_nbytes(layer.embeddings) for layer in floats)
    float32_rows = sum(t.spec.input_dim * t.spec.output_dim for t in alpt)
    float32_rows += sum(int(np.prod(layer.embeddings.shape))
                        for layer in floats)
    if alpt:  # from the rule specs
        state = sum(optimizer.state_bytes(t.spec) for t in alpt)
    else:  # the inner optimizer's slots of the float tables
        shapes = {tuple(layer.embeddings.shape) for layer in floats}
        state = sum(_nbytes(v) for v in optimizer.variables
                    if tuple(v.shape) in shapes)
    return {"tables": table_bytes_, "optimizer_state": state,
            "float32_tables": 4 * float32_rows,
            "float32_adam_state": 8 * float32_rows}


@dataclasses.dataclass
class _Run:
    """What the steps of one `alpt-train` run share."""

    args: argparse.Namespace
    cluster: dict
    strategy: object
    output_dir: str
    # True when `output_dir` is the new runs/... folder of this run.
    new_output_dir: bool = False
    # The local copy of a parameter-server model is built silently.
    quiet_model: bool = False

    @property
    def parameter_server(self):
        return self.cluster is not None and \
            self.cluster["kind"] == "parameter_server"

    @property
    def is_chief(self):
        return self.cluster is None or self.cluster["is_chief"]


class _Data(typing.NamedTuple):
    features: list
    train: object
    validation: object
    test: object
    info: dict
    pipeline: object


def parse_args(argv=None):
    """Step 1: the flags, checked."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check(args)
    return args


def setup(args, cluster):
    """Step 2: the strategy, the storage and the output folder of this
    task."""
    from alpt_keras import _startup

    parameter_server = cluster is not None and \
        cluster["kind"] == "parameter_server"
    # The first device listing logs "failed call to cuInit" on machines
    # without a GPU: caught like TensorFlow's import lines.
    with _startup.quiet_stderr() if _startup.is_tool() else \
            contextlib.nullcontext():
        if parameter_server:
            strategy = _parameter_server_strategy(args, cluster)
        elif cluster is not None:
            strategy = _multi_worker_strategy(args, cluster)
        else:
            strategy = _setup_devices(args.devices)
    if args.verbose:  # TensorFlow's start-up lines, shown again
        sys.stderr.write(_startup.captured())
    if args.storage == "auto":
        # Packed where it saves bytes (sub-8-bit codes) or where int8
        # cannot go (multi-worker collectives).
        multi_worker = cluster is not None and not parameter_server
        args.storage = "packed" if multi_worker or (
            args.bits < 8 and args.embedding != "float32") else "int8"
    new_output_dir = False
    if args.output_dir is None and cluster is None:
        args.output_dir = new_run_dir(args)
        new_output_dir = True
        print(f"alpt-train: writing to {args.output_dir}/ (to resume this "
              f"run after a kill, rerun with --output-dir "
              f"{args.output_dir})")
    elif args.output_dir is None:
        print("alpt-train: a cluster run keeps its model and report only "
              "with --output-dir (shared by every task); nothing will be "
              "saved.")
    output_dir = args.output_dir
    if output_dir and cluster is not None and not cluster["is_chief"]:
        # Other workers report (for the consistency check) but leave the
        # model files, vocabulary and export to the chief.
        output_dir = os.path.join(
            output_dir, f"{cluster['task_type']}-{cluster['task_index']}")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(args.seed)
    return _Run(args, cluster, strategy, output_dir, new_output_dir)


def load_data(run):
    """Step 3: feature configs and the train/validation/test splits."""
    args = run.args
    table_kwargs = dict(embedding_dim=args.embedding_dim,
                        kind=args.embedding, num_bits=args.bits,
                        rounding=args.rounding, step_size=args.step_size,
                        seed=args.seed, storage=args.storage)
    features, (train, validation, test), info, pipeline = _load_data(
        args, table_kwargs)
    rows = info["rows"]
    print(f"data: {args.dataset}, train {rows['train']:,} / validation "
          f"{rows['validation']:,} / test {rows['test']:,} examples, "
          f"{len(features)} features")
    if run.output_dir:
        os.makedirs(run.output_dir, exist_ok=True)
        if pipeline is not None and run.is_chief:
            pipeline.save_vocabulary(
                os.path.join(run.output_dir, "vocabulary.json"))
    return _Data(features, train, validation, test, info, pipeline)


def build_model(run, features):
    """Step 4: the compiled model and its optimizer (under the strategy's
    scope when there is one)."""
    from alpt_keras import ALPTOptimizer
    from alpt_keras.compat import keras
    from alpt_keras.models.ctr_models import build_ctr_model

    args = run.args
    if args.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(
            f"mixed_{args.mixed_precision}")
    scope = run.strategy.scope() if run.strategy else \
        contextlib.nullcontext()
    with scope:
        model = build_ctr_model(features, model=args.model,
                                hidden_units=args.hidden_units,
                                batch_norm=args.batch_norm,
                                seed=args.seed,
                                stack_tables=args.stack_tables)
        # float32 runs are wrapped too: ALPTOptimizer then steps only the
        # dense variables (float tables included), with the same
        # whole-step NaN/Inf skip as ALPT runs.
        optimizer = ALPTOptimizer(
            keras.optimizers.Adam(args.learning_rate),
            embedding_optimizer=args.embedding_optimizer,
            embedding_learning_rate=args.embedding_learning_rate,
            step_size_optimizer=args.step_size_optimizer,
            step_size_learning_rate=args.step_size_learning_rate)
        if args.mixed_precision == "float16":
            # Outside ALPTOptimizer: every gradient, the tables' included,
            # is unscaled before ALPTOptimizer sees it.
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc")])
    if not run.quiet_model:
        print(f"model: {args.model}, {model.count_params():,} parameters, "
              f"{_describe_tables(args)}")
    return model, optimizer


def _describe_tables(args):
    compute = "" if args.mixed_precision == "none" else \
        f", {args.mixed_precision} compute"
    if args.embedding == "float32":
        return "float32 tables" + compute
    layout = "stacked" if args.stack_tables else "separate"
    return (f"{args.embedding.upper()} {args.bits}-bit tables ({layout}, "
            f"{args.storage} storage){compute}")


LAYOUT_FILE = "alpt_layout.json"
# The export of a run killed before it finished (reused by its rerun).
EXPORT_FILE = "export.json"


def check_backup_layout(backup, stacked):
    """Refuses to resume a backup written with the other table layout
    (stacked vs separate ALPT tables): the optimizer's slots, and under
    tf_keras every variable's checkpoint path, differ between the two.
    Records the layout of a new backup. Backups from before stacking
    existed hold separate tables."""
    marker = os.path.join(backup, LAYOUT_FILE)
    # Backup files (Keras 3: latest.weights.h5 + training_metadata.json;
    # tf_keras: checkpoint + ckpt-*); workers' temporary folders aside.
    contents = [f for f in os.listdir(backup) if f != LAYOUT_FILE and
                os.path.isfile(os.path.join(backup, f))] \
        if os.path.isdir(backup) else []
    if contents:
        recorded = False
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as f:
                recorded = bool(json.load(f).get("stack_tables"))
        if recorded != stacked:
            flag = "--stack-tables" if recorded else "--no-stack-tables"
            raise SystemExit(
                f"alpt-train: the backup in {backup} was written with "
                f"{'stacked' if recorded else 'separate'} ALPT tables; this "
                f"run would use {'stacked' if stacked else 'separate'} ones. "
                f"Rerun with {flag} to resume it, or delete {backup} to "
                "start fresh.")
        return
    os.makedirs(backup, exist_ok=True)
    tmp = marker + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"stack_tables": stacked}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def fit(run, model, data):
    """Step 5: `model.fit` with the run's callbacks; returns the history
    and the training seconds."""
    from alpt_keras import ALPTMonitor, StopOnSkippedSteps, _keras
    from alpt_keras.compat import keras

    args = run.args
    # In this order at each epoch end: the monitor adds its figures to the
    # logs, then history.json records them, then the backup is written (an
    # epoch is in the history before its backup exists).
    callbacks = [StopOnSkippedSteps(args.max_skipped_steps,
                                    per_epoch=run.parameter_server),
                 ALPTMonitor()]
    if run.output_dir and run.is_chief:
        callbacks.append(run_dir.epoch_history_callback(run.output_dir,
                                                        keras))
    if args.output_dir and not run.parameter_server:
        # Not under ParameterServerStrategy: tf_keras documents support,
        # but resuming a PSS run is not tested here; the chief saves a
        # sharded checkpoint at the end instead.
        # One backup dir for the whole cluster: tf_keras coordinates the
        # workers' writes (Keras 3 would need one per worker).
        backup = os.path.join(args.output_dir, "backup")
        if run.is_chief:  # other tasks' temporary files are not backups
            check_backup_layout(backup, args.stack_tables and
                                args.embedding != "float32")
        # Kept until the model, report and export are written (`main`
        # removes it last), so a kill after `fit` never retrains.
        callbacks.append(run_dir.backup_callback(backup, keras,
                                                 _keras.IS_KERAS_3))
    if args.tensorboard and run.output_dir and run.is_chief:
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(args.output_dir, "tensorboard")))
    verbose = args.verbose if args.verbose is not None else (
        1 if sys.stdout.isatty() else 2)
    train = data.train
    # Data order is fixed (no shuffling), so a resumed run repeats exactly
    # the batches an uninterrupted one would see.
    fit_args = dict(validation_data=data.validation)
    if run.parameter_server:
        # Workers pull batches from their own copy of the repeated data set;
        # an epoch is a number of steps. (No validation pass under PSS.)
        steps = int(train.cardinality())
        if steps < 0:
            steps = sum(1 for _ in train)
        train, fit_args = train.repeat(), dict(steps_per_epoch=steps)
    start = time.perf_counter()
    history = model.fit(train, epochs=args.epochs, callbacks=callbacks,
                        verbose=verbose, shuffle=False, **fit_args)
    seconds = time.perf_counter() - start
    print(f"trained {len(history.epoch)} epoch(s) in {seconds:.1f} s"
          + (f" (resumed after epoch {history.epoch[0]})"
             if history.epoch and history.epoch[0] else ""))
    return history, seconds


def gather_from_parameter_servers(run, model, optimizer, features):
    """Step 5b (ParameterServerStrategy): the full training state (sharded
    tables, optimizer) as a TF checkpoint, restored onto one local copy
    that evaluates, saves and exports like a single-process model (a TF
    checkpoint restores onto any number of shards)."""
    import tensorflow as tf

    checkpoint_dir = os.path.join(run.output_dir, "checkpoint") if \
        run.output_dir else tempfile.mkdtemp()
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        os.path.join(checkpoint_dir, "ckpt"))
    local = dataclasses.replace(run, strategy=None, quiet_model=True)
    model, local_optimizer = build_model(local, features)
    local_optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=local_optimizer).restore(
        path).assert_existing_objects_matched()
    if not run.output_dir:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return model


def evaluate(run, model, trained, optimizer, data, history, seconds):
    """Step 6: test metrics and the report (printed, returned)."""
    args = run.args
    loss, auc = model.evaluate(data.test, verbose=0)
    epochs_run = list(history.epoch)
    logs = {k: [float(x) for x in v] for k, v in history.history.items()}
    if run.output_dir and run.is_chief:
        # Every epoch, also those of the runs this one resumed.
        logs, seconds = run_dir.merged_history(run.output_dir, args.epochs)
    report = {
        "config": {k: v for k, v in vars(args).items()},
        "data": data.info,
        "metrics": {"test_auc": float(auc), "test_logloss": float(loss)},
        "history": logs,
        "epochs_completed": args.epochs,
        "replicas": run.strategy.num_replicas_in_sync if run.strategy
        else 1,
        "cluster": run.cluster,
        "table_digests": table_digests(trained),
        "shards": shard_layout(trained, optimizer) if run.parameter_server
        else {},
        "resumed_from_epoch": epochs_run[0] if epochs_run else args.epochs,
        "train_seconds": seconds,
        "bytes": table_bytes(model, optimizer),
    }
    b = report["bytes"]
    ratio = (b["tables"] + b["optimizer_state"]) / (
        b["float32_tables"] + b["float32_adam_state"])
    print(f"\ntest AUC {auc:.4f}  logloss {loss:.4f}  "
          f"({args.embedding}"
          f"{'' if args.embedding == 'float32' else f'-{args.bits}bit'}, "
          f"{args.model}, {args.dataset})")
    info = data.info
    if "hidden_model_test" in info:
        print(f"hidden click model on the test split: AUC "
              f"{info['hidden_model_test']['auc']:.4f}  logloss "
              f"{info['hidden_model_test']['logloss']:.4f}")
    codes = "" if args.embedding == "float32" else \
        f" ({args.bits}-bit codes, {args.storage} storage)"
    print(f"tables{codes} {b['tables']:,} B + optimizer state "
          f"{b['optimizer_state']:,} B  vs  float32 {b['float32_tables']:,}"
          f" B + Adam {b['float32_adam_state']:,} B  "
          f"({ratio:.3f}x)")
    return report


def export(run, model, data, report):
    """Step 7: the TF Serving export, with warm-up requests from the first
    test rows (<= 256); adds its sizes to `report`. Models trained on a
    Criteo/Avazu file take the raw columns (`serving_default`, through
    the pipeline's vocabulary in the graph) and the ids (`serving_ids`)."""
    from alpt_keras.export.cli import print_size_report
    from alpt_keras.export.saved_model import (
        export_for_serving,
        export_size_report,
    )

    done = os.path.join(run.output_dir, EXPORT_FILE) if run.output_dir \
        else None
    version_dir = None
    if done and os.path.exists(done):  # a resumed run exported already
        with open(done, encoding="utf-8") as f:
            version_dir = json.load(f)["path"]
        if not os.path.isdir(version_dir):
            version_dir = None
    if version_dir is None:
        preprocessing = None
        if data.pipeline is not None:
            from alpt_keras.models import RawFeatures

            preprocessing = RawFeatures(data.pipeline)
            warmup = data.pipeline.raw_rows("test", 256)
        else:
            features, _ = next(iter(data.test))
            warmup = {k: np.asarray(v)[:256] for k, v in features.items()}
        version_dir = export_for_serving(model, run.args.export_dir,
                                         run.args.model_name,
                                         warmup_examples=warmup,
                                         preprocessing=preprocessing)
        if done:
            run_dir.write_json(done, {"path": version_dir})
    size = export_size_report(version_dir)
    print_size_report(size)
    print(f"exported {version_dir}" + (
        " (serving_default: raw columns; serving_ids: ids)"
        if data.pipeline is not None else ""))
    report["export"] = {"path": version_dir,
                        "raw_features": data.pipeline is not None,
                        "total_bytes": size["total_bytes"],
                        "tables": size["tables"]}


def save(run, model, report):
    """Step 8: weights, `.keras` model and `report.json`."""
    # Every worker saves (reading synchronised metric variables is a
    # collective); the others write into a scratch dir and drop it.
    output_dir = run.output_dir
    model_dir = output_dir if run.is_chief else tempfile.mkdtemp(
        dir=output_dir)
    with run_dir.atomic_file(
            os.path.join(model_dir, "model.weights.h5")) as tmp:
        model.save_weights(tmp)
    run_dir.fault_point("during_save")
    with run_dir.atomic_file(os.path.join(model_dir, "model.keras")) as tmp:
        model.save(tmp)
    if not run.is_chief:
        shutil.rmtree(model_dir, ignore_errors=True)
    path = os.path.join(output_dir, "report.json")
    run_dir.write_json(path, report)


# What a finished run leaves in its output folder, as the console lists it.
OUTPUT_FILES = (
    ("model.keras", "the model (keras.models.load_model)"),
    ("model.weights.h5", "its weights"),
    ("report.json", "config, metrics, history, table digests, bytes"),
    ("vocabulary.json", "the data pipeline's vocabulary"),
    ("run.json", "the run's settings (a rerun into this folder must match)"),
    ("tensorboard", "TensorBoard logs (tensorboard --logdir ...)"),
    ("checkpoint", "the parameter servers' sharded checkpoint"),
)


def print_files(output_dir, export_path=None):
    """Where every file went."""
    print(f"files in {output_dir}/:")
    for name, what in OUTPUT_FILES:
        if os.path.exists(os.path.join(output_dir, name)):
            slash = "/" if os.path.isdir(os.path.join(output_dir, name)) \
                else ""
            print(f"  {name + slash:<18} {what}")
    if export_path:
        print(f"TF Serving export: {export_path}")


def main(argv=None):
    """`alpt-train`: parse → data → model → fit → evaluate → export → save.
    Returns the exit status."""
    args = parse_args(argv)
    cluster = cluster_from_env()
    if cluster is not None and cluster["kind"] == "parameter_server" and \
            cluster["task_type"] != "chief":
        return _serve_task(cluster)
    run = setup(args, cluster)
    guarded = run.output_dir and run.is_chief
    if guarded:
        from alpt_keras import IS_KERAS_3

        fresh = run.new_output_dir or not os.path.exists(run.output_dir)
        settings = run_dir.fingerprint(
            args, "keras3" if IS_KERAS_3 else "tf_keras")
        try:
            run_dir.lock(run.output_dir)
            run_dir.remove_temporaries(run.output_dir)
            run_dir.check_fingerprint(run.output_dir, settings, record=False)
        except run_dir.OutputDirError as error:
            _fail(str(error))
    try:
        data = load_data(run)
    except SystemExit:
        if guarded and fresh:  # bad data: leave nothing behind
            shutil.rmtree(run.output_dir, ignore_errors=True)
        raise
    if guarded:  # recorded once the data is known to be usable
        run_dir.check_fingerprint(run.output_dir, settings)
    model, optimizer = build_model(run, data.features)
    from alpt_keras import NonFiniteStepsError

    try:
        history, seconds = fit(run, model, data)
    except NonFiniteStepsError as e:
        print(f"alpt-train: {e} Nothing was saved or exported; the resume "
              "backup (if any) is kept.", file=sys.stderr)
        return 1
    run_dir.fault_point("after_fit")
    trained = model
    if run.parameter_server:
        model = gather_from_parameter_servers(run, model, optimizer,
                                              data.features)
    bad = non_finite_weights(model)
    if bad:
        print("alpt-train: refusing to evaluate, save or export a model with "
              f"NaN/Inf weights: {', '.join(bad[:5])}"
              f"{' ...' if len(bad) > 5 else ''}", file=sys.stderr)
        return 1
    report = evaluate(run, model, trained, optimizer, data, history,
                      seconds)
    if args.export_dir and run.is_chief:
        export(run, model, data, report)
        run_dir.fault_point("after_export")
    if run.output_dir:
        save(run, model, report)
        if run.is_chief:
            finish(run)
            print_files(run.output_dir, report.get("export", {}).get("path"))
    return 0


def finish(run):
    """Step 9: everything is written; drop the resume state (backup, epoch
    history, export marker) so the next run into this folder starts
    fresh."""
    shutil.rmtree(os.path.join(run.output_dir, "backup"), ignore_errors=True)
    for name in (run_dir.HISTORY_FILE, EXPORT_FILE):
        path = os.path.join(run.output_dir, name)
        if os.path.exists(path):
            os.remove(path)


if __name__ == "__main__":
    raise SystemExit(main())
