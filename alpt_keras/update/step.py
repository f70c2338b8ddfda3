"""The sparse ALPT table step as pure functions of tensors.

`ALPTOptimizer` gathers the rows of the unique ids a batch touched (codes,
Δ, optimizer slots), sums their gradients, calls these functions and
scatters what they return. They read and write no variable, so tests,
benchmarks and native kernels check the math here, not through an
optimizer. The step comes in the two halves the two-pass step needs:

1. `row_update`: `w = Δ·ŵ`, then the table optimizer: `w' = EmbOpt(w, g)`;
2. `step_size_update`: Δ learns from the LSQ gradient
   `∂L/∂Δ_i = γ Σ_j ĝ_ij s_ij` (`ĝ = g` in one pass, the second pass's
   gradient in two), kept `>= min_step_size`; then the codes
   `clip(R(w' / Δ'), -Q_N, Q_P)`.

`table_step` runs both (the one-pass step).

Reduction order (the float contract a native kernel must follow):
- Gradients of duplicate ids are summed by the caller with
  `unsorted_segment_sum` in input order (CPU), before these functions.
- Sums and means over a row's `D` columns (`mean_j g_ij²`, LSQ's `Σ_j`)
  use `tf.reduce_sum`/`tf.reduce_mean`, whose CPU order for TensorFlow's
  AVX build is: the scalar sum `s` of the last `D mod 8` columns, left to
  right; the 8-wide column blocks added block by block (with four
  interleaved accumulators over the first `4·⌊D/32⌋` blocks, combined as
  `((a0 + a1) + a2) + a3`); the 8 lanes reduced as
  `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`; the result
  `s + lanes`, and a mean divides that by `D`. `tests/core/test_update.py`
  checks this order against TensorFlow for D = 1 … 70.
- Per-table Δ (one Δ per logical table): the sum over a table's touched
  rows (LSQ) and the mean of their row means (`"rowwise"`) are
  `unsorted_segment_sum`s over the tables, in row order (CPU).
"""

from typing import NamedTuple

import tensorflow as tf

from alpt_keras import quantizers
from alpt_keras.update.rules import Increment
from alpt_keras.update.table_spec import as_group


class RowUpdate(NamedTuple):
    """The first half of a table step.

    Attributes:
        weights: float32 `[U, D]`, the touched rows before the step,
            `w = Δ·ŵ`.
        new_weights: float32 `[U, D]`, `w'` after the table optimizer.
        state: dict slot name -> new rows (a tensor or an `Increment`).
    """

    weights: tf.Tensor
    new_weights: tf.Tensor
    state: dict


class StepSizeUpdate(NamedTuple):
    """The second half of a table step.

    Attributes:
        step_size: float32 `[U, 1]` (per-row Δ) or `[1, 1]`, the new Δ'.
        state: dict step-size slot name -> new value (tensor or
            `Increment`); empty when the table does not learn Δ.
        codes: int32 `[U, D]`, the codes `clip(R(w'/Δ'), -Q_N, Q_P)`.
    """

    step_size: tf.Tensor
    state: dict
    codes: tf.Tensor


class TableStep(NamedTuple):
    """A whole one-pass table step (`table_step`)."""

    new_weights: tf.Tensor
    step_size: tf.Tensor
    state: dict
    codes: tf.Tensor


def _step_number(step):
    """The 1-based step `t` as float32 (Adam's bias correction)."""
    return tf.cast(step + 1, tf.float32)


def row_update(codes, step_size, grads, state, step, rule, hyper):
    """Step 1: the table optimizer on the touched rows.

    Args:
        codes: int `[U, D]`, the stored codes of the touched rows.
        step_size: float32 `[U, 1]` (per row) or `[1, 1]` (per table).
        grads: float32 `[U, D]`, the summed gradients of those rows.
        state: dict slot name -> rows, the table optimizer's state.
        step: int64 scalar, the table step (0-based).
        rule: `TableRule`.
        hyper: `Hyperparameters` of `rule`.

    Returns:
        `RowUpdate`.
    """
    weights = quantizers.dequantize(codes, step_size)  # (U, D)
    new_weights, new_state = rule.update(
        weights, grads, state, hyper, _step_number(step))
    return RowUpdate(weights, new_weights, new_state)


def _keep(flag, new, old):
    """`new` where `flag`, else `old` (an `Increment` adds nothing)."""
    if isinstance(new, Increment):
        return Increment(tf.where(flag, new.value, old),
                         tf.where(flag, new.increment,
                                  tf.zeros_like(new.increment)))
    return tf.where(flag, new, old)


