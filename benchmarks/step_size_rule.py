"""Which step-size rule should ALPT use? Accuracy and conditioning.

Part A, for each bit width, trains the quick-start DNN on the synthetic data
with float32, LPT (Δ fixed) and ALPT under each step-size rule, and reports
test AUC/logloss, how far Δ moved (median |Δ_end/Δ_0 - 1|), and the
sensitivity to float rounding: the share of codes that differ from a rerun
whose dense learning rate is perturbed by one part in a million.

Part B trains with 2 replicas (MirroredStrategy over two logical CPUs) and
with 1, on the same global batches, and reports the share of codes that
differ after a number of steps.

    python benchmarks/step_size_rule.py            # full run (~3 min)
    python benchmarks/step_size_rule.py --tiny     # smoke run for CI

Prints a table and writes JSON (default benchmarks/results/).
"""

import argparse
import contextlib
import time

import numpy as np
import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

from _report import default_output, machine_info, write_report  # noqa: E402

import alpt_keras  # noqa: E402
from alpt_keras import ALPTOptimizer, compat  # noqa: E402
from alpt_keras.models.dnn import build_dnn  # noqa: E402
from alpt_keras.models.synthetic import make_synthetic_ctr  # noqa: E402

keras = compat.keras
FIELDS, VOCAB, BATCH = 4, 300, 256


def _codes_and_steps(model):
    (table,) = alpt_keras.tables(model)
    values = []
    for variable in (table.codes, table.step_sizes):
        tf_var = compat.tf_variable(variable)
        first = getattr(tf_var, "values", (tf_var,))[0]
        values.append(np.array(first.numpy()))
    return values[0].astype(np.int64), values[1]


def _train(kind, rule, bits, train, epochs, dense_lr=5e-3, strategy=None):
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        tf.keras.utils.set_random_seed(0)
        model = build_dnn(FIELDS, VOCAB, embedding=kind, num_bits=bits,
                          seed=0, hidden_units=(32,))
        inner = keras.optimizers.Adam(dense_lr)
        optimizer = inner if kind == "float32" else ALPTOptimizer(
            inner, step_size_optimizer=rule)
        model.compile(optimizer, "binary_crossentropy",
                      metrics=[keras.metrics.AUC(name="auc")])
    start = None if kind == "float32" else _codes_and_steps(model)[1]
    model.fit(train.ids, train.labels, batch_size=BATCH, epochs=epochs,
              shuffle=False, verbose=0)
    return model, start


def part_a(args, train, test):
    rows = []
    for bits in args.bits:
        variants = [("float32", None), ("lpt", None)] + [
            ("alpt", rule) for rule in args.rules]
        for kind, rule in variants:
            if kind == "float32" and bits != args.bits[0]:
                continue
            model, start = _train(kind, rule or "rowwise", bits, train,
                                  args.epochs)
            loss, auc = model.evaluate(test.ids, test.labels,
                                       batch_size=4096, verbose=0)
            row = {"bits": None if kind == "float32" else bits,
                   "embedding": kind, "step_size_rule": rule,
                   "test_auc": float(auc), "test_logloss": float(loss)}
            if kind != "float32":
                codes, steps = _codes_and_steps(model)
                row["median_step_size_change"] = float(
                    np.median(np.abs(steps / start - 1)))
                other, _ = _train(kind, rule or "rowwise", bits, train,
                                  args.epochs, dense_lr=5e-3 * (1 + 1e-6))
                other_codes, _ = _codes_and_steps(other)
                row["codes_changed_by_1e-6_perturbation"] = float(
                    np.mean(codes != other_codes))
            rows.append(row)
            print(_format_a(row), flush=True)
    return rows


def part_b(args, strategy):
    rows = []
    for rule in args.rules:
        for bits in args.replica_bits:
            for steps in args.horizons:
                data = make_synthetic_ctr(steps * BATCH, FIELDS, VOCAB,
                                          seed=1)
                two, _ = _train("alpt", rule, bits, data, 1,
                                strategy=strategy)
                one, _ = _train("alpt", rule, bits, data, 1)
                (c2, s2), (c1, s1) = _codes_and_steps(two), \
                    _codes_and_steps(one)
                row = {"step_size_rule": rule, "bits": bits, "steps": steps,
                       "codes_differ": float(np.mean(c2 != c1)),
                       "max_code_difference": int(np.abs(c2 - c1).max()),
                       "max_step_size_rel_difference": float(
                           np.max(np.abs(s2 / s1 - 1)))}
                rows.append(row)
                print(f"  2 vs 1 replicas  rule={rule:<8} bits={bits} "
                      f"steps={steps:<4} codes differ "
                      f"{row['codes_differ']:.4f} (max "
                      f"{row['max_code_difference']}), Δ rel "
                      f"{row['max_step_size_rel_difference']:.1e}",
                      flush=True)
    return rows


def _format_a(row):
    name = row["embedding"] + (f"/{row['step_size_rule']}"
                               if row["step_size_rule"] else "")
    bits = "-" if row["bits"] is None else row["bits"]
    extra = ""
    if "median_step_size_change" in row:
        extra = (f"{row['median_step_size_change']:>10.3f}"
                 f"{row['codes_changed_by_1e-6_perturbation']:>12.4f}")
    return (f"  {bits!s:>4} {name:<14}{row['test_auc']:>9.4f}"
            f"{row['test_logloss']:>9.4f}{extra}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-examples", type=int, default=40_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--rules", nargs="+", default=["rowwise", "adam"])
    parser.add_argument("--replica-bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--horizons", type=int, nargs="+",
                        default=[5, 10, 20, 40, 80])
    parser.add_argument("--output", default=default_output("step_size_rule"))
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    args = parser.parse_args()
    if args.tiny:
        args.num_examples, args.epochs, args.bits = 4_000, 1, [4]
        args.replica_bits, args.horizons = [8], [2]
    data = make_synthetic_ctr(args.num_examples, FIELDS, VOCAB, seed=0)
    train, test = data.split(0.75)
    started = time.time()
    print("Part A: accuracy and conditioning "
          f"({args.num_examples} examples, {args.epochs} epochs)")
    print(f"  {'bits':>4} {'embedding':<14}{'AUC':>9}{'logloss':>9}"
          f"{'|dΔ/Δ|':>10}{'perturbed':>12}")
    accuracy = part_a(args, train, test)
    print("Part B: 2 replicas vs 1 on the same global batches")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    replicas = part_b(args, strategy)
    report = {
        "benchmark": "step_size_rule",
        "config": vars(args),
        "machine": machine_info(),
        "seconds": time.time() - started,
        "accuracy": accuracy,
        "replicas": replicas,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
