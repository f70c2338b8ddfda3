"""Accuracy matrix: does ALPT keep float32 accuracy, and beat LPT?

For each data set (MovieLens-100K as CTR, the built-in synthetic set),
backbone (DNN, DCN), table optimizer (row-wise Adagrad, lazy Adam) and seed,
trains and evaluates on the test split:

- `float32`: float32 `keras.layers.Embedding` tables updated by the same
  table optimizer as the ALPT runs (the same row update code, without
  quantization), the dense layers by Adam: the like-for-like reference, so
  the paired difference measures quantization alone;
- `lpt_dr`, `lpt_sr`: Δ fixed at ALPT's LSQ initial value, rows written back
  with deterministic / stochastic rounding;
- `alpt`: learned Δ, the one-pass step-size gradient (the default);
- `alpt_2pass`: learned Δ, the paper-exact two-pass step
  (`alpt_keras.two_pass`);

each at 8, 4 and 2 bits. Reports mean ± std over seeds of test AUC and
logloss, and the paired difference to float32 (same seed, same test
examples) with a 95% bootstrap interval over 1000 resamples, each drawing
the seeds (training noise) and the test examples (test-set noise, the same
draw for both models of a pair) with replacement. Checks the goals
of issue 6: at 8 bits ALPT's interval contains 0 and lies within ±0.002; at
4 and 2 bits mean AUC ALPT >= LPT-SR >= LPT-DR.

    python benchmarks/accuracy.py                 # full matrix (~1 h)
    python benchmarks/accuracy.py --datasets synthetic --seeds 0 1 2
    python benchmarks/accuracy.py --tiny          # smoke run for CI

Each run's test predictions are cached (`--cache-dir`), so an interrupted
run resumes where it stopped. Prints a table, writes JSON and a PNG plot
(default benchmarks/results/accuracy.{json,png}).
"""

import argparse
import hashlib
import json
import logging
import os
import time

import numpy as np
import tensorflow as tf
from _report import default_output, machine_info, write_report

from alpt_keras import ALPTOptimizer, compat, two_pass, update
from alpt_keras.models.ctr_models import build_ctr_model
from alpt_keras.models.features import simple_features
from alpt_keras.models.metrics import auc, logloss
from alpt_keras.models.synthetic import criteo_like_synthetic

keras = compat.keras
METHODS = ("float32", "lpt_dr", "lpt_sr", "alpt", "alpt_2pass")
# method -> (table kind, rounding, step-size gradient)
_METHOD = {
    "float32": ("float32", "stochastic", None),
    "lpt_dr": ("lpt", "deterministic", None),
    "lpt_sr": ("lpt", "stochastic", None),
    "alpt": ("alpt", "stochastic", "one_pass"),
    "alpt_2pass": ("alpt", "stochastic", "two_pass"),
}


# ------------------------------------------------------------------ data
def load_dataset(name, args):
    """Returns (feature-config factory, train, test) as NumPy dicts."""
    if name == "movielens":
        from alpt_keras.models.movielens import MovieLensCTR

        data = MovieLensCTR(seed=0)
        train, test = data.arrays("train"), data.arrays("test")
        return data.feature_configs, train, test
    data = criteo_like_synthetic(args.num_examples, seed=0,
                                 num_fields=args.num_fields)
    train, rest = data.split(0.8)
    _, test = rest.split(0.5)
    names = [f"C{i + 1}" for i in range(data.ids.shape[1])]
    sizes = data.vocab_size if isinstance(data.vocab_size, list) else \
        [data.vocab_size] * len(names)
    vocabulary = dict(zip(names, sizes, strict=True))

    def configs(**kwargs):
        return simple_features(vocabulary, **kwargs)

    return (configs, (train.features(names), train.labels),
            (test.features(names), test.labels))


