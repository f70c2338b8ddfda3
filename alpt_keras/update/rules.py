"""Update rules as data: the table optimizers and the step-size rules.

A rule is a frozen spec: its slots (the optimizer state it keeps per row or
per step size), the bytes they cost, its default learning rate, and its
update as a pure function of tensors. `ALPTOptimizer` creates the slots and
calls the update on the touched rows; it knows no rule by name. Adding a
rule means adding one spec to `TABLE_RULES` or `STEP_SIZE_RULES` here
(README's optimizer tables are generated from these specs by
`rules_markdown`, and a test keeps them equal).

Additive state (accumulators) is returned as an `Increment`: the optimizer
writes it with `scatter_add` of the increment, which is bitwise the same as
writing the new value and loses nothing when asynchronous
parameter-server workers update the same rows at once.

Float contract: every rule is elementwise over its rows except the
reductions over a row's columns (`mean_j g_ij²`, LSQ's `Σ_j`), which
`tf.reduce_sum`/`tf.reduce_mean` compute in a fixed order on CPU; see
`alpt_keras.update.step` ("Reduction order").
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf


class Increment(NamedTuple):
    """New additive state `value = old + increment`.

    Written as `scatter_add(increment)`: bitwise the same as writing
    `value`, and no increment is lost under asynchronous workers.
    """

    value: tf.Tensor
    increment: tf.Tensor


class Hyperparameters(NamedTuple):
    """The constants of one rule's update (Python floats).

    `learning_rate` is resolved (a rule's default when the user gave
    none); `epsilon` is the rule's own (`epsilon` for table optimizers,
    `step_size_epsilon` for step-size rules).
    """

    learning_rate: float
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8


@dataclasses.dataclass(frozen=True)
class Slot:
    """One optimizer-state variable of a rule.

    Attributes:
        name: str. The slot's key; the optimizer variable of table `T` is
            named `f"{T}_{name}"` (kept stable: checkpoints use it).
        per_element: bool. `True`: one value per code (`[V, D]`);
            `False`: one value per row (`[V, 1]`). Step-size slots are
            always one value per step size.
        initial: `"zeros"` or `"accumulator"` (the optimizer's
            `initial_accumulator_value`).
    """

    name: str
    per_element: bool = False
    initial: str = "zeros"

    def bytes_per_row(self, output_dim):
        return 4 * (output_dim if self.per_element else 1)


@dataclasses.dataclass(frozen=True)
class TableRule:
    """A table optimizer: the full-precision update of the touched rows.

    `update(weights, grads, state, hyper, t) -> (new_weights, new_state)`
    with `weights`, `grads` float32 `[U, D]`, `state` a dict slot name ->
    rows (`[U, D]` or `[U, 1]`), `hyper` a `Hyperparameters`, `t` the
    1-based step as a float32 scalar; `new_state` maps every slot name to
    its new rows (a tensor, or an `Increment` for additive state).
    """

    name: str
    slots: tuple
    default_learning_rate: float
    update: Callable
    summary: str = ""

    def bytes_per_row(self, output_dim):
        """Bytes of optimizer state per table row of width `output_dim`."""
        return sum(s.bytes_per_row(output_dim) for s in self.slots)


@dataclasses.dataclass(frozen=True)
class StepSizeRule:
    """A step-size rule: learns Δ from its LSQ gradient.

    `update(step_size, step_grad, state, hyper, t, grads, table_mean) ->
    (new_step_size, new_state)` with `step_size` and `step_grad` float32
    `[U, 1]` (per-row Δ) or `[T, 1]` (per-table Δ, one per logical table
    of a group), `grads` the rows' gradients `[U, D]` (the rule may use
    them, as `"rowwise"` does). `table_mean` is `None` for per-row Δ;
    for per-table Δ it maps per-row values `[U, 1]` to the mean over each
    table's rows `[T, 1]` (0 for a table no row touched). The result is
    not yet clipped to `min_step_size`.

    `default_learning_rate` maps the step-size mode (`"row"`, `"table"`)
    to a learning rate, or is `None` when the rule has no sensible default
    (the user must give one).
    """

    name: str
    slots: tuple
    default_learning_rate: object
    update: Callable
    summary: str = ""

    def bytes_per_step_size(self):
        return 4 * len(self.slots)


# ------------------------------------------------------------ table rules
def _sgd(weights, grads, state, hyper, t):
    del state, t
    return weights - hyper.learning_rate * grads, {}


def _adagrad_like(per_row):
    def update(weights, grads, state, hyper, t):
        del t
        increment = tf.square(grads)  # (U, D)
        if per_row:
            increment = tf.reduce_mean(increment, axis=-1, keepdims=True)
        accumulator = state["accumulator"] + increment
        new_weights = weights - hyper.learning_rate * grads / (
            tf.sqrt(accumulator) + hyper.epsilon)
        return new_weights, {
            "accumulator": Increment(accumulator, increment)}

    return update


def adam_moments(m, v, grads, hyper):
    """Adam's moment updates `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`."""
    m = hyper.beta_1 * m + (1.0 - hyper.beta_1) * grads
    v = hyper.beta_2 * v + (1.0 - hyper.beta_2) * tf.square(grads)
    return m, v


