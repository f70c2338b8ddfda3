"""`UpdateConfig`: which rules update ALPT tables, and their constants."""

import dataclasses

from alpt_keras.update.rules import (
    Hyperparameters,
    get_step_size_rule,
    get_table_rule,
)
from alpt_keras.update.table_spec import as_group
from alpt_keras.validation import check_float


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """The table optimizer and step-size rule of ALPT tables (validated).

    `ALPTOptimizer` holds one; benchmarks and kernels read the same rules
    and constants from it.

    Attributes:
        embedding_optimizer: str, a key of `TABLE_RULES`.
        embedding_learning_rate: float > 0, or `None` for the rule's
            default.
        step_size_optimizer: str, a key of `STEP_SIZE_RULES`.
        step_size_learning_rate: float > 0, or `None` for the rule's
            default (a rule without one needs it).
        beta_1, beta_2: floats in [0, 1), Adam's decay rates.
        epsilon: float > 0, of the table optimizer.
        step_size_epsilon: float > 0, of the step-size rule.
        initial_accumulator_value: float >= 0, of every accumulator.

    Example:

    >>> config = UpdateConfig(embedding_optimizer="lazy_adam")
    >>> config.embedding_hyperparameters.learning_rate
    0.001
    """

    embedding_optimizer: str = "rowwise_adagrad"
    embedding_learning_rate: float = None
    step_size_optimizer: str = "rowwise"
    step_size_learning_rate: float = None
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-8
    step_size_epsilon: float = 1e-12
    initial_accumulator_value: float = 0.0

    def __post_init__(self):
        get_table_rule(self.embedding_optimizer)
        step_rule = get_step_size_rule(self.step_size_optimizer)
        if step_rule.default_learning_rate is None and \
                self.step_size_learning_rate is None:
            raise ValueError(
                f"`step_size_optimizer={self.step_size_optimizer!r}` needs "
                "an explicit `step_size_learning_rate` (LSQ step-size "
                "gradients are tiny and depend on the loss scale). "
                "Received: step_size_learning_rate=None")
        checks = {
            "embedding_learning_rate": dict(minimum=0.0, inclusive=False,
                                            allow_none=True),
            "step_size_learning_rate": dict(minimum=0.0, inclusive=False,
                                            allow_none=True),
            "beta_1": dict(minimum=0.0, maximum=1.0),
            "beta_2": dict(minimum=0.0, maximum=1.0),
            "epsilon": dict(minimum=0.0, inclusive=False),
            "step_size_epsilon": dict(minimum=0.0, inclusive=False),
            "initial_accumulator_value": dict(minimum=0.0),
        }
        for name, bounds in checks.items():
            object.__setattr__(self, name, check_float(
                name, getattr(self, name), **bounds))

    @property
    def table_rule(self):
        return get_table_rule(self.embedding_optimizer)

    @property
    def step_size_rule(self):
        return get_step_size_rule(self.step_size_optimizer)

    @property
    def embedding_hyperparameters(self):
        """`Hyperparameters` of the table optimizer."""
        lr = self.embedding_learning_rate
        if lr is None:
            lr = self.table_rule.default_learning_rate
        return Hyperparameters(lr, self.beta_1, self.beta_2, self.epsilon)

    def step_size_hyperparameters(self, step_size_mode):
        """`Hyperparameters` of the step-size rule for tables with
        `step_size_mode` (`"row"` or `"table"`)."""
        lr = self.step_size_learning_rate
        if lr is None:
            lr = self.step_size_rule.default_learning_rate[step_size_mode]
        return Hyperparameters(lr, self.beta_1, self.beta_2,
                               self.step_size_epsilon)

    def state_bytes(self, spec):
        """Bytes of optimizer state for a table of `TableSpec` (or a
        group of `GroupSpec`) `spec`."""
        rows = spec.input_dim * self.table_rule.bytes_per_row(
            spec.output_dim)
        if not spec.learn_step_size:
            return rows
        step_sizes = as_group(spec).num_step_sizes
        return rows + step_sizes * self.step_size_rule.bytes_per_step_size()
