"""`ALPTEmbeddingGroup`: several ALPT tables stacked in one physical table.

Tens of small tables per model each running their own chain of ops (id
check, gather, dequantize, dedup, segment sum, row update, noise, scatter)
cost more than the rows they touch. A group stores its logical tables in
shared variables (codes `[ΣV, ...]`, Δ `[ΣV, 1]` or `[T, 1]`, optimizer
slots `[ΣV, ...]`), located by the `T + 1` row offsets, and runs one chain
for all of them: one id check, one gather and one dequantize per call, and
in `ALPTOptimizer` one dedup, one segment sum, one pure step and one
scatter per variable (like FBGEMM's table-batched embeddings or TPU table
stacking). Each logical table keeps its own initializer, seed, rounding
noise and (per-table) Δ, so a group computes bit for bit what its tables
compute as separate `ALPTEmbedding` layers.
"""

import dataclasses

import tensorflow as tf

from alpt_keras import _keras, quantizers
from alpt_keras.embedding import (
    ALPTEmbedding,
    PhysicalTable,
    check_storage_for_strategy,
    initial_state,
)
from alpt_keras.table import (
    check_float_dtype,
    combine,
    fail_check,
    integer_ids,
    sparse_bags,
)
from alpt_keras.update import GroupSpec
from alpt_keras.update.table_spec import SHARED_SETTINGS

keras = _keras.keras

# Besides the update's shared settings, tables stack only when their codes
# have one format and their rows one dtype.
_LAYER_SETTINGS = ("storage", "dtype")


@dataclasses.dataclass(frozen=True)
class _Table:
    """A logical table of a group: its spec, initializer and combiner."""

    spec: object
    initializer: object
    combiner: object
    config: dict


def stacking_key(layer):
    """What must agree for `layer` (an `ALPTEmbedding`) to share a group
    with another: its width, bits, storage, Δ mode, rounding,
    `learn_step_size`, `min_step_size` and dtype."""
    spec = layer.table_spec
    return tuple(getattr(spec, s) for s in SHARED_SETTINGS) + (
        layer.storage, layer.dtype_policy.name)


