"""Embedding-only training step: ALPT vs float32, measured in one run.

The workload of issue 6: one table of V = 2^20 rows x 16, a batch of
4096 examples x 26 features = 106,496 ids per step drawn as
`numpy.random.default_rng(0).zipf(1.2, size=(4096, 26)) % V`. One step is
forward + backward + update of the embedding alone (loss = Σ rows · c).
Setups, all in the same process so their ratios are comparable:
- `alpt`: `ALPTEmbedding` (8-bit, per-row Δ) + `ALPTOptimizer` defaults
  (row-wise Adagrad rows, row-wise Δ rule, stochastic rounding; the
  native kernels, `alpt_keras.kernels`, when they build);
- `alpt_stock`: the same on stock TensorFlow ops only (`kernels="stock"`);
- `alpt_packed`, `alpt4_packed`: the same with `storage="packed"` (8-bit
  and 4-bit codes bit-packed into int32 words);
- `float32_sgd`: `keras.layers.Embedding` + Keras SGD (row-sparse on
  Keras 3);
- `float32_adam`: `keras.layers.Embedding` + Keras Adam (dense `[V, D]`
  moment updates).

With `--layout criteo_like`, the 26 features look up 26 tables of the
sizes of `alpt-train`'s default data (10 … 31,623 rows, 114,732 in all;
feature i's ids are column i of the draw above `% V_i`). Setups: `alpt`
(the 26 tables stacked in one `ALPTEmbeddingGroup`), `alpt_stock` (the
same, stock ops only), `alpt_unstacked` (26
`ALPTEmbedding` layers), `alpt_one_table` (one `ALPTEmbedding` of all
114,732 rows, each feature's ids offset to its block: the same rows, no
per-table cost), `float32_sgd` (26 `keras.layers.Embedding`), and the
FBGEMM peer with the 26 tables in one TBE.

    python benchmarks/embedding_step.py           # full (~2 min)
    python benchmarks/embedding_step.py --layout criteo_like
    python benchmarks/embedding_step.py --tiny    # smoke run for CI
    # with the FBGEMM peer (`peer` extra, in its own environment):
    python benchmarks/embedding_step.py --peer-python peer-venv/bin/python

With `--peer-python`, `peer_fbgemm.py` (FBGEMM's CPU training operator,
row-wise Adagrad, FP32 and FP16 weights) takes its turn in every round, in
a subprocess of that interpreter, on the same ids.

Prints a table (examples/s, ms/step, ratio to the fastest float32 setup)
and writes JSON (default benchmarks/results/embedding_step.json).
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import tensorflow as tf
from _report import (
    add_workload_arguments,
    default_output,
    interleaved_times,
    machine_info,
    workload_ids,
    write_report,
)

from alpt_keras import (
    ALPTEmbedding,
    ALPTEmbeddingGroup,
    ALPTOptimizer,
    compat,
    kernels,
)

keras = compat.keras


# ALPT setups: name -> ALPTEmbedding arguments.
ALPT_SETUPS = {"alpt": {}, "alpt_stock": {},
               "alpt_packed": {"storage": "packed"},
               "alpt4_packed": {"storage": "packed", "num_bits": 4}}


def _alpt_optimizer(name):
    """`ALPTOptimizer` defaults; `*_stock` setups on stock ops only."""
    return ALPTOptimizer(keras.optimizers.SGD(), kernels="stock"
                         if name.endswith("_stock") else "auto")


def _setup(name, rows, dim):
    if name in ALPT_SETUPS:
        layer = ALPTEmbedding(rows, dim, seed=0, name="table",
                              **ALPT_SETUPS[name])
        optimizer = _alpt_optimizer(name)
    else:
        layer = keras.layers.Embedding(rows, dim, name="table")
        optimizer = (keras.optimizers.SGD(0.01) if name == "float32_sgd"
                     else keras.optimizers.Adam(1e-3))
    return layer, optimizer


LAYOUTS = ("one_table", "criteo_like")
# Setups whose step `alpt_step_bytes` describes (int8, per-row Δ, defaults).
BYTES_MODEL_SETUPS = ("alpt", "alpt_stock", "alpt_unstacked",
                      "alpt_one_table")
CRITEO_LIKE_SETUPS = ("alpt", "alpt_stock", "alpt_unstacked",
                      "alpt_one_table",
                      "float32_sgd", "float32_adam")


def criteo_like_sizes(fields):
    """The vocabulary sizes of `alpt-train`'s default data (restated in
    `peer_fbgemm.py`, whose environment has no alpt_keras)."""
    return [int(round(10 ** e)) for e in np.linspace(1.0, 4.5, fields)]


class _Tables(keras.layers.Layer):
    """The criteo_like layout: feature i looks up table i; `[B, F]` ids
    in, `[B, F, D]` rows out, in one of three forms (`kind`)."""

    def __init__(self, kind, sizes, dim, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.sizes = kind, list(sizes)
        names = self.names = [f"C{i + 1}" for i in range(len(sizes))]
        if kind == "alpt_one_table":
            self.offsets = np.cumsum([0] + self.sizes[:-1])
            self.layers_ = [ALPTEmbedding(sum(sizes), dim, seed=0,
                                          name="table")]
        elif kind.startswith("alpt"):
            tables = [ALPTEmbedding(v, dim, seed=i, name=n)
                      for i, (n, v) in enumerate(zip(names, sizes,
                                                     strict=True))]
            self.layers_ = [ALPTEmbeddingGroup(tables, name="group")] \
                if kind in ("alpt", "alpt_stock") else tables
        else:
            self.layers_ = [keras.layers.Embedding(v, dim, name=n)
                            for n, v in zip(names, sizes, strict=True)]

    def call(self, ids, training=None):
        columns = tf.unstack(ids, axis=1)
        kwargs = {"training": True} if self.kind.startswith("alpt") else {}
        if self.kind == "alpt_one_table":
            shifted = ids + tf.constant(self.offsets, ids.dtype)
            return self.layers_[0](shifted, **kwargs)
        if self.kind in ("alpt", "alpt_stock"):
            # What `models.FeatureEmbedding` does with one-hot features.
            return self.layers_[0].lookup_matrix(self.names, ids, **kwargs)
        return tf.stack([layer(c, **kwargs) for layer, c in
                         zip(self.layers_, columns, strict=True)], axis=1)


def make_step(name, ids, rows, dim, sizes=None):
    """A compiled training step of setup `name` (built and warmed up by
    the caller); `sizes`: the criteo_like layout's table sizes."""
    if sizes is None:
        layer, optimizer = _setup(name, rows, dim)
    else:
        layer = _Tables(name, sizes, dim, name="tables")
        optimizer = _alpt_optimizer(name) \
            if name.startswith("alpt") else (
                keras.optimizers.SGD(0.01) if name == "float32_sgd"
                else keras.optimizers.Adam(1e-3))
    layer(ids[:1])  # build
    optimizer.build(layer.trainable_variables)
    upstream = tf.constant(np.random.default_rng(1).normal(
        0, 1e-4, size=(*ids.shape, dim)).astype(np.float32))
    ids = tf.constant(ids)
    kwargs = {"training": True} if name in ALPT_SETUPS and sizes is None \
        else {}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, **kwargs) * upstream)
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables,
                                      strict=True))
        return loss

    step.layer, step.optimizer = layer, optimizer  # for byte counts
    return step