class RowLocation(NamedTuple):
    """Where global rows of a group lie (`locate`).

    Attributes:
        table_index: int32 `[U]`, each row's logical table, or `None` in a
            group of one (every row is table 0's).
        local_ids: int64 `[U]`, each row's id inside its logical table.
    """

    table_index: object
    local_ids: tf.Tensor


def locate(group, ids):
    """The logical table and local id of each global row `ids` `[U]` of
    `group` (a `GroupSpec`, or a `TableSpec`: a group of one)."""
    group = as_group(group)
    if group.num_tables == 1:
        return RowLocation(None, ids)
    starts = tf.constant(group.offsets[1:-1], tf.int64)
    index = tf.searchsorted(starts, ids, side="right", out_type=tf.int32)
    local = ids - tf.gather(tf.constant(group.offsets[:-1], tf.int64), index)
    return RowLocation(index, local)


def row_step_sizes(step_size, group, location):
    """Δ of each row: `step_size` itself for per-row Δ (`[U, 1]`) and for
    a per-table Δ in a group of one (`[1, 1]`, broadcast); a per-table Δ
    `[T, 1]` of a group is gathered by each row's table."""
    group = as_group(group)
    if group.per_row or location.table_index is None:
        return step_size
    return tf.gather(step_size, location.table_index)


def _table_segments(location, num_rows):
    """Each row's table index, as segment ids (all 0 in a group of one)."""
    if location.table_index is None:
        return tf.zeros([num_rows], tf.int32)
    return location.table_index


def step_size_update(new_weights, step_size, grads, state, step, ids,
                     table, rule, hyper, update_step_size=None,
                     location=None):
    """Steps 3 and 4: learns Δ, then requantizes the rows.

    Args:
        new_weights: float32 `[U, D]`, `w'` from `row_update`.
        step_size: float32, the current Δ: `[U, 1]` (per row) or `[T, 1]`
            (per table: one per logical table of the group).
        grads: float32 `[U, D]`: `g` (one pass) or the second pass's `ĝ`.
        state: dict step-size slot name -> current value.
        step: int64 scalar, the table step (0-based): Adam's `t` and the
            rounding noise's counter.
        ids: int64 `[U]`, the rows' (global) ids.
        table: `TableSpec`, or `GroupSpec` for stacked tables.
        rule: `StepSizeRule`, or `None` when `table` does not learn Δ.
        hyper: `Hyperparameters` of `rule`.
        update_step_size: optional bool scalar tensor; where `False`, Δ and
            its state stay as they were and the codes are requantized
            with the old Δ (a second pass with non-finite gradients).
        location: `RowLocation` of `ids` (computed when `None`).

    Returns:
        `StepSizeUpdate`.

    A per-table Δ sums its rows' LSQ gradients with
    `unsorted_segment_sum` over the tables (input order on CPU), each
    with its own `γ = 1/sqrt(V_t·D·Q_P)`; a table no row touched gets a
    zero gradient.
    """
    group = as_group(table)
    location = locate(group, ids) if location is None else location
    rows_step_size = row_step_sizes(step_size, group, location)
    new_step_size, new_state = step_size, {}
    if group.learn_step_size:
        table_mean = None
        if group.per_row:
            step_grad = quantizers.lsq_step_size_gradient(
                new_weights, step_size, grads, group.num_bits,
                group.output_dim)  # (U, 1)
        else:
            scales = [quantizers.lsq_gradient_scale(t.num_shared,
                                                    group.num_bits)
                      for t in group.tables]
            if location.table_index is None:
                scale = scales[0]
            else:
                scale = tf.gather(tf.constant(scales, tf.float32),
                                  location.table_index)[:, None]
            factor = quantizers.lsq_ste_factor(new_weights, rows_step_size,
                                               group.num_bits)
            row_grads = scale * tf.reduce_sum(grads * factor, axis=-1,
                                              keepdims=True)  # (U, 1)
            segments = _table_segments(location, tf.shape(ids)[0])
            num_tables = group.num_tables
            step_grad = tf.math.unsorted_segment_sum(
                row_grads, segments, num_tables)  # (T, 1)
            counts = tf.math.unsorted_segment_sum(
                tf.ones_like(row_grads), segments, num_tables)

            def table_mean(values):
                sums = tf.math.unsorted_segment_sum(values, segments,
                                                    num_tables)
                return sums / tf.maximum(counts, 1.0)

        new_step_size, new_state = rule.update(
            step_size, step_grad, state, hyper, _step_number(step), grads,
            table_mean)
        new_step_size = tf.maximum(new_step_size, group.min_step_size)
        if update_step_size is not None:
            new_step_size = tf.where(update_step_size, new_step_size,
                                     step_size)
            new_state = {name: _keep(update_step_size, value, state[name])
                         for name, value in new_state.items()}
    codes = requantize(new_weights,
                       row_step_sizes(new_step_size, group, location),
                       ids, step, group, location=location)
    return StepSizeUpdate(new_step_size, new_state, codes)


