"""Serving cost: export size and latency, ALPT vs float32 exports.

Exports the same CTR model (DNN 256-128 with BatchNorm, as
`alpt-train --batch-norm`) with float32, ALPT 8-bit (int8 storage) and
ALPT 4-bit (packed) tables (stacked into one group, the default of
`models.FeatureEmbedding`), and
ALPT 8-bit as 26 separate tables (`alpt8_unstacked`), for two layouts:
- `criteo_like`: 26 tables of 10 to 31,623 rows x 16 (alpt-train's
  default data, 114,732 rows);
- `one_big_table`: one table of 2^20 rows x 16 and 26 id features
  sharing it.
Latency is measured the way TF Serving runs a SavedModel: loaded into a TF1
`Session` (tags {"serve"}), one `Session.run` of the `serving_default`
signature per request; p50/p99 over many requests at batch 1 and 256,
all exports interleaved in one process so machine noise hits each alike.

    python benchmarks/serving.py           # full (~2 min)
    python benchmarks/serving.py --tiny    # smoke run for CI

Prints a table and writes JSON (default benchmarks/results/serving.json).
"""

import argparse
import tempfile
import time

import numpy as np
import tensorflow as tf
from _report import default_output, machine_info, write_report

from alpt_keras.export import export_for_serving, export_size_report
from alpt_keras.models import FeatureConfig, TableConfig, build_ctr_model

FIELDS, DIM = 26, 16
VARIANTS = {"float32": dict(kind="float32"),
            "alpt8": dict(kind="alpt", num_bits=8),
            "alpt4_packed": dict(kind="alpt", num_bits=4, storage="packed"),
            "alpt8_unstacked": dict(kind="alpt", num_bits=8)}


def _features(layout, variant, tiny):
    table = VARIANTS[variant]
    if layout == "one_big_table":
        rows = 2**12 if tiny else 2**20
        shared = TableConfig("ids", rows, DIM, **table)
        return [FeatureConfig(f"C{i + 1}", shared) for i in range(FIELDS)]
    top = 3.0 if tiny else 4.5
    sizes = [int(round(10 ** e)) for e in np.linspace(1.0, top, FIELDS)]
    return [FeatureConfig(f"C{i + 1}", TableConfig(
        f"C{i + 1}", size, DIM, seed=i, **table))
        for i, size in enumerate(sizes)]


def _requests(features, batch, count, seed):
    rng = np.random.default_rng(seed)
    return [{f.name: rng.integers(0, f.table.vocabulary_size, batch)
             for f in features} for _ in range(count)]


class _Session:
    """A SavedModel loaded as TF Serving loads it."""

    def __init__(self, version_dir):
        self.session = tf.compat.v1.Session(graph=tf.Graph())
        meta = tf.compat.v1.saved_model.loader.load(
            self.session, ["serve"], version_dir)
        signature = meta.signature_def["serving_default"]
        self.inputs = {n: t.name for n, t in signature.inputs.items()}
        self.output = signature.outputs["probability"].name

    def run(self, request):
        return self.session.run(self.output, {
            self.inputs[name]: value for name, value in request.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    count = args.requests or (20 if args.tiny else 500)
    hidden = (16,) if args.tiny else (256, 128)
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for layout in ("criteo_like", "one_big_table"):
            sessions = {}
            for variant in VARIANTS:
                if layout == "one_big_table" and \
                        variant.endswith("_unstacked"):
                    continue  # one table: nothing to stack
                features = _features(layout, variant, args.tiny)
                model = build_ctr_model(
                    features, model="dnn", hidden_units=hidden,
                    stack_tables=not variant.endswith("_unstacked"))
                version_dir = export_for_serving(
                    model, base, f"{layout}_{variant}")
                size = export_size_report(version_dir)
                tables = sum(t["bytes"] for t in size["tables"].values())
                results[(layout, variant)] = {
                    "layout": layout, "variant": variant,
                    "export_bytes": size["total_bytes"],
                    "table_bytes": tables}
                sessions[variant] = _Session(version_dir)
                del model
            for batch in (1, 256):
                requests = _requests(features, batch, count, seed=batch)
                times = {v: [] for v in sessions}
                for session in sessions.values():  # warm-up
                    for request in requests[:5]:
                        session.run(request)
                for request in requests:  # interleaved
                    for variant, session in sessions.items():
                        start = time.perf_counter()
                        session.run(request)
                        times[variant].append(time.perf_counter() - start)
                for variant, seconds in times.items():
                    ms = 1e3 * np.asarray(seconds)
                    results[(layout, variant)][f"batch{batch}"] = {
                        "p50_ms": float(np.percentile(ms, 50)),
                        "p99_ms": float(np.percentile(ms, 99))}
    rows = list(results.values())
    for r in rows:
        ref = results[(r["layout"], "float32")]
        r["export_ratio"] = r["export_bytes"] / ref["export_bytes"]
        r["table_ratio"] = r["table_bytes"] / ref["table_bytes"]
        for batch in ("batch1", "batch256"):
            for q in ("p50_ms", "p99_ms"):
                r[batch][q.replace("_ms", "_ratio")] = (
                    r[batch][q] / ref[batch][q])
    print(f"\n{count} requests per batch size, TF1 Session path, exports "
          "interleaved in one process\n")
    print(f"{'layout':14} {'variant':16} {'export MB':>9} {'ratio':>6} "
          f"{'tables':>6} {'b1 p50 ms':>9} {'p99':>6} {'ratio':>6} "
          f"{'b256 p50':>8} {'p99':>6} {'ratio':>6}")
    for r in rows:
        b1, b256 = r["batch1"], r["batch256"]
        print(f"{r['layout']:14} {r['variant']:16} "
              f"{r['export_bytes'] / 1e6:>9.2f} {r['export_ratio']:>6.3f} "
              f"{r['table_ratio']:>6.3f} {b1['p50_ms']:>9.3f} "
              f"{b1['p99_ms']:>6.3f} {b1['p50_ratio']:>6.2f} "
              f"{b256['p50_ms']:>8.3f} {b256['p99_ms']:>6.3f} "
              f"{b256['p50_ratio']:>6.2f}")
    print("\nratios: to the float32 export of the same layout (p50)")
    write_report(args.output or default_output("serving"), {
        "benchmark": "serving", "machine": machine_info(),
        "requests": count, "hidden_units": list(hidden), "results": rows})


if __name__ == "__main__":
    main()
