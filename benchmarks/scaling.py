"""Scaling: embedding step time and memory as the table grows.

The embedding-only step of `embedding_step.py` (one table x 16, batch
4096 x 26 ids drawn as `zipf(1.2) % V`) at V = 2^16 ... 2^24 rows. At each
size the setups take turns in the same process (ratios are comparable
within a size). ALPT's cost must follow the rows touched per batch (about
the same at every V here), not the table size; Keras Adam's dense moment
update is the counterexample that grows with V. Memory is the exact bytes
of the table and its optimizer state at each size.

    python benchmarks/scaling.py            # full (~6 min)
    python benchmarks/scaling.py --tiny     # smoke run for CI

Prints a table and writes JSON (default benchmarks/results/scaling.json).
"""

import argparse
import logging

import numpy as np
import tensorflow as tf
from _report import (
    add_workload_arguments,
    default_output,
    machine_info,
    workload_ids,
    write_report,
)
from embedding_step import measure_all

from alpt_keras import compat

SETUPS = ("alpt", "float32_sgd", "float32_adam")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2-rows", type=int, nargs="+",
                        default=[16, 18, 20, 22, 24])
    add_workload_arguments(parser, rows=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS),
                        choices=SETUPS)
    parser.add_argument("--output", default=default_output("scaling"))
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    args = parser.parse_args()
    tf.get_logger().setLevel(logging.ERROR)  # one step function per size
    if args.tiny:
        args.log2_rows, args.batch = [10, 12], 256
        args.steps, args.rounds, args.warmup = 2, 1, 1
    results = []
    print(f"D={args.dim} batch={args.batch}x{args.features}, "
          f"{'Keras 3' if compat.IS_KERAS_3 else 'tf_keras'}, median of "
          f"{args.steps * args.rounds} steps per setup and size")
    print(f"{'rows':>10}{'unique ids':>11}" + "".join(
        f"{s + ' ex/s':>20}" for s in args.setups) + "".join(
        f"{s + ' MB':>18}" for s in args.setups))
    for log2 in args.log2_rows:
        rows = 2**log2
        ids = workload_ids(args.batch, args.features, rows)
        measured, _ = measure_all(args.setups, ids, rows, args.dim,
                                  args.steps, args.warmup, args.rounds)
        row = {"rows": rows, "unique_ids_per_step": int(len(np.unique(ids))),
               "setups": {}}
        for r in measured:
            row["setups"][r["setup"]] = r
        results.append(row)
        print(f"{rows:>10}{row['unique_ids_per_step']:>11}" + "".join(
            f"{row['setups'][s]['examples_per_second']:>20,.0f}"
            for s in args.setups) + "".join(
            f"{row['setups'][s]['table_and_state_bytes'] / 2**20:>18,.1f}"
            for s in args.setups), flush=True)
    # Throughput at the largest size relative to the smallest, per setup.
    first, last = results[0], results[-1]
    growth = {s: last["setups"][s]["median_step_seconds"]
              / first["setups"][s]["median_step_seconds"]
              for s in args.setups}
    print("step time at the largest size / at the smallest: " + ", ".join(
        f"{s} {g:.2f}x" for s, g in growth.items()))
    write_report(args.output, {
        "benchmark": "scaling", "config": vars(args),
        "machine": machine_info(), "results": results,
        "step_time_growth": growth})


if __name__ == "__main__":
    main()