def rounding_noise(group, step, location, num_columns):
    """Uniform noise `[U, D]` of rows at `location`, keyed by each row's
    logical table `(seed, salt)`, `step` and *local* id: the same noise
    the table would draw on its own."""
    group = as_group(group)
    if location.table_index is None:
        spec = group.tables[0]
        return quantizers.hash_uniform(spec.seed, spec.salt, step,
                                       location.local_ids, num_columns)
    keys = quantizers.hash_key(
        tf.constant([t.seed for t in group.tables], tf.int64),
        tf.constant([t.salt for t in group.tables], tf.int64), step)  # (T,)
    return quantizers.hash_uniform_keyed(
        tf.gather(keys, location.table_index), location.local_ids,
        num_columns)


def requantize(weights, step_size, ids, step, table, rounding=None,
               location=None):
    """Codes `clip(R(w / Δ), -Q_N, Q_P)` as int32 `[U, D]`.

    `step_size` is each row's Δ (`[U, 1]`, or `[1, 1]` broadcast).
    Stochastic rounding draws its noise from the hash of
    `(seed, salt, step, local id, column)` of each row's logical table.
    `rounding` overrides the table's (the two-pass step writes
    `Q_D(w'; Δ)` between its passes).
    """
    group = as_group(table)
    rounding = group.rounding if rounding is None else rounding
    noise = None
    if rounding == "stochastic":
        location = locate(group, ids) if location is None else location
        noise = rounding_noise(group, step, location, group.output_dim)
    return quantizers.quantize(weights, step_size, group.num_bits, rounding,
                               noise)


def table_step(codes, step_size, grads, state, step_size_state, step, ids,
               table, table_rule, table_hyper, step_size_rule=None,
               step_size_hyper=None):
    """One whole one-pass ALPT step of the touched rows (both halves).

    Args:
        codes, step_size, grads, state, step: as `row_update`.
        step_size_state: dict, the step-size rule's state.
        ids: int64 `[U]`, the touched rows' ids.
        table: `TableSpec`, or `GroupSpec` (then `step_size` is `[T, 1]`
            for per-table Δ).
        table_rule, table_hyper: the table optimizer and its constants.
        step_size_rule, step_size_hyper: the step-size rule and its
            constants (unused when the table does not learn Δ).

    Returns:
        `TableStep`; `state` holds the new state of both rules.

    Example:

    >>> from alpt_keras import update
    >>> spec = update.TableSpec(input_dim=4, output_dim=2,
    ...                         rounding="deterministic")
    >>> out = update.table_step(
    ...     codes=tf.constant([[10, -3]]), step_size=tf.constant([[0.1]]),
    ...     grads=tf.constant([[0.5, 0.0]]),
    ...     state={"accumulator": tf.zeros([1, 1])}, step_size_state={
    ...         "step_size_accumulator": tf.zeros([1, 1])},
    ...     step=tf.constant(0, tf.int64), ids=tf.constant([2], tf.int64),
    ...     table=spec,
    ...     table_rule=update.get_table_rule("rowwise_adagrad"),
    ...     table_hyper=update.Hyperparameters(0.01),
    ...     step_size_rule=update.get_step_size_rule("rowwise"),
    ...     step_size_hyper=update.Hyperparameters(0.03, epsilon=1e-12))
    >>> out.codes.numpy().tolist()
    [[10, -3]]
    >>> float(out.state["accumulator"].increment[0, 0])
    0.125
    """
    location = locate(table, ids)
    rows = row_update(codes, row_step_sizes(step_size, table, location),
                      grads, state, step, table_rule, table_hyper)
    second = step_size_update(
        rows.new_weights, step_size, grads, step_size_state, step, ids,
        table, step_size_rule, step_size_hyper, location=location)
    return TableStep(rows.new_weights, second.step_size,
                     {**rows.state, **second.state}, second.codes)
