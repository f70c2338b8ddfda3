"""The ALPT table update as pure functions and rule specs (no variables).

- `rules`: the table optimizers (`TABLE_RULES`) and step-size rules
  (`STEP_SIZE_RULES`) as frozen specs: slots, bytes, default learning
  rates and a pure update function each.
- `config`: `UpdateConfig`, the rules and constants an optimizer uses.
- `step`: the sparse step of the touched rows, `row_update` then
  `step_size_update` (or both at once, `table_step`).

`ALPTOptimizer` only gathers rows, calls these and scatters the results;
benchmarks, tests and native kernels check the math here.
"""

from alpt_keras.update.config import UpdateConfig
from alpt_keras.update.rules import (
    STEP_SIZE_RULES,
    TABLE_RULES,
    Hyperparameters,
    Increment,
    Slot,
    StepSizeRule,
    TableRule,
    get_step_size_rule,
    get_table_rule,
    rules_markdown,
)
from alpt_keras.update.step import (
    RowLocation,
    RowUpdate,
    StepSizeUpdate,
    TableStep,
    locate,
    requantize,
    rounding_noise,
    row_step_sizes,
    row_update,
    step_size_update,
    table_step,
)
from alpt_keras.update.table_spec import (
    SUPPORTED_STEP_SIZE_MODES,
    GroupSpec,
    TableSpec,
    as_group,
)

__all__ = [
    "GroupSpec",
    "Hyperparameters",
    "Increment",
    "RowLocation",
    "RowUpdate",
    "STEP_SIZE_RULES",
    "SUPPORTED_STEP_SIZE_MODES",
    "Slot",
    "StepSizeRule",
    "StepSizeUpdate",
    "TABLE_RULES",
    "TableRule",
    "TableSpec",
    "TableStep",
    "UpdateConfig",
    "get_step_size_rule",
    "get_table_rule",
    "as_group",
    "locate",
    "requantize",
    "rounding_noise",
    "row_step_sizes",
    "row_update",
    "rules_markdown",
    "step_size_update",
    "table_step",
]
