"""Per-feature embedding settings: small config objects (keras-rs style)."""

import dataclasses

from alpt_keras import ALPTEmbedding
from alpt_keras.compat import keras
from alpt_keras.quantizers import SUPPORTED_ROUNDING, validate_num_bits
from alpt_keras.storage import SUPPORTED_STORAGE
from alpt_keras.table import SUPPORTED_COMBINERS, SUPPORTED_STEP_SIZE
from alpt_keras.validation import check_int

EMBEDDING_KINDS = ("float32", "lpt", "alpt")


@dataclasses.dataclass
class TableConfig:
    """One embedding table, possibly shared by several features.

    Attributes:
        name: str. Table (and layer) name; also salts the rounding noise.
        vocabulary_size: int. Rows.
        embedding_dim: int. Row width. Defaults to `16`.
        kind: `"float32"` (`keras.layers.Embedding`), `"lpt"` (Δ fixed) or
            `"alpt"` (Δ learned). Defaults to `"alpt"`.
        num_bits: int in [2, 8]. Defaults to `8`.
        rounding: `"stochastic"` or `"deterministic"` write-back (LPT-SR vs
            LPT-DR). Defaults to `"stochastic"`.
        step_size: `"row"` or `"table"`. Defaults to `"row"`.
        seed: int. Seeds the initializer and the noise. Defaults to `0`.
        storage: `"int8"` or `"packed"` codes (`ALPTEmbedding`). Defaults
            to `"int8"`.
    """

    name: str
    vocabulary_size: int
    embedding_dim: int = 16
    kind: str = "alpt"
    num_bits: int = 8
    rounding: str = "stochastic"
    step_size: str = "row"
    seed: int = 0
    storage: str = "int8"

    def __post_init__(self):
        for field in ("vocabulary_size", "embedding_dim", "seed"):
            try:
                bounds = dict(minimum=1) if field != "seed" else {}
                setattr(self, field, check_int(field, getattr(self, field),
                                               **bounds))
            except (TypeError, ValueError) as error:
                raise type(error)(f"{error} (table {self.name!r})") from None
        if self.kind not in EMBEDDING_KINDS:
            raise ValueError(
                f"`kind` must be one of {EMBEDDING_KINDS}. "
                f"Received: kind={self.kind!r} (table {self.name!r})"
            )
        self.num_bits = validate_num_bits(self.num_bits)
        if self.rounding not in SUPPORTED_ROUNDING:
            raise ValueError(
                f"`rounding` must be one of {SUPPORTED_ROUNDING}. "
                f"Received: rounding={self.rounding!r}"
            )
        if self.step_size not in SUPPORTED_STEP_SIZE:
            raise ValueError(
                f"`step_size` must be one of {SUPPORTED_STEP_SIZE}. "
                f"Received: step_size={self.step_size!r}"
            )
        if self.storage not in SUPPORTED_STORAGE:
            raise ValueError(
                f"`storage` must be one of {SUPPORTED_STORAGE}. "
                f"Received: storage={self.storage!r} (table {self.name!r})"
            )

    def make_layer(self, dtype=None):
        """The table layer: `keras.layers.Embedding` or `ALPTEmbedding`,
        with the dtype policy `dtype` (`None`: the global one)."""
        if self.kind == "float32":
            return keras.layers.Embedding(
                self.vocabulary_size,
                self.embedding_dim,
                embeddings_initializer=keras.initializers.RandomNormal(
                    stddev=0.003, seed=self.seed
                ),
                name=self.name,
                dtype=dtype,
            )
        return ALPTEmbedding(
            self.vocabulary_size,
            self.embedding_dim,
            num_bits=self.num_bits,
            step_size=self.step_size,
            rounding=self.rounding,
            learn_step_size=self.kind == "alpt",
            seed=self.seed,
            storage=self.storage,
            name=self.name,
            dtype=dtype,
        )

    def get_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@dataclasses.dataclass
class FeatureConfig:
    """One categorical input feature.

    Attributes:
        name: str. The input name (the key in the feature dict).
        table: `TableConfig`. Features naming the same table share it.
        max_ids: `None` for one id per example (input `[B]`), or the padded
            length of a multi-hot feature (input `[B, max_ids]`, padded with
            `-1`, reduced with `combiner`).
        combiner: `"sum"`, `"mean"` or `"sqrtn"` for multi-hot features.
            Defaults to `"mean"`.
    """

    name: str
    table: TableConfig
    max_ids: int = None
    combiner: str = "mean"

    def __post_init__(self):
        if isinstance(self.table, dict):
            self.table = TableConfig.from_config(self.table)
        if not isinstance(self.table, TableConfig):
            raise TypeError(
                "`table` must be a TableConfig. "
                f"Received: table={self.table!r} (feature {self.name!r})"
            )
        try:
            self.max_ids = check_int("max_ids", self.max_ids, minimum=1,
                                     allow_none=True)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (feature {self.name!r})") from None
        if self.combiner not in SUPPORTED_COMBINERS:
            raise ValueError(
                f"`combiner` must be one of {SUPPORTED_COMBINERS}. "
                f"Received: combiner={self.combiner!r}"
            )

    def get_config(self):
        return {
            "name": self.name,
            "table": self.table.get_config(),
            "max_ids": self.max_ids,
            "combiner": self.combiner,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def simple_features(vocabulary_sizes, embedding_dim=16, kind="alpt",
                    num_bits=8, rounding="stochastic", step_size="row",
                    seed=0, storage="int8"):
    """One table per feature, all with the same settings.

    Args:
        vocabulary_sizes: dict feature name -> vocabulary size.
        other arguments: as `TableConfig`.
    """
    return [
        FeatureConfig(
            name,
            TableConfig(name, size, embedding_dim, kind, num_bits, rounding,
                        step_size, seed + i, storage),
        )
        for i, (name, size) in enumerate(vocabulary_sizes.items())
    ]