def adam_direction(m, v, t, hyper):
    """Bias-corrected `m̂ / (sqrt(v̂) + ε)` at the 1-based step `t`."""
    m_hat = m / (1.0 - tf.pow(hyper.beta_1, t))
    v_hat = v / (1.0 - tf.pow(hyper.beta_2, t))
    return m_hat / (tf.sqrt(v_hat) + hyper.epsilon)


def _lazy_adam(weights, grads, state, hyper, t):
    m, v = adam_moments(state["m"], state["v"], grads, hyper)
    new_weights = weights - hyper.learning_rate * adam_direction(
        m, v, t, hyper)
    return new_weights, {"m": m, "v": v}


TABLE_RULES = {
    rule.name: rule
    for rule in (
        TableRule(
            "rowwise_adagrad", (Slot("accumulator", False, "accumulator"),),
            0.01, _adagrad_like(per_row=True),
            "`a_i += mean_j g_ij²`, `w -= lr·g / (sqrt(a_i) + ε)`"),
        TableRule(
            "adagrad", (Slot("accumulator", True, "accumulator"),),
            0.01, _adagrad_like(per_row=False),
            "`a_ij += g_ij²`, `w -= lr·g / (sqrt(a) + ε)`"),
        TableRule("sgd", (), 0.01, _sgd, "`w -= lr·g`"),
        TableRule(
            "lazy_adam", (Slot("m", True), Slot("v", True)), 0.001,
            _lazy_adam,
            "Adam moments of the touched rows only, bias-corrected with "
            "the table step"),
    )
}


# -------------------------------------------------------- step-size rules
def _step_sgd(step_size, step_grad, state, hyper, t, grads, table_mean):
    del state, t, grads, table_mean
    return step_size - hyper.learning_rate * step_grad, {}


def _step_rowwise(step_size, step_grad, state, hyper, t, grads, table_mean):
    """Δ scaled by its rows' gradient RMS (Adagrad-style), not by Δ's own
    gradient: continuous in g, so quantization noise in the LSQ gradient
    does not become full-size sign steps; `lr` is a fraction of Δ."""
    del t
    mean_square = tf.reduce_mean(tf.square(grads), axis=-1,
                                 keepdims=True)  # (U, 1)
    if table_mean is not None:  # per-table Δ: the mean over its rows
        mean_square = table_mean(mean_square)  # (T, 1)
    accumulator = state["step_size_accumulator"] + mean_square
    direction = step_grad / (tf.sqrt(accumulator) + hyper.epsilon)
    return step_size * (1.0 - hyper.learning_rate * direction), {
        "step_size_accumulator": Increment(accumulator, mean_square)}


