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


# Settings every table of a group shares: they decide the physical layout
# (width, code format) or the update's shape (Δ mode, rules' constants).
SHARED_SETTINGS = ("output_dim", "num_bits", "step_size_mode", "rounding",
                   "learn_step_size", "min_step_size")


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """Several logical tables stored in one physical table (stacked rows).

    Logical table `t` owns the global rows `[offsets[t], offsets[t+1])`.
    Its rounding noise stays keyed by its own `(seed, salt)` and its
    *local* row (`global - offsets[t]`), and a per-table Δ is one Δ per
    logical table, so a group computes bit for bit what its tables would
    compute as separate tables. A single `TableSpec` is a group of one
    (`as_group`).

    Attributes:
        tables: tuple of `TableSpec`, which must agree on
            `SHARED_SETTINGS`.
        name: str, the group's name (slot names, messages).
    """

    tables: tuple
    name: str = "group"

    def __post_init__(self):
        tables = tuple(self.tables)
        if not tables or not all(isinstance(t, TableSpec) for t in tables):
            raise ValueError(
                "`tables` must be a non-empty sequence of TableSpec. "
                f"Received: tables={self.tables!r}")
        object.__setattr__(self, "tables", tables)
        first = tables[0]
        for table in tables[1:]:
            for setting in SHARED_SETTINGS:
                if getattr(table, setting) != getattr(first, setting):
                    raise ValueError(
                        f"Tables of one group must agree on `{setting}`. "
                        f"Received: {setting}={getattr(first, setting)!r} "
                        f"for table '{first.name}' and "
                        f"{getattr(table, setting)!r} for table "
                        f"'{table.name}'")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Table names in a group must be unique. Received: {names}")
        offsets = [0]
        for table in tables:
            offsets.append(offsets[-1] + table.input_dim)
        object.__setattr__(self, "offsets", tuple(offsets))

    def __getattr__(self, setting):
        # The shared settings read through to the tables.
        if setting in SHARED_SETTINGS:
            return getattr(self.tables[0], setting)
        raise AttributeError(setting)

    @property
    def num_tables(self):
        return len(self.tables)

    @property
    def input_dim(self):
        """Rows of the physical table, `ΣV`."""
        return self.offsets[-1]

    @property
    def per_row(self):
        return self.tables[0].per_row

    @property
    def num_step_sizes(self):
        """Length of the Δ variable: `ΣV` (per-row Δ) or `T` (per-table)."""
        return self.input_dim if self.per_row else self.num_tables

    def table(self, name):
        """The `TableSpec` called `name`."""
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(
            f"No table {name!r} in group '{self.name}'. Received: "
            f"name={name!r}; tables: {[t.name for t in self.tables]}")

    def offset(self, name):
        """The first global row of table `name`."""
        return self.offsets[self.tables.index(self.table(name))]


def as_group(spec):
    """`spec` as a `GroupSpec` (a `TableSpec` becomes a group of one)."""
    if isinstance(spec, GroupSpec):
        return spec
    return GroupSpec((spec,), name=spec.name)
