"""Training memory: ALPT tables and their optimizer state vs float32 + Adam.

One table of V rows x 16 (V = 2^22 by default, issue 6), trained for a few
steps on 4096 x 26 zipf(1.2) ids. Each setup runs in its own process, so
its peak RSS is its own:
- `bytes`: the table (codes + Δ, or float32 weights) plus its row-indexed
  optimizer state, summed from the variables;
- `peak_rss` / `rss_growth`: the process peak (ru_maxrss), and the peak
  minus the RSS after importing TensorFlow (what the setup itself costs,
  including transient copies while building and training).
The ratios divide by `float32_adam` (keras.layers.Embedding + Keras Adam,
whose two moments are `[V, D]`), measured in the same run.

    python benchmarks/memory.py            # full, V = 2^22 (~2 min)
    python benchmarks/memory.py --tiny     # smoke run for CI (4 setups)

Prints a table and writes JSON (default benchmarks/results/memory.json).
"""

import argparse
import json
import os
import resource
import subprocess
import sys

# name -> (num_bits, storage, table optimizer); None = float32 layer.
SETUPS = {
    "float32_adam": None,
    "float32_sgd": None,
    "alpt8_rowwise_adagrad": (8, "int8", "rowwise_adagrad"),
    "alpt8_packed_rowwise_adagrad": (8, "packed", "rowwise_adagrad"),
    "alpt8_sgd": (8, "int8", "sgd"),
    "alpt8_adagrad": (8, "int8", "adagrad"),
    "alpt8_lazy_adam": (8, "int8", "lazy_adam"),
    "alpt4_packed_rowwise_adagrad": (4, "packed", "rowwise_adagrad"),
    "alpt2_packed_rowwise_adagrad": (2, "packed", "rowwise_adagrad"),
    "alpt4_packed_lazy_adam": (4, "packed", "lazy_adam"),
}
TINY_SETUPS = ("float32_adam", "alpt8_rowwise_adagrad",
               "alpt4_packed_rowwise_adagrad", "alpt8_lazy_adam")
DIM, BATCH, FIELDS = 16, 4096, 26


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name, rows, steps):
    """Builds and trains one setup; prints its JSON line."""
    import numpy as np
    import tensorflow as tf

    from alpt_keras import ALPTEmbedding, ALPTOptimizer, compat
    from alpt_keras.table import find_table

    keras = compat.keras
    baseline = _rss_bytes()
    setup = SETUPS[name]
    if setup is None:
        layer = keras.layers.Embedding(rows, DIM, name="table")
        optimizer = (keras.optimizers.Adam(1e-3) if name == "float32_adam"
                     else keras.optimizers.SGD(0.01))
    else:
        bits, storage, table_optimizer = setup
        layer = ALPTEmbedding(rows, DIM, num_bits=bits, storage=storage,
                              seed=0, name="table")
        optimizer = ALPTOptimizer(keras.optimizers.SGD(),
                                  embedding_optimizer=table_optimizer)
    ids = tf.constant(np.random.default_rng(0).zipf(
        1.2, size=(BATCH, FIELDS)) % rows)
    layer(ids[:1])
    optimizer.build(layer.trainable_variables)
    kwargs = {} if setup is None else {"training": True}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, **kwargs)) * 1e-4
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables,
                                      strict=True))

    for _ in range(steps):
        step()

    def nbytes(v):
        return int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size

    table = sum(nbytes(v) for v in layer.weights
                if find_table(v) is None)  # not the 4-byte carrier
    # Row-indexed state only (moments, accumulators): the few scalar
    # counters differ between Keras flavours and do not scale.
    state = sum(nbytes(v) for v in optimizer.variables
                if len(v.shape) and v.shape[0] == rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"setup": name, "table_bytes": table,
                      "state_bytes": state, "bytes": table + state,
                      "peak_rss": peak, "rss_growth": peak - baseline}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    rows = args.rows or (2**12 if args.tiny else 2**22)
    if args.child:
        return child(args.child, rows, args.steps)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _report import default_output, machine_info, write_report

    results = {}
    for name in TINY_SETUPS if args.tiny else SETUPS:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", name,
             "--rows", str(rows), "--steps", str(args.steps)],
            capture_output=True, text=True, timeout=900,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = results["float32_adam"]
    print(f"\none table {rows:,} x {DIM}, {args.steps} steps of "
          f"{BATCH} x {FIELDS} zipf(1.2) ids; each setup in its own "
          "process\n")
    print(f"{'setup':30} {'table+state B':>15} {'ratio':>7} "
          f"{'RSS growth MB':>14} {'ratio':>7}")
    for name, r in results.items():
        r["bytes_ratio"] = r["bytes"] / reference["bytes"]
        r["rss_growth_ratio"] = r["rss_growth"] / reference["rss_growth"]
        print(f"{name:30} {r['bytes']:>15,} {r['bytes_ratio']:>7.3f} "
              f"{r['rss_growth'] / 2**20:>14.1f} "
              f"{r['rss_growth_ratio']:>7.3f}")
    write_report(args.output or default_output("memory"), {
        "benchmark": "memory", "machine": machine_info(), "rows": rows,
        "dim": DIM, "steps": args.steps, "baseline": "float32_adam",
        "results": results})


if __name__ == "__main__":
    main()