def _step_adagrad(step_size, step_grad, state, hyper, t, grads,
                  table_mean):
    del t, grads, table_mean
    accumulator = state["step_size_accumulator"] + tf.square(step_grad)
    direction = step_grad / (tf.sqrt(accumulator) + hyper.epsilon)
    return step_size - hyper.learning_rate * direction, {
        "step_size_accumulator": Increment(accumulator,
                                           tf.square(step_grad))}


def _step_adam(step_size, step_grad, state, hyper, t, grads, table_mean):
    del grads, table_mean
    m, v = adam_moments(state["step_size_m"], state["step_size_v"],
                        step_grad, hyper)
    direction = adam_direction(m, v, t, hyper)
    return step_size - hyper.learning_rate * direction, {
        "step_size_m": m, "step_size_v": v}


# References learn a per-row Δ with Adam at 2e-5 and a per-table Δ at
# 1e-6; "rowwise" is relative (a fraction of Δ). Plain SGD has no
# sensible default: LSQ step-size gradients are ~1e-9 on CTR data.
STEP_SIZE_RULES = {
    rule.name: rule
    for rule in (
        StepSizeRule(
            "rowwise", (Slot("step_size_accumulator", initial="accumulator"),),
            {"row": 0.03, "table": 0.03}, _step_rowwise,
            "`b += mean_j g_ij²`, `Δ ← Δ·(1 - lr·(∂L/∂Δ)/(sqrt(b) + ε_Δ))`;"
            " `lr` relative to Δ"),
        StepSizeRule(
            "adam", (Slot("step_size_m"), Slot("step_size_v")),
            {"row": 2e-5, "table": 1e-6}, _step_adam,
            "Adam on Δ's own gradient (the paper's choice); absolute `lr`"),
        StepSizeRule(
            "adagrad", (Slot("step_size_accumulator", initial="accumulator"),),
            {"row": 2e-5, "table": 1e-6}, _step_adagrad,
            "Adagrad on Δ's own gradient; absolute `lr`"),
        StepSizeRule(
            "sgd", (), None, _step_sgd,
            "`Δ -= lr·∂L/∂Δ`; needs an explicit `step_size_learning_rate`"),
    )
}


def get_table_rule(name):
    """The `TableRule` called `name`; `ValueError` lists the supported."""
    return _get(TABLE_RULES, name, "embedding_optimizer")


def get_step_size_rule(name):
    """The `StepSizeRule` called `name`; `ValueError` lists the
    supported."""
    return _get(STEP_SIZE_RULES, name, "step_size_optimizer")


def _get(registry, name, argument):
    rule = registry.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"`{argument}` must be one of {tuple(registry)}. "
                         f"Received: {argument}={name!r}")
    return rule


def _lr(value):
    return "—" if value is None else f"{value:g}"


def rules_markdown():
    """README's tables of table optimizers and step-size rules, generated
    from the specs (bytes per row at `D = 16`)."""
    lines = [
        "| `embedding_optimizer` | state per row | bytes per row (D = 16)"
        " | default lr | update |",
        "|---|---|---|---|---|",
    ]
    for rule in TABLE_RULES.values():
        slots = ", ".join(
            f"`{s.name}` [{'D' if s.per_element else '1'}]"
            for s in rule.slots) or "none"
        lines.append(
            f"| `{rule.name}` | {slots} | {rule.bytes_per_row(16)} | "
            f"{_lr(rule.default_learning_rate)} | {rule.summary} |")
    lines += [
        "",
        "| `step_size_optimizer` | state per step size | bytes | default lr"
        " (row / table Δ) | update |",
        "|---|---|---|---|---|",
    ]
    for rule in STEP_SIZE_RULES.values():
        slots = ", ".join(f"`{s.name}`" for s in rule.slots) or "none"
        default = rule.default_learning_rate
        lrs = "—" if default is None else \
            f"{_lr(default['row'])} / {_lr(default['table'])}"
        lines.append(
            f"| `{rule.name}` | {slots} | {rule.bytes_per_step_size()} | "
            f"{lrs} | {rule.summary} |")
    return "\n".join(lines)