# --------------------------------------------------------------- metrics
def _weighted_auc(labels, scores, weights):
    """AUC of each row of `weights` ([R, n] example counts), by sorting
    once: for each positive, the weight of negatives scored below it (ties
    count half)."""
    order = np.argsort(scores, kind="mergesort")
    y = np.asarray(labels).astype(bool)[order]
    s = np.asarray(scores)[order]
    w = weights[:, order].astype(np.float64)
    neg = np.where(y, 0.0, w)
    pos = np.where(y, w, 0.0)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly before
    # Ties: negatives with the same score count half.
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    group = np.repeat(np.arange(len(starts)),
                      np.diff(np.r_[starts, len(s)]))
    group_neg = np.add.reduceat(neg, starts, axis=1)
    group_start_below = below[:, starts]
    strictly_below = group_start_below[:, group]
    tied = group_neg[:, group]
    wins = np.sum(pos * (strictly_below + 0.5 * tied), axis=1)
    return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def _weighted_logloss(labels, scores, weights):
    p = np.clip(np.asarray(scores, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    per_example = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return (weights @ per_example) / weights.sum(axis=1)


def paired_bootstrap(labels, method_scores, base_scores, resamples, seed):
    """Mean over seeds of (method - float32), with a 95% interval.

    Each resample draws the seeds with replacement (training noise) and the
    test examples with replacement (test-set noise, the same draw for both
    models of a pair), and averages the drawn seeds' paired differences.
    """
    n, seeds = len(labels), len(method_scores)
    rng = np.random.default_rng(seed)
    per_seed_auc = np.zeros((seeds, resamples))
    per_seed_loss = np.zeros((seeds, resamples))
    chunk = max(1, int(2e7 // n))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=count).astype(
            np.float32)
        for s, (method, base) in enumerate(zip(method_scores, base_scores,
                                               strict=True)):
            per_seed_auc[s, start:start + count] = (
                _weighted_auc(labels, method, weights)
                - _weighted_auc(labels, base, weights))
            per_seed_loss[s, start:start + count] = (
                _weighted_logloss(labels, method, weights)
                - _weighted_logloss(labels, base, weights))
    drawn = rng.integers(0, seeds, size=(resamples, seeds))
    columns = np.arange(resamples)[:, None]
    d_auc = per_seed_auc[drawn, columns].mean(axis=1)
    d_loss = per_seed_loss[drawn, columns].mean(axis=1)
    point_auc = np.mean([auc(labels, m) - auc(labels, b) for m, b in
                         zip(method_scores, base_scores, strict=True)])
    point_loss = np.mean([logloss(labels, m) - logloss(labels, b) for m, b
                          in zip(method_scores, base_scores, strict=True)])
    return {"d_auc": float(point_auc),
            "d_auc_ci": [float(v) for v in np.percentile(d_auc, [2.5, 97.5])],
            "d_logloss": float(point_loss),
            "d_logloss_ci": [float(v) for v in
                             np.percentile(d_loss, [2.5, 97.5])]}


# -------------------------------------------------------------- training
def float32_rows(model, table_opt):
    """Gives a float32 model the ALPT table optimizer for its tables.

    The rows touched by a batch get `table_opt`'s update, computed by the
    same rule spec (`alpt_keras.update`) and defaults that ALPTOptimizer
    uses, with no quantization; the dense variables get the compiled
    optimizer.
    """
    config = update.UpdateConfig(embedding_optimizer=table_opt)
    rule, hyper = config.table_rule, config.embedding_hyperparameters
    tables = [layer.embeddings for layer in compat.flatten_layers(model)
              if isinstance(layer, keras.layers.Embedding)]
    table_ids = {id(v) for v in tables}
    slots = [{s.name: tf.Variable(tf.zeros(
        (v.shape[0], v.shape[1] if s.per_element else 1)), trainable=False)
        for s in rule.slots} for v in tables]
    step = tf.Variable(0, dtype=tf.int64, trainable=False)

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            if compat.IS_KERAS_3:
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred,
                                          sample_weight=sample_weight,
                                          training=True)
            else:
                loss = model.compute_loss(x, y, y_pred, sample_weight)
        dense = [v for v in model.trainable_variables
                 if id(v) not in table_ids]
        grads = tape.gradient(loss, dense + tables)
        model.optimizer.apply_gradients(
            zip(grads[:len(dense)], dense, strict=True))
        t = tf.cast(step + 1, tf.float32)
        for variable, grad, slot in zip(tables, grads[len(dense):], slots,
                                        strict=True):
            variable = compat.tf_variable(variable)
            ids, positions = tf.unique(tf.cast(grad.indices, tf.int64))
            g = tf.math.unsorted_segment_sum(grad.values, positions,
                                             tf.shape(ids)[0])
            state = {n: tf.gather(slot[n], ids) for n in slot}
            new_rows, new_state = rule.update(
                tf.gather(variable, ids), g, state, hyper, t)
            variable.scatter_update(tf.IndexedSlices(new_rows, ids))
            for n, value in new_state.items():
                if isinstance(value, update.Increment):
                    value = value.value
                slot[n].scatter_update(tf.IndexedSlices(value, ids))
        step.assign_add(1)
        return {"loss": loss}

    model.train_step = train_step  # keeps `slots` and `step` alive
    return model


def train_one(configs, train, test, model_name, method, bits, table_opt,
              seed, args):
    """Trains one model; returns its test predictions and seconds."""
    keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    kind, rounding, gradient = _METHOD[method]
    features = configs(embedding_dim=args.embedding_dim, kind=kind,
                       num_bits=bits, rounding=rounding, seed=seed)
    model = build_ctr_model(features, model=model_name,
                            hidden_units=args.hidden_units, seed=seed)
    optimizer = keras.optimizers.Adam(args.learning_rate)
    if kind != "float32":
        optimizer = ALPTOptimizer(optimizer, embedding_optimizer=table_opt,
                                  step_size_gradient=gradient or "one_pass")
    model.compile(optimizer, "binary_crossentropy")
    if gradient == "two_pass":
        two_pass(model)
    if kind == "float32":
        float32_rows(model, table_opt)
    x, y = train
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
              shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    scores = model.predict(test[0], batch_size=8192, verbose=0).reshape(-1)
    return scores.astype(np.float32), seconds


def _run_key(dataset, model_name, method, bits, table_opt, seed, args):
    settings = dict(dataset=dataset, model=model_name, method=method,
                    bits=bits, table_opt=table_opt, seed=seed,
                    epochs=args.epochs, batch=args.batch_size,
                    lr=args.learning_rate, hidden=list(args.hidden_units),
                    dim=args.embedding_dim, examples=args.num_examples,
                    fields=args.num_fields,
                    flavour=machine_info()["keras_flavour"])
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    return settings, digest.hexdigest()[:16]


def run_matrix(args):
    runs = []
    os.makedirs(args.cache_dir, exist_ok=True)
    for dataset in args.datasets:
        configs, train, test = load_dataset(dataset, args)
        labels = np.asarray(test[1]).reshape(-1)
        for model_name in args.models:
            for table_opt in args.table_optimizers:
                for seed in args.seeds:
                    for method in args.methods:
                        for bits in ([None] if method == "float32"
                                     else args.bits):
                            settings, key = _run_key(
                                dataset, model_name, method, bits, table_opt,
                                seed, args)
                            path = os.path.join(args.cache_dir, key + ".npz")
                            if os.path.exists(path):
                                cached = np.load(path)
                                scores = cached["scores"]
                                seconds = float(cached["seconds"])
                            else:
                                scores, seconds = train_one(
                                    configs, train, test, model_name, method,
                                    bits or 8, table_opt, seed, args)
                                np.savez(path, scores=scores, seconds=seconds)
                            run = dict(settings, table_opt=table_opt,
                                       auc=auc(labels, scores),
                                       logloss=logloss(labels, scores),
                                       seconds=seconds)
                            runs.append((run, scores, labels))
                            print(f"  {dataset:9s} {model_name:4s} "
                                  f"{table_opt:15s} seed {seed} "
                                  f"{method:10s} {bits or 32:>2}: AUC "
                                  f"{run['auc']:.4f} logloss "
                                  f"{run['logloss']:.4f} "
                                  f"({seconds:.1f} s)", flush=True)
    return runs


def summarize(runs, args):
    groups = {}
    for run, scores, labels in runs:
        key = (run["dataset"], run["model"], run["table_opt"],
               run["method"], run["bits"])
        groups.setdefault(key, []).append((run, scores, labels))
    rows = []
    for key, members in groups.items():
        dataset, model_name, table_opt, method, bits = key
        aucs = [m[0]["auc"] for m in members]
        losses = [m[0]["logloss"] for m in members]
        row = dict(dataset=dataset, model=model_name, table_opt=table_opt,
                   method=method, bits=bits, seeds=len(members),
                   auc_mean=float(np.mean(aucs)),
                   auc_std=float(np.std(aucs, ddof=1)) if len(aucs) > 1
                   else 0.0,
                   logloss_mean=float(np.mean(losses)),
                   logloss_std=float(np.std(losses, ddof=1))
                   if len(losses) > 1 else 0.0)
        if method != "float32":
            base = {m[0]["seed"]: m[1] for m in groups[
                (dataset, model_name, table_opt, "float32", None)]}
            paired = [(m[1], base[m[0]["seed"]]) for m in members
                      if m[0]["seed"] in base]
            row.update(paired_bootstrap(
                members[0][2], [p[0] for p in paired],
                [p[1] for p in paired], args.resamples, seed=0))
        rows.append(row)
    return rows


def check_goals(rows):
    """Issue 6's accuracy goals, per (dataset, model, table optimizer)."""
    index = {(r["dataset"], r["model"], r["table_opt"], r["method"],
              r["bits"]): r for r in rows}
    goals = []
    combos = sorted({k[:3] for k in index})
    for dataset, model_name, table_opt in combos:
        alpt8 = index.get((dataset, model_name, table_opt, "alpt", 8))
        if alpt8 is not None:
            low, high = alpt8["d_auc_ci"]
            goals.append(dict(
                dataset=dataset, model=model_name, table_opt=table_opt,
                goal="alpt8: 95% CI of dAUC contains 0, within +-0.002",
                value=[low, high],
                met=bool(low <= 0 <= high and low >= -0.002
                         and high <= 0.002)))
        for bits in (4, 2):
            names = ("alpt", "lpt_sr", "lpt_dr")
            found = [index.get((dataset, model_name, table_opt, n, bits))
                     for n in names]
            if any(f is None for f in found):
                continue
            means = [f["auc_mean"] for f in found]
            goals.append(dict(
                dataset=dataset, model=model_name, table_opt=table_opt,
                goal=f"{bits}-bit mean AUC: alpt >= lpt_sr >= lpt_dr",
                value=means, met=bool(means[0] >= means[1] >= means[2])))
    return goals


# ---------------------------------------------------------------- output
def format_table(rows):
    lines = [f"{'data':9s} {'model':5s} {'table opt':15s} {'method':10s} "
             f"{'bits':>4s} {'AUC mean±std':>17s} {'logloss mean±std':>17s} "
             f"{'dAUC [95% CI]':>28s}"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["model"],
                                         r["table_opt"] or "",
                                         -(r["bits"] or 32),
                                         order[r["method"]])):
        d = ""
        if "d_auc" in r:
            lo, hi = r["d_auc_ci"]
            d = f"{r['d_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        lines.append(
            f"{r['dataset']:9s} {r['model']:5s} {r['table_opt'] or '-':15s} "
            f"{r['method']:10s} {r['bits'] or 32:>4} "
            f"{r['auc_mean']:.4f}±{r['auc_std']:.4f}   "
            f"{r['logloss_mean']:.4f}±{r['logloss_std']:.4f}  {d:>28s}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["model"], r["table_opt"])
                     for r in rows if r["method"] != "float32"})
    columns = min(4, len(panels))
    grid = -(-len(panels) // columns)
    fig, axes = plt.subplots(grid, columns, figsize=(4 * columns, 3.4 * grid),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (dataset, model_name, table_opt) in zip(
            axes.flat[:len(panels)], panels, strict=True):
        for offset, method in enumerate(METHODS[1:]):
            points = sorted(
                (r for r in rows if (r["dataset"], r["model"],
                                     r["table_opt"], r["method"])
                 == (dataset, model_name, table_opt, method)),
                key=lambda r: r["bits"])
            if not points:
                continue
            x = np.arange(len(points)) + 0.08 * (offset - 1.5)
            y = [p["d_auc"] for p in points]
            err = np.array([[p["d_auc"] - p["d_auc_ci"][0],
                             p["d_auc_ci"][1] - p["d_auc"]] for p in points])
            ax.errorbar(x, y, yerr=err.T, marker="o", capsize=3,
                        label=method)
            ax.set_xticks(np.arange(len(points)),
                          [str(p["bits"]) for p in points])
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{dataset} {model_name}\n{table_opt}", fontsize=9)
        ax.set_xlabel("bits")
    for row in axes:
        row[0].set_ylabel("test AUC − float32 (95% CI)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+",
                        default=["movielens", "synthetic"],
                        choices=["movielens", "synthetic"])
    parser.add_argument("--models", nargs="+", default=["dnn", "dcn"])
    parser.add_argument("--table-optimizers", nargs="+",
                        default=["rowwise_adagrad", "lazy_adam"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=METHODS)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden-units", type=int, nargs="+",
                        default=[256, 128])
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--num-examples", type=int, default=100_000,
                        help="Size of the synthetic set.")
    parser.add_argument("--num-fields", type=int, default=8,
                        help="Fields of the synthetic set.")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra/inter-op threads (0: TF default).")
    parser.add_argument("--cache-dir", default=os.path.join(
        os.path.expanduser("~"), ".cache", "alpt_keras", "accuracy_runs"))
    parser.add_argument("--output", default=default_output("accuracy"))
    parser.add_argument("--tiny", action="store_true",
                        help="Smoke configuration for CI.")
    parser.add_argument("--plot-only", action="store_true",
                        help="Redraw the PNG from the JSON at --output.")
    args = parser.parse_args()
    if args.plot_only:
        with open(args.output, encoding="utf-8") as f:
            plot(json.load(f)["summary"],
                 os.path.splitext(args.output)[0] + ".png")
        return
    tf.get_logger().setLevel(logging.ERROR)  # predict retracing notices
    if args.tiny:
        args.datasets, args.models = ["synthetic"], ["dnn"]
        args.table_optimizers, args.bits = ["rowwise_adagrad"], [8, 2]
        args.seeds, args.epochs, args.num_examples = [0, 1], 1, 6000
        args.num_fields, args.hidden_units = 4, [16]
        args.resamples, args.batch_size = 50, 256
        args.cache_dir = os.path.join(os.path.dirname(
            os.path.abspath(args.output)), "accuracy_tiny_cache")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    start = time.perf_counter()
    runs = run_matrix(args)
    rows = summarize(runs, args)
    goals = check_goals(rows)
    print()
    print(format_table(rows))
    print()
    for g in goals:
        value = ", ".join(f"{v:+.4f}" if abs(v) < 0.5 else f"{v:.4f}"
                          for v in g["value"])
        print(f"{'MET ' if g['met'] else 'MISS'} {g['dataset']} {g['model']} "
              f"{g['table_opt']}: {g['goal']} ({value})")
    report = dict(
        benchmark="accuracy", machine=machine_info(),
        settings=dict(datasets=args.datasets, models=args.models,
                      table_optimizers=args.table_optimizers,
                      methods=args.methods, bits=args.bits, seeds=args.seeds,
                      epochs=args.epochs, batch_size=args.batch_size,
                      learning_rate=args.learning_rate,
                      hidden_units=args.hidden_units,
                      embedding_dim=args.embedding_dim,
                      num_examples=args.num_examples,
                      num_fields=args.num_fields, resamples=args.resamples),
        runs=[r for r, _, _ in runs], summary=rows, goals=goals,
        seconds=time.perf_counter() - start)
    write_report(args.output, report)
    plot(rows, os.path.splitext(args.output)[0] + ".png")


if __name__ == "__main__":
    main()
