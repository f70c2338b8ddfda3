"""Where an ALPT embedding step spends its time, and what alternatives give.

The workload of `embedding_step.py` (V = 2^20 rows x 16, 8-bit, batch
4096 x 26 = 106,496 ids drawn as `zipf(1.2) % V`). Every piece is its own
`tf.function` on precomputed inputs, and the pieces take turns (interleaved
rounds) in one process:

- `full_step`: the Keras layer + `ALPTOptimizer` step (`embedding_step.py`'s
  `alpt` setup);
- `forward_backward`: lookup and row gradient only (no update);
- `apply`: `ALPTOptimizer.apply_gradients` alone on a precomputed gradient;
- the op chain of `apply`, piece by piece: `unique`, `segment_sum`
  (`unsorted_segment_sum` of the 106,496 row gradients), `row_math` (table
  optimizer, LSQ step-size rule, noise hash, quantization on the unique
  rows), `hash_noise` (the noise alone), `gather_rows` (codes, Δ and state
  of the unique rows), `scatter_writes` (codes, Δ, accumulators);
- the forward's pieces: `id_check`, `gather_dequantize`;
- alternatives: `sorted_segment_sum` (sort ids, then `segment_sum`, instead
  of `unique` + `unsorted_segment_sum`), `scatter_packed` (codes written as
  packed int32 words instead of int8), `raw_chain` (the whole update as one
  graph of stock ops without the Keras optimizer machinery), and a fused
  custom training kernel (`fused_op/alpt_row_update.cc`, built here with g++
  against TF's headers; it is not part of the library, whose training and
  serving use stock ops only): `fused_row_math` replaces `row_math`, and
  `fused_chain` is `raw_chain` with it. Its codes are compared with the
  stock ops' on the same inputs.

    python benchmarks/profile_step.py          # full (~2 min)
    python benchmarks/profile_step.py --tiny   # smoke run for CI

Prints a table (median ms per piece, share of `full_step`) and writes JSON
(default benchmarks/results/profile_step.json).
"""

import argparse
import hashlib
import os
import subprocess

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

import alpt_keras
from alpt_keras import ALPTEmbedding, ALPTOptimizer, compat, quantizers, update
from alpt_keras.storage import pack_codes
from alpt_keras.table import checked_ids

keras = compat.keras


