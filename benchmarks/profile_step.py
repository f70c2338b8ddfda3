"""Where an ALPT embedding step spends its time, native kernels and stock ops.

The workload of `embedding_step.py` (V = 2^20 rows x 16, 8-bit, batch
4096 x 26 = 106,496 ids drawn as `zipf(1.2) % V`). Every piece is its own
`tf.function` on precomputed inputs, and the pieces take turns (interleaved
rounds) in one process:

- `full_step`: the Keras layer + `ALPTOptimizer` step with the native
  kernels (`embedding_step.py`'s `alpt` setup); `full_step_stock`: the same
  with `kernels="stock"`;
- `forward_backward`, `forward_backward_stock`: lookup and row gradient
  only (no update), native and stock;
- `apply`, `apply_stock`: `ALPTOptimizer.apply_gradients` alone on a
  precomputed gradient, native and stock;
- the forward's pieces: `id_check`, `gather_dequantize` (stock) and
  `native_gather_dequantize` (`AlptGatherDequantize`);
- the native update's pieces: `native_unique_segment_sum` (dedup + row
  gradient sums, `AlptUniqueSegmentSum`) and `native_table_step` (read,
  row-wise Adagrad, LSQ, Δ rule, noise, quantize, write in place,
  `AlptTableStep`), and `native_chain`, both in one graph;
- the stock update's pieces: `unique`, `segment_sum`
  (`unsorted_segment_sum` of the 106,496 row gradients), `gather_rows`
  (codes, Δ and state of the unique rows), `row_math` (the library's pure
  `update.table_step`), `hash_noise` (its noise alone), `scatter_writes`
  (codes, Δ, accumulators), and `raw_chain`, the whole stock update as one
  graph without the Keras optimizer machinery.

    python benchmarks/profile_step.py          # full (~2 min)
    python benchmarks/profile_step.py --tiny   # smoke run for CI

Prints a table (median ms per piece, share of `full_step`) and writes JSON
(default benchmarks/results/profile_step.json). Without a compiler the
native pieces are left out (the report says why).
"""

import argparse

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
from alpt_keras import (
    ALPTEmbedding,
    ALPTOptimizer,
    compat,
    kernels,
    quantizers,
    update,
)
from alpt_keras.table import checked_ids

keras = compat.keras


def _table(rows, dim, kernels_mode, ids):
    layer = ALPTEmbedding(rows, dim, seed=0, name=f"table_{kernels_mode}")
    optimizer = ALPTOptimizer(keras.optimizers.SGD(), kernels=kernels_mode)
    layer(ids[:1])
    optimizer.build(layer.trainable_variables)
    return layer, optimizer


