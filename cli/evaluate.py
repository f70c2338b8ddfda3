"""`alpt-evaluate`: score a trained model or a TF Serving export on data.

    alpt-evaluate runs/synthetic-dnn-alpt8-20261201-101500
    alpt-evaluate runs/criteo-dcn-alpt4-.../model.keras --data-path day1.txt
    alpt-evaluate serving/ctr --run runs/criteo-dcn-alpt4-... \\
        --data-path day1.txt

MODEL is an `alpt-train` output folder, its `model.keras`, or an export
(`serving/ctr` takes the newest version, `serving/ctr/3` that one). The
data goes through the same pipeline and vocabulary as in training: with a
run folder (or a `model.keras` inside one) the data settings come from its
`run.json` and the vocabulary from its `vocabulary.json`, so
`alpt-evaluate RUN` scores the run's own test split again; `--run RUN`
does the same for an export. A new `--data-path` is scored whole
(`--split all`) by default. Prints AUC (exact, ties counted half) and
logloss, and writes them as JSON.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from alpt_keras.cli import run_dir
from alpt_keras.cli.train import DATASETS, _formatter, _Parser

SPLITS = ("train", "validation", "test", "all")
# The alpt-train settings that decide which examples a data set yields.
DATA_SETTINGS = ("dataset", "data_path", "seed", "num_examples", "num_fields",
                 "vocab_size", "zipf_exponent", "min_count")


def _parser():
    p = _Parser(
        prog="alpt-evaluate", formatter_class=_formatter,
        description="Score a trained model (model.keras or an alpt-train "
                    "output folder) or a TF Serving export on a data set: "
                    "AUC and logloss, printed and written as JSON.")
    p.add_argument("model", metavar="MODEL",
                   help="An alpt-train --output-dir, its model.keras, or an "
                        "export (base folder: newest version).")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="The alpt-train output folder whose data settings "
                        "(run.json) and vocabulary to use (default: MODEL's "
                        "folder, if it is one; else alpt-train's "
                        "defaults).")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="The data set (default: the run's, from run.json).")
    p.add_argument("--data-path", default=None, metavar="FILE",
                   help="Criteo/Avazu file (default: the run's).")
    p.add_argument("--vocabulary", default=None, metavar="FILE",
                   help="vocabulary.json of the training run (default: the "
                        "run folder's).")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="Examples to score: one split of the 8:1:1 hash "
                        "split, or all (default: test for the run's own "
                        "data, all for another file).")
    p.add_argument("--batch-size", type=int, default=4096, metavar="N",
                   help="Examples per prediction batch.")
    p.add_argument("--output", default="evaluation.json", metavar="FILE",
                   help="Where to write the JSON result.")
    return p


def _fail(message):
    print(f"alpt-evaluate: {message}", file=sys.stderr)
    raise SystemExit(2)


def _newest_version(path):
    versions = [int(d) for d in os.listdir(path) if d.isdigit() and
                os.path.isfile(os.path.join(path, d, "saved_model.pb"))]
    return os.path.join(path, str(max(versions))) if versions else None


def resolve_model(path):
    """`(kind, model path, run folder or None)`: kind `"keras"` or
    `"export"`. Refuses (exit 2) anything else."""
    if not os.path.exists(path):
        _fail(f"MODEL must be an existing file or folder. Received: {path} "
              "(not found)")
    if os.path.isfile(path):
        if not path.endswith(".keras"):
            _fail("MODEL must be a .keras file, an alpt-train output folder "
                  f"or an export. Received: {path} (a file, not .keras)")
        folder = os.path.dirname(os.path.abspath(path))
        return "keras", path, folder if os.path.isfile(
            os.path.join(folder, run_dir.RUN_FILE)) else None
    if os.path.isfile(os.path.join(path, "model.keras")):
        return "keras", os.path.join(path, "model.keras"), path if \
            os.path.isfile(os.path.join(path, run_dir.RUN_FILE)) else None
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return "export", path, None
    version = _newest_version(path)
    if version:
        return "export", version, None
    _fail("MODEL must be a .keras file, an alpt-train output folder (with "
          "model.keras) or an export (a folder with saved_model.pb, or "
          f"numbered versions of one). Received: {path} (a folder with none "
          "of these)")


def data_settings(args, run):
    """The `alpt-train` data flags to rebuild the examples with: its
    defaults, then the run's `run.json`, then this command's flags."""
    from alpt_keras.cli.train import _parser as train_parser

    settings = vars(train_parser().parse_args([]))
    settings = {k: settings[k] for k in DATA_SETTINGS}
    if run is not None:
        with open(os.path.join(run, run_dir.RUN_FILE), encoding="utf-8") as f:
            recorded = json.load(f)
        settings.update({k: recorded[k] for k in DATA_SETTINGS
                         if k in recorded})
    own_data = True
    if args.dataset is not None and args.dataset != settings["dataset"]:
        settings["dataset"], settings["data_path"] = args.dataset, None
        own_data = False
    if args.data_path is not None:
        own_data = own_data and settings["data_path"] is not None and \
            os.path.abspath(args.data_path) == os.path.abspath(
                settings["data_path"])
        settings["data_path"] = args.data_path
    return argparse.Namespace(**settings), own_data


def _check(args, settings, run):
    """Every flag checked before anything is loaded."""
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1. Received: {args.batch_size}")
    if os.path.isdir(args.output):
        _fail(f"--output must be a file. Received: {args.output} (a "
              "folder)")
    dataset = settings.dataset
    if dataset in ("criteo", "avazu"):
        if not settings.data_path:
            _fail(f"--dataset {dataset} needs --data-path.")
        if not os.path.isfile(settings.data_path):
            _fail(f"--data-path must be an existing file. Received: "
                  f"{settings.data_path}")
        vocabulary = args.vocabulary or (
            os.path.join(run, "vocabulary.json") if run else None)
        if not vocabulary or not os.path.isfile(vocabulary):
            _fail(f"--dataset {dataset} needs the training run's "
                  "vocabulary: give --vocabulary FILE (alpt-train writes "
                  "vocabulary.json to its output folder). Received: "
                  f"{vocabulary or 'none'}")
        return vocabulary
    if args.data_path:
        _fail(f"--data-path does not apply to --dataset {dataset} (only "
              f"criteo and avazu read a file). Received: --data-path "
              f"{args.data_path}")
    if args.vocabulary:
        _fail(f"--vocabulary does not apply to --dataset {dataset}. "
              f"Received: --vocabulary {args.vocabulary}")
    return None


def examples(settings, vocabulary, split, batch_size):
    """Yields `(features, labels)` NumPy batches of `split`, built exactly
    as `alpt-train` builds them (for Criteo/Avazu: the saved vocabulary,
    never a refit)."""
    if settings.dataset in ("criteo", "avazu"):
        if settings.dataset == "criteo":
            from alpt_keras.models.criteo import CriteoPipeline as Pipeline
        else:
            from alpt_keras.models.avazu import AvazuPipeline as Pipeline
        pipeline = Pipeline(settings.data_path, min_count=settings.min_count,
                            seed=settings.seed).load_vocabulary(vocabulary)
        yield from pipeline.batches(split, batch_size)
        return
    from alpt_keras.cli.train import _load_data

    settings.batch_size = batch_size
    _, splits, _, _ = _load_data(settings, {})
    chosen = splits if split == "all" else \
        [splits[("train", "validation", "test").index(split)]]
    for data in chosen:
        for features, labels in data.as_numpy_iterator():
            yield features, labels


def _predictor(kind, path):
    """A function NumPy features -> probabilities `[n]`."""
    import tensorflow as tf

    if kind == "keras":
        from alpt_keras.compat import keras

        model = keras.models.load_model(path)
        return lambda features: np.asarray(
            model(features, training=False)).reshape(-1)
    signatures = tf.saved_model.load(path).signatures
    # A raw-feature export takes the ids under "serving_ids".
    signature = signatures["serving_ids"] if "serving_ids" in signatures \
        else signatures["serving_default"]
    specs = signature.structured_input_signature[1]

    def predict(features):
        inputs = {name: tf.convert_to_tensor(features[name], spec.dtype)
                  for name, spec in specs.items()}
        return signature(**inputs)["probability"].numpy().reshape(-1)

    return predict


def main(argv=None):
    """`alpt-evaluate`. Returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    kind, path, run = resolve_model(args.model)
    if args.run is not None:
        if not os.path.isfile(os.path.join(args.run, run_dir.RUN_FILE)):
            _fail(f"--run must be an alpt-train output folder (with "
                  f"{run_dir.RUN_FILE}). Received: {args.run}")
        run = args.run
    settings, own_data = data_settings(args, run)
    vocabulary = _check(args, settings, run)
    split = args.split or ("test" if own_data else "all")
    from alpt_keras import _startup
    from alpt_keras.models.metrics import auc, logloss

    _startup.list_devices_quietly()

    if args.split is None and not own_data:
        print("alpt-evaluate: scoring every example of the new data "
              "(--split all)")
    start = time.perf_counter()
    predict = _predictor(kind, path)
    labels, scores = [], []
    try:
        for features, batch_labels in examples(settings, vocabulary, split,
                                               args.batch_size):
            scores.append(predict(features))
            labels.append(np.asarray(batch_labels).reshape(-1))
    except KeyError as error:
        _fail(f"the model needs feature {error} that {settings.dataset} "
              "data does not have; is MODEL trained on this data set?")
    if not labels:
        _fail(f"no examples in split {split!r} of {settings.dataset}"
              f"{' ' + settings.data_path if settings.data_path else ''}.")
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    result = {
        "model": os.path.abspath(path), "kind": kind,
        "data": {k: v for k, v in vars(settings).items()
                 if k in DATA_SETTINGS},
        "split": split, "examples": int(len(labels)),
        "positives": int(labels.sum()),
        "auc": auc(labels, scores), "logloss": logloss(labels, scores),
        "mean_prediction": float(scores.mean()),
        "seconds": time.perf_counter() - start,
    }
    print(f"AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}  on "
          f"{result['examples']:,} examples ({settings.dataset}, split "
          f"{split}; {kind} {path})")
    run_dir.write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