def build_fused_op():
    """Compiles the fused kernel (cached by source hash); returns the op
    module, or None and the reason."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "fused_op", "alpt_row_update.cc")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read() + tf.__version__.encode())
    cache = os.path.join(os.path.expanduser("~"), ".cache", "alpt_keras",
                         "fused_op")
    library = os.path.join(cache, f"{digest.hexdigest()[:16]}.so")
    if not os.path.exists(library):
        os.makedirs(cache, exist_ok=True)
        command = (["g++", "-std=c++17", "-shared", "-fPIC", "-O2", "-w",
                    source, "-o", library + ".tmp"]
                   + tf.sysconfig.get_compile_flags()
                   + tf.sysconfig.get_link_flags())
        try:
            proc = subprocess.run(command, capture_output=True, text=True,
                                  timeout=600)
        except OSError as error:
            return None, f"g++ not available: {error}"
        if proc.returncode != 0:
            return None, "build failed: " + proc.stderr[-500:]
        os.replace(library + ".tmp", library)
    return tf.load_op_library(library), None


def build_pieces(rows, dim, ids_np, fused_op=None):
    layer = ALPTEmbedding(rows, dim, seed=0, name="table")
    optimizer = ALPTOptimizer(keras.optimizers.SGD())
    ids = tf.constant(ids_np)
    layer(ids[:1])
    optimizer.build(layer.trainable_variables)
    upstream = tf.constant(np.random.default_rng(1).normal(
        0, 1e-4, size=(*ids_np.shape, dim)).astype(np.float32))
    variables = layer.trainable_variables
    flat = tf.reshape(ids, [-1])
    flat_up = tf.reshape(upstream, [-1, dim])
    grad = tf.IndexedSlices(flat_up, flat, tf.constant([rows, dim],
                                                       tf.int64))
    unique_ids, positions = tf.unique(flat)
    sums = tf.math.unsorted_segment_sum(flat_up, positions,
                                        tf.shape(unique_ids)[0])
    table = alpt_keras.tables(layer)[0]
    codes_var = compat.tf_variable(table.codes)
    steps_var = compat.tf_variable(table.step_sizes)
    slots = optimizer.table_slots(table)
    acc_var = compat.tf_variable(slots["accumulator"])
    step_acc_var = compat.tf_variable(slots["step_size_accumulator"])
    packed_var = tf.Variable(tf.zeros([rows, dim * 8 // 32], tf.int32))
    table_rule = update.get_table_rule(optimizer.embedding_optimizer)
    step_size_rule = update.get_step_size_rule(optimizer.step_size_optimizer)
    step_size_hyper = optimizer.step_size_hyperparameters("row")

    def row_math(codes, step_size, acc, step_acc, g, uids):
        """The library's own pure step (`alpt_keras.update.table_step`)."""
        out = update.table_step(
            codes, step_size, g, {"accumulator": acc},
            {"step_size_accumulator": step_acc}, tf.constant(0, tf.int64),
            uids, table.spec, table_rule, optimizer.embedding_hyperparameters,
            step_size_rule, step_size_hyper)
        return (out.codes, out.step_size, out.state["accumulator"].increment,
                out.state["step_size_accumulator"].increment)

    def update_chain(math):
        """The whole table update as one graph of stock ops around
        `math` (the row arithmetic): dedup, sums, gathers, scatters."""

        @tf.function
        def chain():
            uids, pos = tf.unique(flat)
            g = tf.math.unsorted_segment_sum(flat_up, pos,
                                             tf.shape(uids)[0])
            c, s, i, j = math(
                tf.cast(tf.gather(codes_var, uids), tf.int32),
                tf.gather(steps_var, uids), tf.gather(acc_var, uids),
                tf.gather(step_acc_var, uids), g, uids)
            codes_var.scatter_update(tf.IndexedSlices(tf.cast(c, tf.int8),
                                                      uids))
            steps_var.scatter_update(tf.IndexedSlices(s, uids))
            acc_var.scatter_add(tf.IndexedSlices(i, uids))
            step_acc_var.scatter_add(tf.IndexedSlices(j, uids))
            return tf.constant(0)

        return chain

    pieces = {}

    @tf.function
    def full_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, training=True) * upstream)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return loss
    pieces["full_step"] = full_step

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, training=True) * upstream)
        return tape.gradient(loss, variables)[0].values
    pieces["forward_backward"] = forward_backward

    @tf.function
    def apply():
        optimizer.apply_gradients([(grad, variables[0])])
        return tf.constant(0)
    pieces["apply"] = apply

    @tf.function
    def id_check():
        return checked_ids(flat, rows, table.name)
    pieces["id_check"] = id_check

    @tf.function
    def gather_dequantize():
        return quantizers.dequantize(table.storage.read_rows(flat),
                                     table.read_step_sizes(flat))
    pieces["gather_dequantize"] = gather_dequantize

    @tf.function
    def unique():
        return tf.unique(flat)
    pieces["unique"] = unique

    @tf.function
    def segment_sum():
        return tf.math.unsorted_segment_sum(flat_up, positions,
                                            tf.shape(unique_ids)[0])
    pieces["segment_sum"] = segment_sum

    @tf.function
    def sorted_segment_sum():
        order = tf.argsort(flat, stable=True)
        sorted_ids = tf.gather(flat, order)
        starts = tf.concat([[True], sorted_ids[1:] != sorted_ids[:-1]], 0)
        segments = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        return tf.math.segment_sum(tf.gather(flat_up, order), segments)
    pieces["sorted_segment_sum"] = sorted_segment_sum

    @tf.function
    def gather_rows():
        return (table.storage.read_rows(unique_ids),
                table.read_step_sizes(unique_ids),
                tf.nn.embedding_lookup(acc_var, unique_ids),
                tf.nn.embedding_lookup(step_acc_var, unique_ids))
    pieces["gather_rows"] = gather_rows
    gathered = gather_rows()

    @tf.function
    def row_math_piece():
        return row_math(*gathered, sums, unique_ids)
    pieces["row_math"] = row_math_piece
    new_codes, new_step, inc, step_inc = row_math_piece()

    @tf.function
    def hash_noise():
        spec = table.spec.tables[0]  # the one logical table
        return quantizers.hash_uniform(spec.seed, spec.salt,
                                       tf.constant(0, tf.int64), unique_ids,
                                       dim)
    pieces["hash_noise"] = hash_noise

    @tf.function
    def scatter_writes():
        codes_var.scatter_update(tf.IndexedSlices(
            tf.cast(new_codes, tf.int8), unique_ids))
        steps_var.scatter_update(tf.IndexedSlices(new_step, unique_ids))
        acc_var.scatter_add(tf.IndexedSlices(inc, unique_ids))
        step_acc_var.scatter_add(tf.IndexedSlices(step_inc, unique_ids))
        return tf.constant(0)
    pieces["scatter_writes"] = scatter_writes

    @tf.function
    def scatter_packed():
        packed_var.scatter_update(tf.IndexedSlices(
            pack_codes(new_codes, 8), unique_ids))
        return tf.constant(0)
    pieces["scatter_packed"] = scatter_packed

    pieces["raw_chain"] = update_chain(row_math)
    check = {}
    if fused_op is None:
        return pieces, int(unique_ids.shape[0]), check

    def fused_math(codes, step_size, acc, step_acc, g, uids):
        spec = table.spec.tables[0]  # the one logical table
        key = quantizers.hash_key(spec.seed, spec.salt, 0)
        c, s, i = fused_op.alpt_row_update(
            codes, step_size, acc, step_acc, g, uids, key, num_bits=8,
            learning_rate=0.01, step_size_learning_rate=0.03, epsilon=1e-8,
            step_size_epsilon=1e-12, min_step_size=spec.min_step_size)
        return c, s, i, i

    @tf.function
    def fused_row_math():
        return fused_math(*gathered, sums, unique_ids)
    pieces["fused_row_math"] = fused_row_math
    fused_codes = fused_row_math()[0]
    check["fused_codes_differ"] = int(tf.reduce_sum(tf.cast(
        fused_codes != new_codes, tf.int32)))
    check["codes_compared"] = int(tf.size(new_codes))

    pieces["fused_chain"] = update_chain(fused_math)
    return pieces, int(unique_ids.shape[0]), check


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-fused", action="store_true",
                        help="skip building the fused custom kernel")
    parser.add_argument("--output", default=default_output("profile_step"))
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    args = parser.parse_args()
    if args.tiny:
        args.rows, args.batch, args.steps, args.rounds = 2**12, 256, 2, 1
        args.warmup = 1
    ids = workload_ids(args.batch, args.features, args.rows)
    fused_op, fused_error = (None, "--no-fused") if args.no_fused else \
        build_fused_op()
    pieces, unique, check = build_pieces(args.rows, args.dim, ids, fused_op)
    medians = {name: float(np.median(t)) for name, t in interleaved_times(
        pieces, args.steps, args.warmup, args.rounds).items()}
    full = medians["full_step"]
    print(f"V={args.rows} D={args.dim} batch={args.batch}x{args.features} "
          f"({unique} unique ids), "
          f"{'Keras 3' if compat.IS_KERAS_3 else 'tf_keras'}, median of "
          f"{args.steps * args.rounds} runs per piece, interleaved")
    print(f"{'piece':<20}{'ms':>9}{'of full step':>14}")
    results = []
    for name, seconds in medians.items():
        share = seconds / full
        results.append({"piece": name, "median_seconds": seconds,
                        "share_of_full_step": share})
        print(f"{name:<20}{1000 * seconds:>9.2f}{share:>13.0%}")
    overhead = medians["apply"] - medians["raw_chain"]
    print(f"Keras/wrapper overhead of apply (apply - raw_chain): "
          f"{1000 * overhead:.2f} ms")
    if fused_op is None:
        print(f"fused kernel not measured: {fused_error}")
    else:
        print(f"fused kernel: {check['fused_codes_differ']} of "
              f"{check['codes_compared']} codes differ from the stock ops'")
    write_report(args.output, {
        "benchmark": "profile_step", "config": vars(args),
        "unique_ids_per_step": unique, "machine": machine_info(),
        "results": results, "apply_overhead_seconds": overhead,
        "fused_kernel": check if fused_op is not None else
        {"error": fused_error}})


if __name__ == "__main__":
    main()