def build_pieces(rows, dim, ids_np, library=None):
    """name -> `tf.function` of no arguments, and the unique ids per
    step. `library` is the native kernels' module (`None`: stock pieces
    only)."""
    ids = tf.constant(ids_np)
    upstream = tf.constant(np.random.default_rng(1).normal(
        0, 1e-4, size=(*ids_np.shape, dim)).astype(np.float32))
    flat = tf.reshape(ids, [-1])
    flat_up = tf.reshape(upstream, [-1, dim])
    grad = tf.IndexedSlices(flat_up, flat, tf.constant([rows, dim],
                                                       tf.int64))
    unique_ids, positions = tf.unique(flat)
    sums = tf.math.unsorted_segment_sum(flat_up, positions,
                                        tf.shape(unique_ids)[0])
    layer, optimizer = _table(rows, dim, "stock", ids)
    table = alpt_keras.tables(layer)[0]
    codes_var = compat.tf_variable(table.codes)
    steps_var = compat.tf_variable(table.step_sizes)
    slots = optimizer.table_slots(table)
    acc_var = compat.tf_variable(slots["accumulator"])
    step_acc_var = compat.tf_variable(slots["step_size_accumulator"])
    config = optimizer.update_config
    step_size_hyper = optimizer.step_size_hyperparameters("row")
    step = tf.constant(0, tf.int64)

    def row_math(codes, step_size, acc, step_acc, g, uids):
        """The library's own pure step (`alpt_keras.update.table_step`)."""
        out = update.table_step(
            codes, step_size, g, {"accumulator": acc},
            {"step_size_accumulator": step_acc}, step, uids, table.spec,
            config.table_rule, config.embedding_hyperparameters,
            config.step_size_rule, step_size_hyper)
        return (out.codes, out.step_size, out.state["accumulator"].increment,
                out.state["step_size_accumulator"].increment)

    pieces = {}

    def full(step_layer, step_optimizer):
        variables = step_layer.trainable_variables

        @tf.function
        def full_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(step_layer(ids, training=True)
                                     * upstream)
            grads = tape.gradient(loss, variables)
            step_optimizer.apply_gradients(zip(grads, variables,
                                               strict=True))
            return loss
        return full_step

    def apply_of(apply_layer, apply_optimizer):
        @tf.function
        def apply():
            apply_optimizer.apply_gradients(
                [(grad, apply_layer.trainable_variables[0])])
            return tf.constant(0)
        return apply

    if library is not None:
        native_layer, native_optimizer = _table(rows, dim, "native", ids)
        pieces["full_step"] = full(native_layer, native_optimizer)
        pieces["full_step_stock"] = full(layer, optimizer)
    else:
        pieces["full_step"] = full(layer, optimizer)

    def forward_backward_of(step_layer):
        @tf.function
        def forward_backward():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(step_layer(ids, training=True)
                                     * upstream)
            return tape.gradient(
                loss, step_layer.trainable_variables)[0].values
        return forward_backward

    if library is not None:
        pieces["forward_backward"] = forward_backward_of(native_layer)
        pieces["forward_backward_stock"] = forward_backward_of(layer)
    else:
        pieces["forward_backward"] = forward_backward_of(layer)

    @tf.function
    def id_check():
        return checked_ids(flat, rows, table.name)
    pieces["id_check"] = id_check

    @tf.function
    def gather_dequantize():
        return quantizers.dequantize(table.storage.read_rows(flat),
                                     table.read_step_sizes(flat))
    pieces["gather_dequantize"] = gather_dequantize

    if library is not None:
        pieces["apply"] = apply_of(native_layer, native_optimizer)
        native_table = alpt_keras.tables(native_layer)[0]

        @tf.function
        def native_gather_dequantize():
            return kernels.gather_dequantize(library, native_table, flat)
        pieces["native_gather_dequantize"] = native_gather_dequantize
        native_slots = native_optimizer.table_slots(native_table)
        strategy = tf.distribute.get_strategy()

        def table_step(uids, g):
            return kernels.fused_table_step(
                library, strategy, native_table, native_slots, uids, g,
                step, tf.constant(True), config, step_size_hyper)

        @tf.function
        def native_unique_segment_sum():
            return kernels.unique_segment_sum(library, flat, flat_up)
        pieces["native_unique_segment_sum"] = native_unique_segment_sum

        @tf.function
        def native_table_step():
            table_step(unique_ids, sums)
            return tf.constant(0)
        pieces["native_table_step"] = native_table_step

        @tf.function
        def native_chain():
            uids, _, g = kernels.unique_segment_sum(library, flat, flat_up)
            table_step(uids, g)
            return tf.constant(0)
        pieces["native_chain"] = native_chain
        pieces["apply_stock"] = apply_of(layer, optimizer)
    else:
        pieces["apply"] = apply_of(layer, optimizer)

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
        return quantizers.hash_uniform(spec.seed, spec.salt, step,
                                       unique_ids, dim)
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
    def raw_chain():
        """The whole stock update as one graph: dedup, sums, gathers,
        row math, scatters."""
        uids, pos = tf.unique(flat)
        g = tf.math.unsorted_segment_sum(flat_up, pos, tf.shape(uids)[0])
        c, s, i, j = row_math(
            table.storage.read_rows(uids), tf.gather(steps_var, uids),
            tf.gather(acc_var, uids), tf.gather(step_acc_var, uids), g, uids)
        codes_var.scatter_update(tf.IndexedSlices(tf.cast(c, tf.int8),
                                                  uids))
        steps_var.scatter_update(tf.IndexedSlices(s, uids))
        acc_var.scatter_add(tf.IndexedSlices(i, uids))
        step_acc_var.scatter_add(tf.IndexedSlices(j, uids))
        return tf.constant(0)
    pieces["raw_chain"] = raw_chain
    return pieces, int(unique_ids.shape[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default=default_output("profile_step"))
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run (CI)")
    args = parser.parse_args()
    if args.tiny:
        args.rows, args.batch, args.steps, args.rounds = 2**12, 256, 2, 1
        args.warmup = 1
    ids = workload_ids(args.batch, args.features, args.rows)
    try:
        library, native_error = kernels.load("native"), None
    except RuntimeError as error:
        library, native_error = None, str(error)
    pieces, unique = build_pieces(args.rows, args.dim, ids, library)
    medians = {name: float(np.median(t)) for name, t in interleaved_times(
        pieces, args.steps, args.warmup, args.rounds).items()}
    full = medians["full_step"]
    print(f"V={args.rows} D={args.dim} batch={args.batch}x{args.features} "
          f"({unique} unique ids), "
          f"{'Keras 3' if compat.IS_KERAS_3 else 'tf_keras'}, median of "
          f"{args.steps * args.rounds} runs per piece, interleaved")
    print(f"{'piece':<27}{'ms':>9}{'of full step':>14}")
    results = []
    for name, seconds in medians.items():
        share = seconds / full
        results.append({"piece": name, "median_seconds": seconds,
                        "share_of_full_step": share})
        print(f"{name:<27}{1000 * seconds:>9.2f}{share:>13.0%}")
    stock_apply = medians.get("apply_stock", medians["apply"])
    overhead = stock_apply - medians["raw_chain"]
    print(f"Keras/wrapper overhead of the stock apply (apply - raw_chain): "
          f"{1000 * overhead:.2f} ms")
    if library is None:
        print(f"native kernels not measured: {native_error}")
    write_report(args.output, {
        "benchmark": "profile_step", "config": vars(args),
        "unique_ids_per_step": unique, "machine": machine_info(),
        "results": results, "apply_overhead_seconds": overhead,
        "native_kernels": "built" if library is not None else
        {"error": native_error}})


if __name__ == "__main__":
    main()