@_keras.register
class ALPTEmbeddingGroup(PhysicalTable):
    """Several ALPT tables in one physical table, looked up in one chain.

    Each logical table is described by an `ALPTEmbedding` (its
    `input_dim`, initializer, seed, `noise_salt`, combiner and name; the
    layer is only read, never built). The tables must agree on
    `output_dim`, `num_bits`, `step_size`, `rounding`, `learn_step_size`,
    `min_step_size`, `storage` and `dtype`; `stacking_key` tells which
    tables can share a group. Table `t` owns the rows
    `[offsets[t], offsets[t+1])` of the physical variables `codes`,
    `step_sizes` (per-row Δ `[ΣV, 1]`, or one Δ per table `[T, 1]`) and
    the optimizer's slots. Train it with `alpt_keras.ALPTOptimizer`, as a
    single table.

    A call takes ids per *feature*: a dict `{feature: ids}` (or a list in
    the order of `features`) of dense `[B]`/`[B, F]`, ragged or sparse
    ids, each reduced by its table's combiner as `ALPTEmbedding` does,
    and returns the embeddings in the same structure. By default every
    table is one feature of the same name; `features` maps feature names
    to table names, so several features can share a table. Ids must lie
    in `[0, input_dim)` of *their* table: an id that would land in another
    table of the group after offsetting is an error naming the feature,
    raised before any state changes.

    Args:
        tables: list of `ALPTEmbedding` (or their configs).
        features: dict feature name -> table name, or `None` (one feature
            per table, named after it). Defaults to `None`.
        **kwargs: base layer arguments (`name`, `trainable`); the dtype
            comes from the tables.

    Example:

    >>> group = ALPTEmbeddingGroup([
    ...     ALPTEmbedding(10, 4, seed=1, name="user"),
    ...     ALPTEmbedding(20, 4, seed=2, name="item")])
    >>> out = group({"user": tf.constant([1, 2]),
    ...              "item": tf.constant([[3, 19], [0, 5]])})
    >>> out["user"].shape, out["item"].shape
    (TensorShape([2, 4]), TensorShape([2, 2, 4]))
    >>> group.codes.shape  # 10 + 20 rows
    TensorShape([30, 4])
    """

    def __init__(self, tables, features=None, **kwargs):
        layers = [self._as_layer(t) for t in _as_list(tables, "tables")]
        if not layers:
            raise ValueError("`tables` must not be empty. Received: []")
        first = layers[0]
        for layer in layers[1:]:
            if stacking_key(layer) != stacking_key(first):
                settings = SHARED_SETTINGS + _LAYER_SETTINGS
                differ = [s for s, a, b in zip(
                    settings, stacking_key(first), stacking_key(layer),
                    strict=True) if a != b]
                raise ValueError(
                    "Tables of an ALPTEmbeddingGroup must agree on "
                    f"{list(settings)}. Received: tables '{first.name}' and "
                    f"'{layer.name}' differ in {differ}")
        # The policy, not `dtype` (tf_keras's `dtype` is the variable
        # dtype: a mixed policy would become float32 compute).
        kwargs.setdefault("dtype", first.dtype_policy)
        super().__init__(**kwargs)
        check_float_dtype(self)
        self._tables = tuple(
            _Table(layer.table_spec, layer.embeddings_initializer,
                   layer.combiner, layer.get_config())
            for layer in layers)
        self.group_spec = GroupSpec(tuple(t.spec for t in self._tables),
                                    name=self.name)
        self.storage = first.storage
        names = [t.spec.name for t in self._tables]
        if features is None:
            features = {name: name for name in names}
        if not isinstance(features, dict) or not features:
            raise TypeError(
                "`features` must be a non-empty dict feature name -> table "
                f"name, or None. Received: features={features!r}")
        unknown = sorted(set(features.values()) - set(names))
        if unknown:
            raise ValueError(
                f"`features` names tables {unknown} that are not in the "
                f"group. Received: features={features!r}; tables: {names}")
        self.features = dict(features)
        self._feature_table = {f: names.index(t) for f, t in
                               self.features.items()}
        self.supports_jit = False
        self._table = None
        # Set by `stack_members`: the tables' own layers save and load the
        # rows (so files keep the layout of separate tables).
        self._saved_by_members = False

    @classmethod
    def stack_members(cls, layers, **kwargs):
        """A group of `layers` (unbuilt `ALPTEmbedding`s) that stay the
        views of their tables (`ALPTEmbedding.stack_into`): keep them
        tracked where separate tables would be, and checkpoints keep the
        layout of separate tables. Returns the group."""
        group = cls(layers, **kwargs)
        for layer in layers:
            layer.stack_into(group)
        group._saved_by_members = True
        return group

    def save_own_variables(self, store):
        if not self._saved_by_members:
            super().save_own_variables(store)

    def load_own_variables(self, store):
        if self._saved_by_members:
            self._ensure_built()
            return
        super().load_own_variables(store)

    @staticmethod
    def _as_layer(table):
        if isinstance(table, ALPTEmbedding):
            return table
        if isinstance(table, dict):
            config = table.get("config", table)
            return ALPTEmbedding.from_config(config)
        raise TypeError(
            "`tables` must hold ALPTEmbedding layers (or their configs). "
            f"Received: {table!r}")

    # ---------------------------------------------------------------- info
    @property
    def table_names(self):
        return [t.spec.name for t in self._tables]

    @property
    def offsets(self):
        """The `T + 1` row offsets: table `t` owns rows
        `[offsets[t], offsets[t+1])`."""
        return self.group_spec.offsets

    @property
    def output_dim(self):
        return self.group_spec.output_dim

    # --------------------------------------------------------------- build
    def build(self, input_shape=None):
        if self._table is not None:
            return
        check_storage_for_strategy(self.storage, self.name)
        codes, steps = [], []
        for table in self._tables:
            # One initializer call per logical table, as a separate table.
            table_codes, table_steps = initial_state(
                table.spec, table.initializer, self.storage)
            codes.append(table_codes)
            steps.append(table_steps)
        with tf.init_scope():
            codes0 = tf.concat(codes, axis=0)
            step0 = tf.concat(steps, axis=0)  # (ΣV, 1) or (T, 1)
        self._create_table(self.group_spec, self.storage, codes0, step0)
        self.built = True

    # ---------------------------------------------------------------- call
    def call(self, inputs, training=None):
        _keras.refuse_xla(f"ALPTEmbeddingGroup '{self.name}'")
        self._ensure_built()
        as_dict = isinstance(inputs, dict)
        if as_dict:
            missing = sorted(set(self.features) - set(inputs))
            extra = sorted(set(inputs) - set(self.features))
            if missing or extra:
                raise ValueError(
                    f"ALPTEmbeddingGroup '{self.name}' takes ids for features "
                    f"{sorted(self.features)}. Received: missing {missing}, "
                    f"unknown {extra}")
            items = [(f, inputs[f]) for f in self.features]
        else:
            inputs = _as_list(inputs, "inputs")
            if len(inputs) != len(self.features):
                raise ValueError(
                    f"ALPTEmbeddingGroup '{self.name}' takes "
                    f"{len(self.features)} id tensors (features "
                    f"{list(self.features)}). Received: {len(inputs)}")
            items = list(zip(self.features, inputs, strict=True))
        # A table shared by several features is looked up in reverse
        # feature order: backprop delivers the gradients of a layer called
        # several times latest call first, so its rows' gradients then sum
        # in the order of a separate `ALPTEmbedding`. (Without shared
        # tables, the order changes nothing: each table's ids keep theirs.)
        order = items[::-1] if self.shares_tables else items
        shapes = {}
        flats = []
        for feature, ids in order:
            if isinstance(ids, tf.SparseTensor):
                ids = sparse_bags(ids)
            if not isinstance(ids, tf.RaggedTensor):
                ids = tf.convert_to_tensor(ids)
            shapes[feature] = ids
            flats.append(ids.flat_values if isinstance(ids, tf.RaggedTensor)
                         else tf.reshape(ids, [-1]))
        rows, sizes = self.lookup_flat([f for f, _ in order], flats,
                                       training)
        outputs = {}
        for (feature, _), part in zip(order, tf.split(rows, sizes),
                                      strict=True):
            combiner = self._tables[self._feature_table[feature]].combiner
            outputs[feature] = self._shape(shapes[feature], part, combiner)
        if as_dict:
            return {f: outputs[f] for f in self.features}
        return [outputs[f] for f in self.features]

    @property
    def shares_tables(self):
        """Whether some table is looked up by several features."""
        return len(set(self.features.values())) < len(self.features)

    def lookup_flat(self, features, ids, training=None):
        """Rows of flat ids, concatenated: `ids[i]` `[n_i]` of feature
        `features[i]` -> (`[Σ n_i, D]`, the sizes `[n_i]`), in this order.
        One id check, one gather, one dequantize for all of them. `call`
        uses it; so does `models.FeatureEmbedding`, which reshapes the
        rows of one-hot features directly. Give a shared table's features
        latest-first (see `call`) to match separate tables bitwise."""
        self._ensure_built()
        feature_tables = [self._feature_table[f] for f in features]
        sizes = tf.stack([tf.size(flat, out_type=tf.int32) for flat in ids])
        table_index = tf.repeat(tf.constant(feature_tables, tf.int32), sizes)
        global_ids = self._checked_global_ids(tf.concat(
            [self._as_int64(f, flat) for f, flat in
             zip(features, ids, strict=True)], axis=0), table_index,
            sizes, list(features))
        return self._lookup(global_ids, training, table_index), sizes

    def lookup_matrix(self, features, ids, training=None):
        """Rows of one id per feature and example: `ids` `[B, F]`, column
        `f` holding feature `features[f]`'s ids, -> `[B, F, D]`.

        The common CTR layout (every field one-hot) in O(1) ops whatever
        `F` is: one id check (`[B, F]` against each column's `input_dim`),
        one offset add, one gather and one dequantize, and no per-feature
        split, reshape or concat on the way in or out (`lookup_flat` needs
        `O(F)` of them). The features must look up distinct tables, unless
        `training=False` (inference). Each
        table's ids keep their batch order, so its rows' gradients sum in
        the order of a separate table: the same numbers bitwise."""
        self._ensure_built()
        features = list(features)
        tables = [self._feature_table[f] for f in features]
        if len(set(tables)) < len(tables) and training is not False:
            # Inference may share tables: rows are rows. Training may not:
            # a shared table's gradients must arrive in the order of
            # separate lookups (latest feature first, as in `call`).
            raise ValueError(
                f"ALPTEmbeddingGroup '{self.name}': lookup_matrix takes "
                "features of distinct tables when training (use the "
                "group's call for shared tables, or training=False). "
                f"Received: features {features}")
        ids = ids if isinstance(ids, tf.Tensor) else tf.convert_to_tensor(ids)
        if ids.shape.rank != 2 or ids.shape[1] not in (None, len(features)):
            raise ValueError(
                f"ALPTEmbeddingGroup '{self.name}': lookup_matrix takes ids "
                f"[batch, {len(features)}] (one column per feature). "
                f"Received: ids of shape {ids.shape}")
        local = integer_ids(ids, f"ALPTEmbeddingGroup '{self.name}'")
        spec = self.group_spec
        limits = [spec.tables[t].input_dim for t in tables]
        # A free bitcast: negative ids wrap to huge unsigned values. Each
        # column's largest id against its table's input_dim: one column
        # reduction and F comparisons, not a broadcast compare of [B, F].
        unsigned = tf.bitcast(local, tf.uint64)
        bounds = tf.constant(limits, tf.uint64)
        in_range = tf.reduce_max(unsigned, axis=0) < bounds

        def fail():
            bad = tf.logical_not(unsigned < bounds)
            # The column of the first bad id (row-major).
            row = tf.argmax(tf.cast(tf.reduce_any(bad, axis=1), tf.int32),
                            output_type=tf.int32)
            first = tf.argmax(tf.cast(tf.gather(bad, row), tf.int32),
                              output_type=tf.int32)
            names = [spec.tables[t].name for t in tables]
            return self._range_failure(
                local, tf.gather(tf.constant(features), first),
                tf.gather(tf.constant(names), first),
                tf.gather(tf.constant(limits, tf.int64), first),
                tf.boolean_mask(local, bad))

        checked = tf.cond(tf.reduce_all(in_range),
                          lambda: tf.identity(local), fail)
        offsets = tf.constant([spec.offsets[t] for t in tables], tf.int64)
        global_ids = tf.reshape(checked + offsets, [-1])
        table_index = None
        if not spec.per_row:  # each row's Δ: its table's
            table_index = tf.reshape(tf.broadcast_to(
                tf.constant(tables, tf.int32), tf.shape(local)), [-1])
        rows = self._lookup(global_ids, training, table_index)
        return tf.reshape(rows, tf.concat(
            [tf.shape(local), [self.output_dim]], axis=0))

    def _range_failure(self, local, feature, table, input_dim, bad_ids):
        """The failing branch of an id check: raises naming the feature,
        its table and `input_dim`, and the first 10 offending ids."""
        message = tf.strings.format(
            f"ALPTEmbeddingGroup '{self.name}': ids must be in "
            "[0, input_dim) of their table. Received out-of-range ids "
            "for feature {} (table {}, input_dim={}); first 10: {}",
            [feature, table, input_dim, bad_ids[:10]], summarize=10)
        check = fail_check([message])
        with tf.control_dependencies([check]):
            return tf.identity(local)

    def _as_int64(self, feature, flat):
        # Float ids only if whole numbers, as in `ALPTEmbedding`.
        return integer_ids(
            flat, f"ALPTEmbeddingGroup '{self.name}' (feature {feature!r})")

    def _checked_global_ids(self, local, table_index, sizes,
                            feature_names):
        """Global ids of `local` ids `[N]`: each checked against its own
        table's `input_dim` (one comparison for the group), then offset.
        A failure names the feature and table of the first offending id."""
        spec = self.group_spec
        limits = tf.constant([t.input_dim for t in spec.tables], tf.uint64)
        in_range = (tf.bitcast(local, tf.uint64) <
                    tf.gather(limits, table_index))
        offsets = tf.constant(spec.offsets[:-1], tf.int64)

        def fail():
            bad = tf.logical_not(in_range)
            first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
            feature_index = tf.repeat(tf.range(len(feature_names)), sizes)
            table = tf.gather(table_index, first)
            return self._range_failure(
                local,
                tf.gather(tf.constant(feature_names),
                          tf.gather(feature_index, first)),
                tf.gather(tf.constant([t.name for t in spec.tables]), table),
                tf.gather(tf.constant([t.input_dim for t in spec.tables],
                                      tf.int64), table),
                tf.boolean_mask(local, bad))

        checked = tf.cond(tf.reduce_all(in_range),
                          lambda: tf.identity(local), fail)
        return checked + tf.gather(offsets, table_index)

    def _shape(self, ids, rows, combiner):
        """`rows` `[n, D]` of one feature back in the shape of its `ids`,
        reduced by `combiner` as `ALPTEmbedding` does."""
        if isinstance(ids, tf.RaggedTensor):
            embedded = ids.with_flat_values(rows)
            if combiner is None:
                return embedded
            counts = tf.reduce_sum(
                tf.ones_like(ids, dtype=rows.dtype), axis=-1)[..., None]
            return combine(tf.reduce_sum(embedded, axis=-2), counts, combiner)
        out_shape = tf.concat(
            [tf.shape(ids, out_type=tf.int32), [self.output_dim]], axis=0)
        embedded = tf.reshape(rows, out_shape)
        if combiner is None:
            return embedded
        if ids.shape.rank is not None and ids.shape.rank < 1:
            raise ValueError(
                "A `combiner` reduces the last id axis, so ids need rank >= 1."
                f" Received: ids of shape {ids.shape}")
        counts = tf.cast(tf.shape(ids)[-1], embedded.dtype)
        return combine(tf.reduce_sum(embedded, axis=-2), counts, combiner)

    def compute_output_shape(self, input_shape):
        def one(feature, shape):
            shape = tuple(shape)
            if self._tables[self._feature_table[feature]].combiner:
                shape = shape[:-1]
            return shape + (self.output_dim,)

        if isinstance(input_shape, dict):
            return _keras.output_shape(
                {f: one(f, input_shape[f]) for f in self.features})
        return _keras.output_shape([one(f, s) for f, s in zip(
            self.features, input_shape, strict=True)])

    # ------------------------------------------------------ float interface
    def _rows_of(self, table):
        index = self.table_names.index(table) if table in self.table_names \
            else None
        if index is None:
            raise KeyError(
                f"No table {table!r} in group '{self.name}'. Received: "
                f"table={table!r}; tables: {self.table_names}")
        return index, self.offsets[index], self.offsets[index + 1]

    def unpacked_codes(self, table):
        """Codes of logical `table` as int8 `[input_dim, output_dim]`."""
        self._ensure_built()
        _, start, stop = self._rows_of(table)
        ids = tf.range(start, stop, dtype=tf.int64)
        return tf.cast(self._table.storage.read_rows(ids), tf.int8)

    def table_step_sizes(self, table):
        """Δ of logical `table`: `[input_dim, 1]` or `[1, 1]`."""
        self._ensure_built()
        index, start, stop = self._rows_of(table)
        steps = tf.convert_to_tensor(self.step_sizes)
        if self.group_spec.per_row:
            return steps[start:stop]
        return steps[index:index + 1]

    def dequantized_table(self, table):
        """The float32 rows `Δ · ŵ` of logical `table`."""
        return quantizers.dequantize(self.unpacked_codes(table),
                                     self.table_step_sizes(table))

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)  # from the tables
        config.update({
            "tables": [dict(t.config) for t in self._tables],
            "features": dict(self.features),
        })
        return config


def _as_list(value, argument):
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(
        f"`{argument}` must be a list. Received: {argument} of type "
        f"{type(value).__name__}")


def stack(layers):
    """Groups `layers` (`ALPTEmbedding`s) by `stacking_key`, keeping their
    order: a list of lists, each a group that can share one
    `ALPTEmbeddingGroup`."""
    groups = {}
    for layer in layers:
        groups.setdefault(stacking_key(layer), []).append(layer)
    return list(groups.values())


__all__ = ["ALPTEmbeddingGroup", "stack", "stacking_key"]
