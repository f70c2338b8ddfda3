"""`TableSpec`: the fixed settings of one logical ALPT table."""

import dataclasses

SUPPORTED_STEP_SIZE_MODES = ("row", "table")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """What the pure table step needs to know about a table (no variables).

    Attributes:
        input_dim: int, number of rows `V`.
        output_dim: int, row width `D`.
        num_bits: int in [2, 8]. Defaults to `8`.
        step_size_mode: `"row"` (one Δ per row) or `"table"`. Defaults to
            `"row"`.
        rounding: `"stochastic"` or `"deterministic"` write-back.
        learn_step_size: bool; `False` means LPT (Δ fixed).
        seed: int, the rounding noise's seed.
        salt: int, the table's salt in the rounding noise.
        min_step_size: float, the lower bound kept on Δ.
        name: str, for messages and optimizer slot names.
    """

    input_dim: int
    output_dim: int
    num_bits: int = 8
    step_size_mode: str = "row"
    rounding: str = "stochastic"
    learn_step_size: bool = True
    seed: int = 0
    salt: int = 0
    min_step_size: float = 1e-8
    name: str = "table"

    @property
    def per_row(self):
        return self.step_size_mode == "row"

    @property
    def num_shared(self):
        """Weights sharing one step size (LSQ's `N`)."""
        if self.per_row:
            return self.output_dim
        return self.input_dim * self.output_dim
