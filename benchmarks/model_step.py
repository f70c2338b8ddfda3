"""Full-model training throughput: ALPT vs float32 at a 2^22-row table.

The same CTR model in every setup: 26 categorical fields looked up in one
table of V = 2^22 rows x 16 (ids drawn as
`numpy.random.default_rng(0).zipf(1.2, size=(B, 26)) % V`), the 26 rows
concatenated, an MLP 256-128 (ReLU) and a logit, binary cross-entropy,
batch 4096, trained with `model.fit`. Setups, measured in the same process
and interleaved (each fits a few steps per round) so their ratios are
comparable:

- `alpt`: `ALPTEmbedding` (8-bit, per-row Δ) + `ALPTOptimizer(Adam)` with
  its defaults (row-wise Adagrad rows);
- `alpt_stock`: the same on stock TensorFlow ops only (`kernels="stock"`:
  no native kernels), so the kernels' gain is measured in the same run;
- `alpt_2pass`: the same with the paper-exact two-pass step;
- `float32_sgd`: `keras.layers.Embedding`, Keras SGD for everything (the
  fastest float32 setup on Keras 3, whose SGD is row-sparse);
- `float32_adam`: `keras.layers.Embedding`, Keras Adam for everything (its
  moments are updated for all `[V, D]` entries every step).

With `--layout criteo_like` the model has the 26 tables of `alpt-train`'s
default data instead (vocabularies 10 … 31,623 ids, 114,732 rows in all,
each field's ids `zipf(1.2) % V_i`), built by `models.FeatureEmbedding`;
the setups are `alpt` (tables stacked, the default), `alpt_stock`,
`alpt_unstacked` (`stack_tables=False`: 26 separate tables), `float32_sgd` and
`float32_adam` (26 `keras.layers.Embedding`).

    python benchmarks/model_step.py           # full (~3 min)
    python benchmarks/model_step.py --layout criteo_like
    python benchmarks/model_step.py --tiny    # smoke run for CI

Prints a table (steady-state examples/s, ratio to the fastest float32 setup
and to float32 + Adam) and writes JSON (default
benchmarks/results/model_step.json).
"""

import argparse
import time

import numpy as np
import tensorflow as tf
from _report import (
    add_workload_arguments,
    default_output,
    machine_info,
    workload_ids,
    write_report,
)

from alpt_keras import ALPTEmbedding, ALPTOptimizer, compat, two_pass

keras = compat.keras
SETUPS = ("alpt", "alpt_stock", "alpt_2pass", "alpt_unstacked",
          "float32_sgd", "float32_adam")
LAYOUTS = ("one_table", "criteo_like")


def criteo_like_sizes(fields):
    """The vocabulary sizes of `alpt-train`'s default data."""
    from alpt_keras.models.synthetic import criteo_like_synthetic

    return criteo_like_synthetic(1, 0, num_fields=fields).vocab_size


def _compile(model, name):
    if name == "float32_sgd":
        optimizer = keras.optimizers.SGD(0.01)
    elif name == "float32_adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = ALPTOptimizer(
            keras.optimizers.Adam(1e-3),
            step_size_gradient="two_pass" if name == "alpt_2pass"
            else "one_pass",
            kernels="stock" if name == "alpt_stock" else "auto")
    model.compile(optimizer, "binary_crossentropy", jit_compile=False)
    if name == "alpt_2pass":
        two_pass(model)
    return model


