"""Sharding ALPT tables over parameter servers: `RowPartitioner`.

Every row-indexed variable of a table (codes, per-row Δ, per-row optimizer
state) is created inside `row_variables(V)`, and `RowPartitioner` splits
exactly those along their rows, all at the same boundaries.
"""

import tensorflow as tf

from alpt_keras._scopes import current, scoped
from alpt_keras.validation import check_int


def row_variables(num_rows):
    """Marks variables created inside as row-indexed by a table of
    `num_rows` rows (codes, per-row Δ, per-row optimizer state), for
    `RowPartitioner`."""
    return scoped("rows", num_rows)


class RowPartitioner(tf.distribute.experimental.partitioners.Partitioner):
    """Shards the row-indexed variables of ALPT tables over parameter
    servers, all with the same row boundaries; everything else stays whole.

    Pass it as `variable_partitioner` of `ParameterServerStrategy`. The
    codes, per-row step sizes and per-row optimizer state of a table are
    created inside `row_variables(V)` (by `ALPTEmbedding` and
    `ALPTOptimizer`), so each is split into `num_shards` pieces along axis
    0 the way TF splits any `[V, ...]` variable into equal shards (the first
    `V % num_shards` shards one row longer): the same boundaries for every
    variable of the table. Dense weights, per-table Δ, counters and the
    gradient carrier are not sharded.

    Args:
        num_shards: int >= 1, usually the number of parameter servers.
        min_rows_per_shard: int >= 1. Tables with fewer rows use fewer
            shards. Defaults to `1`.
    """

    def __init__(self, num_shards, min_rows_per_shard=1):
        self.num_shards = check_int("num_shards", num_shards, minimum=1)
        self.min_rows_per_shard = check_int(
            "min_rows_per_shard", min_rows_per_shard, minimum=1)

    def __call__(self, shape, dtype, axis=0):
        shape = tf.TensorShape(shape)
        partitions = [1] * shape.rank
        rows = current("rows")
        if rows is None or shape.rank == 0 or axis != 0 or \
                shape[0] != rows:
            return partitions
        partitions[0] = max(1, min(self.num_shards,
                                   rows // self.min_rows_per_shard))
        return partitions