def table_and_state_bytes(step):
    """Exact bytes of a setup's table and its `[rows, ...]` optimizer
    state (the optimizers' scalar counters aside)."""
    variables = [v for v in step.layer.weights if len(v.shape) == 2] + [
        v for v in step.optimizer.variables if len(v.shape) == 2]
    return int(sum(np.prod(v.shape) * tf.as_dtype(v.dtype).size
                   for v in variables))


def alpt_step_bytes(n, u, d):
    """Bytes an ALPT step (int8 codes, per-row Δ, row-wise Adagrad rows,
    row-wise Δ rule) must read and write at least: its tensors' sizes,
    for `n` ids, `u` unique rows and width `d` (intermediates of the row
    math, which stay in cache, aside).

    - forward: ids 8n, codes nd and Δ 4n read; rows 4nd written;
    - backward: the upstream gradient 4nd read; row gradients 4nd written;
    - dedup + sums: ids 8n and row gradients 4nd read; unique ids 8u,
      positions 4n and sums 4ud written;
    - update: codes ud, Δ, accumulator and Δ accumulator 12u, sums 4ud
      read; codes ud and the three float rows 12u written.
    """
    read = n * (8 + d + 4) + 4 * n * d + (8 * n + 4 * n * d) + (
        u * d + 12 * u + 4 * u * d)
    written = 4 * n * d + 4 * n * d + (8 * u + 4 * n + 4 * u * d) + (
        u * d + 12 * u)
    return {"read": int(read), "written": int(written)}