def build_criteo_like(name, sizes, dim, seed=0):
    from alpt_keras.models.feature_embedding import FeatureEmbedding
    from alpt_keras.models.features import simple_features

    keras.utils.set_random_seed(seed)
    names = [f"C{i + 1}" for i in range(len(sizes))]
    features = simple_features(
        dict(zip(names, sizes, strict=True)), embedding_dim=dim,
        kind="float32" if name.startswith("float32") else "alpt", seed=seed)
    inputs = {n: keras.Input((), dtype="int64", name=n) for n in names}
    x = keras.layers.Flatten()(FeatureEmbedding(
        features, stack_tables=name != "alpt_unstacked")(inputs))
    for units in (256, 128):
        x = keras.layers.Dense(units, activation="relu")(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    return _compile(keras.Model(inputs, out), name)


def build(name, rows, dim, fields, seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((fields,), dtype="int64", name="ids")
    if name.startswith("alpt"):
        table = ALPTEmbedding(rows, dim, seed=seed, name="table")
    else:
        table = keras.layers.Embedding(rows, dim, name="table")
    x = keras.layers.Flatten()(table(ids))
    for units in (256, 128):
        x = keras.layers.Dense(units, activation="relu")(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    return _compile(keras.Model(ids, out), name)


class _BatchTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def measure(names, rows, dim, fields, batch, steps, warmup, rounds,
            layout="one_table"):
    labels = np.random.default_rng(1).integers(
        0, 2, size=(batch * 4, 1)).astype(np.float32)
    if layout == "criteo_like":
        sizes = criteo_like_sizes(fields)
        raw = np.random.default_rng(0).zipf(1.2, size=(4 * batch, fields))
        ids = raw % np.asarray(sizes)
        x = {f"C{i + 1}": ids[:, i] for i in range(fields)}
        models = {name: build_criteo_like(name, sizes, dim)
                  for name in names}
    else:
        ids = workload_ids(batch, fields, rows, count=4)
        x = ids
        models = {name: build(name, rows, dim, fields) for name in names}
    data = tf.data.Dataset.from_tensor_slices((x, labels)).batch(
        batch).repeat().prefetch(2)
    for model in models.values():
        model.fit(data, steps_per_epoch=warmup, epochs=1, verbose=0)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, model in models.items():
            callback = _BatchTimes()
            model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
                      callbacks=[callback])
            times[name].extend(callback.times)
    if layout == "criteo_like":  # rows of different tables differ
        ids = ids + np.cumsum([0] + list(sizes[:-1]))
    unique = int(np.mean([len(np.unique(ids[i:i + batch]))
                          for i in range(0, len(ids), batch)]))
    results = []
    for name in names:
        median = float(np.median(times[name]))
        results.append({"setup": name, "median_step_seconds": median,
                        "examples_per_second": batch / median,
                        "steps": len(times[name])})
    return results, unique


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_arguments(parser, rows=2**22)
    parser.add_argument("--steps", type=int, default=5,
                        help="steps per setup per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=None,
                        choices=SETUPS,
                        help="default: alpt, alpt_stock, alpt_2pass and the "
                             "float32 setups (one_table); alpt, alpt_stock, "
                             "alpt_unstacked and the float32 setups "
                             "(criteo_like)")
    parser.add_argument("--layout", choices=LAYOUTS, default="one_table")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: benchmarks/results/"
                             "model_step[_criteo_like].json)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    args = parser.parse_args()
    if args.setups is None:
        args.setups = ["alpt", "alpt_stock", "alpt_unstacked"] if \
            args.layout == "criteo_like" else ["alpt", "alpt_stock",
                                               "alpt_2pass"]
        args.setups += ["float32_sgd", "float32_adam"]
    if args.output is None:
        args.output = default_output(
            "model_step" if args.layout == "one_table"
            else f"model_step_{args.layout}")
    if args.tiny:
        args.rows, args.batch, args.steps, args.warmup = 2**12, 256, 2, 1
        args.rounds = 1
    results, unique = measure(args.setups, args.rows, args.dim, args.features,
                              args.batch, args.steps, args.warmup,
                              args.rounds, args.layout)
    by_name = {r["setup"]: r for r in results}
    float32 = [r for r in results if r["setup"].startswith("float32")]
    fastest = max(float32, key=lambda r: r["examples_per_second"],
                  default=None)
    adam = by_name.get("float32_adam")
    tables = (f"{args.features} tables, {sum(criteo_like_sizes(args.features))}"
              " rows" if args.layout == "criteo_like" else f"V={args.rows}")
    print(f"{tables} D={args.dim} batch={args.batch}x{args.features} "
          f"(~{unique} unique ids/step), MLP 256-128, "
          f"{'Keras 3' if compat.IS_KERAS_3 else 'tf_keras'}, median of "
          f"{args.steps * args.rounds} steps, setups interleaved")
    print(f"{'setup':<14}{'examples/s':>12}{'ms/step':>10}"
          f"{'vs fastest f32':>16}{'vs f32 Adam':>13}")
    for r in results:
        r["ratio_to_fastest_float32"] = (
            r["examples_per_second"] / fastest["examples_per_second"]
            if fastest else None)
        r["ratio_to_float32_adam"] = (
            r["examples_per_second"] / adam["examples_per_second"]
            if adam else None)
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{r['setup']:<14}{r['examples_per_second']:>12,.0f}"
              f"{1000 * r['median_step_seconds']:>10.1f}"
              f"{fmt(r['ratio_to_fastest_float32']):>16}"
              f"{fmt(r['ratio_to_float32_adam']):>13}")
    write_report(args.output, {
        "benchmark": "model_step", "config": vars(args),
        "fastest_float32": fastest["setup"] if fastest else None,
        "unique_ids_per_step": unique, "machine": machine_info(),
        "results": results})


if __name__ == "__main__":
    main()
