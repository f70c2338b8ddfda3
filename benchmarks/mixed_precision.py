"""Mixed precision on the main job: training time and test AUC against
float32 compute.

Runs `alpt-train` (the default job: 26 criteo-like fields, 500k synthetic
examples, DNN, one epoch) once per setup and round, each in its own
process (a dtype policy is process-wide):

- `alpt8` / `float32` tables (`--embedding alpt|float32`),
- compute in float32 (`--mixed-precision none`), `bfloat16` or `float16`
  (the latter with a `LossScaleOptimizer` around `ALPTOptimizer`).

Round `r` runs every setup with `--seed r`, in turn, so drifting machine
load hits all of them alike and each mixed setup is compared with its
float32-compute twin of the same round and seed: the ratios are medians of
those per-round ratios, the AUC/logloss are means over the rounds (seeds).
ALPT setups are also compared with float32 tables at the same compute
precision (`time_ratio_to_float32_tables`: the main job's ALPT-vs-float32
training time).

    python benchmarks/mixed_precision.py           # full (~8 min)
    python benchmarks/mixed_precision.py --tiny    # smoke run for CI

Prints a table and writes JSON (default
benchmarks/results/mixed_precision.json).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _report import default_output, machine_info, write_report

SETUPS = {
    "alpt8": ("alpt", "none"),
    "alpt8_bfloat16": ("alpt", "bfloat16"),
    "alpt8_float16": ("alpt", "float16"),
    "float32": ("float32", "none"),
    "float32_bfloat16": ("float32", "bfloat16"),
}


def baseline(setup):
    """The float32-compute twin of `setup` (same tables)."""
    return "alpt8" if setup.startswith("alpt8") else "float32"


def run_job(setup, seed, workdir, extra):
    """One `alpt-train` process; returns its report.json."""
    embedding, precision = SETUPS[setup]
    out = os.path.join(workdir, f"{setup}-{seed}")
    command = [sys.executable, "-m", "alpt_keras.cli.train",
               "--embedding", embedding, "--mixed-precision", precision,
               "--seed", str(seed), "--output-dir", out, "--verbose", "0",
               *extra]
    proc = subprocess.run(command, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def summarise(runs):
    """`runs`: setup -> list of (seed, report), one per round."""
    rows = []
    for setup, reports in runs.items():
        twin = dict(runs[baseline(setup)])
        ratios = [r["train_seconds"] / twin[seed]["train_seconds"]
                  for seed, r in reports]
        aucs = [r["metrics"]["test_auc"] for _, r in reports]
        losses = [r["metrics"]["test_logloss"] for _, r in reports]
        deltas = [r["metrics"]["test_auc"] - twin[seed]["metrics"]["test_auc"]
                  for seed, r in reports]
        # ALPT against float32 tables at the same compute precision (the
        # main job's ALPT-vs-float32 training time), when both ran.
        tables_twin = setup.replace("alpt8", "float32", 1)
        table_ratio = None
        if setup.startswith("alpt8") and tables_twin in runs:
            other = dict(runs[tables_twin])
            table_ratio = statistics.median(
                r["train_seconds"] / other[seed]["train_seconds"]
                for seed, r in reports)
        rows.append({
            "setup": setup,
            "time_ratio_to_float32_tables": table_ratio,
            "embedding": SETUPS[setup][0],
            "mixed_precision": SETUPS[setup][1],
            "baseline": baseline(setup),
            "train_seconds": [r["train_seconds"] for _, r in reports],
            "train_seconds_median": statistics.median(
                r["train_seconds"] for _, r in reports),
            "time_ratio_to_float32_compute": statistics.median(ratios),
            "time_ratios": ratios,
            "test_auc": aucs,
            "test_auc_mean": statistics.fmean(aucs),
            "auc_minus_float32_compute_mean": statistics.fmean(deltas),
            "test_logloss_mean": statistics.fmean(losses),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS),
                        default=list(SETUPS))
    parser.add_argument("--tiny", action="store_true",
                        help="2,000 examples, one round (CI smoke run).")
    parser.add_argument("--output", default=default_output("mixed_precision"))
    args = parser.parse_args(argv)
    setups = list(dict.fromkeys(
        [baseline(s) for s in args.setups] + list(args.setups)))
    extra = ["--num-examples", "2000", "--batch-size", "256"] \
        if args.tiny else []
    rounds = 1 if args.tiny else args.rounds
    runs = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="alpt-mixed-") as workdir:
        for seed in range(rounds):
            for setup in setups:
                report = run_job(setup, seed, workdir, extra)
                runs[setup].append((seed, report))
                print(f"round {seed} {setup:18s} "
                      f"{report['train_seconds']:7.2f} s  AUC "
                      f"{report['metrics']['test_auc']:.4f}", flush=True)
    rows = summarise(runs)
    print(f"\n{'setup':18s} {'train s':>8s} {'vs f32 compute':>15s} "
          f"{'vs f32 tables':>14s} "
          f"{'AUC':>7s} {'ΔAUC':>8s} {'logloss':>8s}")
    for r in rows:
        tables = r["time_ratio_to_float32_tables"]
        tables = f"{tables:13.2f}x" if tables is not None else f"{'-':>14s}"
        print(f"{r['setup']:18s} {r['train_seconds_median']:8.2f} "
              f"{r['time_ratio_to_float32_compute']:14.2f}x {tables} "
              f"{r['test_auc_mean']:7.4f} "
              f"{r['auc_minus_float32_compute_mean']:+8.4f} "
              f"{r['test_logloss_mean']:8.4f}")
    write_report(args.output, {
        "benchmark": "mixed_precision",
        "machine": machine_info(),
        "job": "alpt-train " + " ".join(extra) if extra else "alpt-train",
        "rounds": rounds,
        "results": rows,
    })


if __name__ == "__main__":
    main()
