"""`alpt-train`: train a CTR model with float32 and ALPT tables, compare.

This first version trains the quick-start DNN on the built-in synthetic data
(issue 3 adds the real datasets, model zoo, resume and export). It prints the
test AUC and logloss of a float32 baseline next to ALPT at the chosen bit
width, and the bytes of each table with its optimizer state.

The command is the only module that may import both `models` and `export`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="alpt-train",
        description="Train float32 vs ALPT embeddings on synthetic CTR data.",
    )
    parser.add_argument("--num-examples", type=int, default=200_000)
    parser.add_argument("--num-fields", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=2_000)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--rounding", default="stochastic",
                        choices=("stochastic", "deterministic"))
    parser.add_argument("--step-size", default="row", choices=("row", "table"))
    parser.add_argument("--embedding-optimizer", default="rowwise_adagrad")
    parser.add_argument("--embedding-learning-rate", type=float, default=None)
    parser.add_argument("--step-size-learning-rate", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None,
                        help="Writes report.json here.")
    return parser.parse_args(argv)


def _nbytes(variable):
    import tensorflow as tf

    itemsize = tf.as_dtype(variable.dtype).size
    return int(np.prod(variable.shape)) * itemsize


def _short_name(variable):
    return variable.name.split("/")[-1].split(":")[0]


def _table_bytes(model, optimizer):
    """Bytes of the embedding tables and of their optimizer state.

    Tables: `codes` + `step_sizes` (ALPT) or `embeddings` (float32). State:
    the wrapper's row-indexed variables (ALPT) or the inner optimizer's slots
    shaped like a float32 table (e.g. Adam's m and v).
    """
    tables = [v for v in model.weights
              if _short_name(v) in ("codes", "step_sizes", "embeddings")]
    table_shapes = {tuple(v.shape) for v in tables
                    if _short_name(v) == "embeddings"}
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        inner_ids = {id(v) for v in inner.variables}
        state = [v for v in optimizer.variables
                 if id(v) not in inner_ids and len(v.shape) == 2]
    else:
        state = [v for v in optimizer.variables
                 if tuple(v.shape) in table_shapes]
    return {"tables": sum(map(_nbytes, tables)),
            "optimizer_state": sum(map(_nbytes, state))}


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    import tensorflow as tf

    from alpt_keras import ALPTOptimizer
    from alpt_keras._keras import keras
    from alpt_keras.models.dnn import build_dnn
    from alpt_keras.models.synthetic import make_synthetic_ctr

    tf.keras.utils.set_random_seed(args.seed)
    data = make_synthetic_ctr(args.num_examples, args.num_fields,
                              args.vocab_size, zipf_exponent=1.1,
                              seed=args.seed)
    train, test = data.split(0.9)
    best = float(keras.metrics.AUC()(test.labels, test.probabilities))
    results = {"best_possible_test_auc": best, "runs": {}}
    print(f"synthetic data: {args.num_examples} examples, "
          f"{args.num_fields} fields, vocab {args.vocab_size}; "
          f"hidden-model test AUC {best:.4f}")
    for kind in ("float32", "alpt"):
        model = build_dnn(args.num_fields, args.vocab_size, embedding=kind,
                          num_bits=args.bits, rounding=args.rounding,
                          step_size=args.step_size, seed=args.seed)
        inner = keras.optimizers.Adam(args.learning_rate)
        if kind == "float32":
            optimizer = inner
        else:
            optimizer = ALPTOptimizer(
                inner,
                embedding_optimizer=args.embedding_optimizer,
                embedding_learning_rate=args.embedding_learning_rate,
                step_size_learning_rate=args.step_size_learning_rate,
            )
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc")])
        start = time.perf_counter()
        model.fit(train.ids, train.labels, batch_size=args.batch_size,
                  epochs=args.epochs, verbose=2)
        seconds = time.perf_counter() - start
        loss, auc = model.evaluate(test.ids, test.labels,
                                   batch_size=8192, verbose=0)
        results["runs"][kind] = {
            "test_auc": float(auc), "test_logloss": float(loss),
            "train_seconds": seconds,
            "bytes": _table_bytes(model, optimizer),
        }
    print(f"\n{'embedding':<12}{'test AUC':>10}{'logloss':>10}"
          f"{'table B':>12}{'opt state B':>13}")
    for kind, run in results["runs"].items():
        label = kind if kind == "float32" else f"alpt-{args.bits}bit"
        print(f"{label:<12}{run['test_auc']:>10.4f}{run['test_logloss']:>10.4f}"
              f"{run['bytes']['tables']:>12}"
              f"{run['bytes']['optimizer_state']:>13}")
    results["config"] = vars(args)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "report.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