def memory_copy_gb_per_s(megabytes=256, repeats=5):
    """The machine's memory bandwidth, as a large array copy (NumPy,
    one thread): bytes read + written per second, median of `repeats`."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / float(np.median(times)) / 1e9


def _peer_turn(python, rows, dim, batch, features, steps, warmup,
               precisions, sizes=None):
    """One turn of the FBGEMM peer: setup -> result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peer.json")
        subprocess.run(
            [python, os.path.join(os.path.dirname(os.path.abspath(
                __file__)), "peer_fbgemm.py"), "--rows", str(rows),
             "--dim", str(dim), "--batch", str(batch), "--features",
             str(features), "--steps", str(steps), "--warmup", str(warmup),
             "--json", out, "--precisions", *precisions]
            + (["--table-sizes", *map(str, sizes)] if sizes else []),
            check=True, capture_output=True, text=True, timeout=1800)
        with open(out, encoding="utf-8") as f:
            report = json.load(f)
    return report, {r["setup"]: r for r in report["results"]}


def measure_all(names, ids, rows, dim, steps, warmup, rounds,
                peer_python=None, sizes=None):
    """Median step time of every setup. The setups take turns, `steps`
    steps per turn for `rounds` rounds, so drifting machine load hits all
    of them alike (the peer, if any, takes its turn in each round)."""
    steps_fn = {name: make_step(name, ids, rows, dim, sizes)
                for name in names}
    peer_info, unsupported = {}, {}

    def peer_turn(round_index, times):
        precisions = ["FP32", "FP16"] + (["INT8"] if round_index == 0
                                         else [])
        report, peer = _peer_turn(
            peer_python, rows, dim, ids.shape[0], ids.shape[1], steps,
            warmup, precisions, sizes)
        peer_info.update(report)
        for setup, r in peer.items():
            if r["supported"]:
                times.setdefault(setup, []).extend(r["step_seconds"])
            else:
                unsupported[setup] = r["error"]

    times = interleaved_times(steps_fn, steps, warmup, rounds,
                              peer_turn if peer_python else None)
    results = []
    for name in times:
        median = float(np.median(times[name]))
        results.append({
            "setup": name, "median_step_seconds": median,
            "examples_per_second": ids.shape[0] / median,
            "ids_per_second": int(np.prod(ids.shape)) / median,
            "steps": len(times[name]),
            # Each round's median: rounds of a pair see the same load.
            "round_median_seconds": [
                float(np.median(chunk)) for chunk in
                np.array_split(np.asarray(times[name]), rounds)],
            "table_and_state_bytes": table_and_state_bytes(steps_fn[name])
            if name in steps_fn else None})
    if not peer_python:
        return results, None
    peer_info = {k: v for k, v in peer_info.items() if k != "results"}
    peer_info["unsupported"] = unsupported
    return results, peer_info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=5,
                        help="steps per setup per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=None,
                        help="default: alpt, alpt_stock, alpt_packed, "
                             "alpt4_packed, float32_sgd, float32_adam "
                             "(one_table); alpt, alpt_stock, alpt_unstacked, "
                             "alpt_one_table, float32_sgd (criteo_like)")
    parser.add_argument("--layout", choices=LAYOUTS, default="one_table")
    parser.add_argument("--peer-python", default=None,
                        help="interpreter with the `peer` extra (torch + "
                             "fbgemm-gpu-cpu): adds the FBGEMM peer")
    parser.add_argument("--output", default=None,
                        help="JSON path (default: benchmarks/results/"
                             "embedding_step[_criteo_like].json)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    parser.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                        help="also report A's speed relative to B as the "
                             "median (and quartiles) of per-round ratios: "
                             "two setups of nearly equal cost, compared "
                             "within rounds that saw the same machine load")
    args = parser.parse_args()
    criteo_like = args.layout == "criteo_like"
    if args.setups is None:
        args.setups = ["alpt", "alpt_stock", "alpt_unstacked",
                       "alpt_one_table", "float32_sgd"] if criteo_like else [
            "alpt", "alpt_stock", "alpt_packed", "alpt4_packed",
            "float32_sgd", "float32_adam"]
    known = CRITEO_LIKE_SETUPS if criteo_like else (
        *ALPT_SETUPS, "float32_sgd", "float32_adam")
    if args.pair:
        missing = sorted(set(args.pair) - set(args.setups))
        if missing:
            parser.error(f"--pair {args.pair}: {missing} not among --setups "
                         f"{args.setups}")
    unknown = sorted(set(args.setups) - set(known))
    if unknown:
        parser.error(f"--setups {unknown} not in {list(known)} for "
                     f"--layout {args.layout}")
    if args.output is None:
        args.output = default_output(
            "embedding_step_criteo_like" if criteo_like
            else "embedding_step")
    if args.tiny:
        args.rows, args.batch, args.steps, args.warmup = 2**12, 256, 3, 1
        args.rounds = 1
    sizes = criteo_like_sizes(args.features) if criteo_like else None
    if criteo_like:
        args.rows = sum(sizes)
        ids = np.random.default_rng(0).zipf(
            1.2, size=(args.batch, args.features)) % np.asarray(sizes)
    else:
        ids = workload_ids(args.batch, args.features, args.rows)
    # Memory bandwidth in the same run, before and after the setups.
    copy_size = 16 if args.tiny else 256
    bandwidth = [memory_copy_gb_per_s(copy_size)]
    results, peer = measure_all(args.setups, ids, args.rows, args.dim,
                                args.steps, args.warmup, args.rounds,
                                args.peer_python, sizes)
    bandwidth.append(memory_copy_gb_per_s(copy_size))
    # The baseline is the fastest TensorFlow float32 setup.
    float32 = [r for r in results if r["setup"].startswith("float32")]
    fastest = max(float32, key=lambda r: r["examples_per_second"],
                  default=None)
    unique = len(np.unique(ids + np.cumsum([0] + sizes[:-1]))) \
        if criteo_like else len(np.unique(ids))
    print(f"{f'{len(sizes)} tables, ' if criteo_like else ''}"
          f"V={args.rows} D={args.dim} batch={args.batch}x{args.features} "
          f"({unique} unique ids/step), "
          f"{'Keras 3' if compat.IS_KERAS_3 else 'tf_keras'}, "
          f"median of {args.steps * args.rounds} steps, setups "
          f"interleaved ({args.rounds} rounds of {args.steps}, each turn "
          "after 1 untimed step)")
    print(f"{'setup':<16}{'examples/s':>14}{'ms/step':>10}"
          f"{'vs fastest float32':>20}{'GB/s':>10}")
    step_bytes = alpt_step_bytes(int(np.prod(ids.shape)), int(unique),
                                 args.dim)
    for r in results:
        ratio = (r["examples_per_second"] / fastest["examples_per_second"]
                 if fastest else float("nan"))
        r["ratio_to_fastest_float32"] = ratio
        traffic = ""
        if r["setup"] in BYTES_MODEL_SETUPS:
            r["step_bytes"] = step_bytes
            moved = step_bytes["read"] + step_bytes["written"]
            r["achieved_gb_per_s"] = moved / r["median_step_seconds"] / 1e9
            traffic = f"{r['achieved_gb_per_s']:>10.2f}"
        print(f"{r['setup']:<16}{r['examples_per_second']:>14,.0f}"
              f"{1000 * r['median_step_seconds']:>10.1f}{ratio:>20.2f}"
              f"{traffic}")
    print(f"ALPT step moves at least {step_bytes['read'] / 1e6:.1f} MB read "
          f"+ {step_bytes['written'] / 1e6:.1f} MB written (GB/s column); "
          f"memory copy in this run: {bandwidth[0]:.1f} / "
          f"{bandwidth[1]:.1f} GB/s (before / after)")
    report = {
        "benchmark": "embedding_step", "config": vars(args),
        "fastest_float32": fastest["setup"] if fastest else None,
        "unique_ids_per_step": int(unique),
        "machine": machine_info(),
        # Whether the `alpt*` setups (but `*_stock`) ran the native kernels.
        "native_kernels": kernels.load() is not None,
        # A large array copy (read + write) before and after the setups.
        "memory_copy_gb_per_s": bandwidth,
        "results": results,
        "peer": peer,
    }
    if args.pair:
        by_setup = {r["setup"]: r for r in results}
        a, b = (np.asarray(by_setup[name]["round_median_seconds"])
                for name in args.pair)
        ratios = b / a  # A's speed relative to B's, per round
        quartiles = np.percentile(ratios, [25, 50, 75])
        report["pair"] = {"a": args.pair[0], "b": args.pair[1],
                          "round_ratios": ratios.tolist(),
                          "median": float(quartiles[1]),
                          "quartiles": [float(quartiles[0]),
                                        float(quartiles[2])]}
        print(f"{args.pair[0]} vs {args.pair[1]}: {quartiles[1]:.3f}x "
              f"(median of {len(ratios)} per-round ratios; quartiles "
              f"{quartiles[0]:.3f}-{quartiles[2]:.3f})")
    if peer:
        print(f"peer: torch {peer['torch']}, fbgemm_gpu {peer['fbgemm_gpu']}"
              f", {peer['threads']} threads; cannot train: "
              + (", ".join(f"{k} ({v})" for k, v in
                           peer["unsupported"].items()) or "-"))
    write_report(args.output, report)


if __name__ == "__main__":
    main()
