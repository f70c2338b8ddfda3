"""`FeatureEmbedding`: a dict of categorical ids -> stacked field embeddings."""

import tensorflow as tf

from alpt_keras import ALPTEmbedding, ALPTEmbeddingGroup
from alpt_keras.compat import keras, output_shape, register
from alpt_keras.group import stack
from alpt_keras.models.features import FeatureConfig
from alpt_keras.table import combine
from alpt_keras.validation import check_bool


@register
class FeatureEmbedding(keras.layers.Layer):
    """Looks up every feature in its table and stacks the rows.

    One-hot features take ids `[B]`; multi-hot features take `[B, max_ids]`
    where `-1` marks an empty slot (anywhere in the row), reduced with their
    combiner. Features naming the same table share it. All tables must
    have the same width `D`.

    With `stack_tables=True` (the default), ALPT tables that can share
    physical variables (same width, bits, storage, Δ mode, rounding,
    learning of Δ; `alpt_keras.group.stacking_key`) are stacked into one
    `alpt_keras.ALPTEmbeddingGroup`: one lookup and one update chain per
    group instead of per table, with bitwise the same numbers as separate
    tables. Float32 tables stay `keras.layers.Embedding` layers.

    Args:
        features: list of `FeatureConfig` (or their configs).
        stack_tables: bool. Stack compatible ALPT tables. Defaults to
            `True`.
        **kwargs: base layer arguments.

    Call takes a dict `{feature name: ids}` (extra keys are ignored), or a
    list of id tensors in the order of `features`, and returns float
    `[B, F, D]` in the order of `features`.

    Example:

    >>> from alpt_keras.models.features import simple_features
    >>> layer = FeatureEmbedding(simple_features({"user": 10, "item": 20}))
    >>> layer({"user": tf.constant([1, 2]), "item": tf.constant([3, 4])}).shape
    TensorShape([2, 2, 16])
    >>> [g.table_names for g in layer.groups]
    [['user', 'item']]
    """

    def __init__(self, features, stack_tables=True, **kwargs):
        super().__init__(**kwargs)
        self.features = [
            f if isinstance(f, FeatureConfig) else FeatureConfig.from_config(f)
            for f in features
        ]
        if not self.features:
            raise ValueError("`features` must not be empty. Received: []")
        self.stack_tables = check_bool("stack_tables", stack_tables)
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Feature names must be unique. Received: {names}"
            )
        tables = {}
        for feature in self.features:
            config = feature.table
            known = tables.get(config.name)
            if known is not None and known[0] != config:
                raise ValueError(
                    f"Features sharing table {config.name!r} must use the "
                    f"same TableConfig. Received: {known[0]} and {config}"
                )
            if known is None:
                # The tables follow this layer's dtype policy (mixed
                # precision: rows dequantize into the compute dtype).
                tables[config.name] = (config, config.make_layer(
                    dtype=self.dtype_policy))
        widths = {c.embedding_dim for c, _ in tables.values()}
        if len(widths) != 1:
            raise ValueError(
                "All tables must have the same `embedding_dim` to be "
                f"stacked. Received: {sorted(widths)}"
            )
        self.embedding_dim = widths.pop()
        self.table_configs = [c for c, _ in tables.values()]
        # A list attribute, so both Keras flavours track the sublayers:
        # one layer per table, where separate tables would be, so files
        # keep one layout whether tables are stacked or not.
        self.tables = [layer for _, layer in tables.values()]
        # Stacked ALPT tables: one ALPTEmbeddingGroup per compatible set;
        # their `ALPTEmbedding`s above stay as views (no variables) that
        # save and load each table's rows.
        alpt = [layer for layer in self.tables
                if isinstance(layer, ALPTEmbedding)]
        members = [m for m in stack(alpt) if len(m) > 1] \
            if self.stack_tables else []
        self.groups = [
            ALPTEmbeddingGroup.stack_members(
                m, name=f"{self.name}_group_{i}",
                features={f.name: f.table.name for f in self.features
                          if f.table.name in {layer.name for layer in m}})
            for i, m in enumerate(members)]
        self._index = {c.name: i for i, c in enumerate(self.table_configs)}

    def table_for(self, feature_name):
        """The table layer of `feature_name` (for a stacked table, its
        `ALPTEmbedding` view: `.stacked_in` is the group)."""
        return self.tables[self._index[self._feature(feature_name)
                                       .table.name]]

    def _feature(self, feature_name):
        for feature in self.features:
            if feature.name == feature_name:
                return feature
        raise KeyError(f"Unknown feature {feature_name!r}")

    def _matrix_layer(self, training):
        """The layer that looks every feature up as one `[B, F]` id matrix,
        or `None`. Every feature must be one-hot, and either in one group
        of distinct tables (the common CTR case), or, in inference
        (`training=False`) only, in one group holding a shared table or one
        table layer (ALPT or float, no combiner) shared by all. Training
        keeps one lookup per feature of a shared table: the order of its
        gradients is part of its numbers."""
        if any(f.max_ids is not None for f in self.features):
            return None
        if len(self.groups) == 1 and \
                len(self.groups[0].features) == len(self.features):
            group = self.groups[0]
            if not group.shares_tables or training is False:
                return group
            return None
        if training is False and not self.groups and len(self.tables) == 1 \
                and len(self.features) > 1 and \
                getattr(self.tables[0], "combiner", None) is None:
            return self.tables[0]
        return None

    def build(self, input_shape=None):
        for layer in list(self.groups) + list(self.tables):
            if not layer.built:
                layer.build((None,))
        self.built = True

    def call(self, inputs, training=None):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(self.features):
                raise ValueError(
                    f"FeatureEmbedding '{self.name}' takes a dict, or a list "
                    f"of {len(self.features)} id tensors (features "
                    f"{[f.name for f in self.features]}). Received: a list "
                    f"of {len(inputs)}")
            inputs = {f.name: ids for f, ids in
                      zip(self.features, inputs, strict=True)}
        if not isinstance(inputs, dict):
            raise TypeError(
                f"FeatureEmbedding '{self.name}' takes a dict feature name "
                "-> ids, or a list in the order of `features`. Received: "
                f"{type(inputs).__name__}")
        missing = [f.name for f in self.features if f.name not in inputs]
        if missing:
            raise ValueError(
                f"Missing features {missing}. "
                f"Received feature keys: {sorted(inputs)}"
            )
        # The ids each feature looks up: [B] one-hot, or the flat values of
        # its bags. -1 is padding wherever it stands; other negative ids
        # still reach the table, which rejects them.
        flat_ids, bags = {}, {}
        for feature in self.features:
            ids = inputs[feature.name]
            if feature.max_ids is None:
                flat_ids[feature.name] = tf.reshape(ids, [-1])
            else:
                bag = tf.ragged.boolean_mask(ids, tf.not_equal(ids, -1))
                bags[feature.name] = bag
                flat_ids[feature.name] = bag.flat_values
        layer = self._matrix_layer(training)
        if layer is not None:
            # One [B, F] id matrix, looked up in O(1) ops whatever F is.
            names = [f.name for f in self.features]
            columns = [flat_ids[n] for n in names]
            group = isinstance(layer, ALPTEmbeddingGroup)
            if len({c.dtype for c in columns}) == 1:
                ids = tf.stack(columns, axis=1)
                if group:
                    return layer.lookup_matrix(names, ids, training=training)
                if isinstance(layer, ALPTEmbedding):
                    return layer(ids, training=False)
                return layer(ids)
            if group:
                # Mixed id dtypes: per feature, rows come out
                # feature-major, [F·B, D] -> [B, F, D].
                rows, _ = layer.lookup_flat(names, columns,
                                            training=training)
                batch = tf.shape(columns[0])[0]
                return tf.transpose(tf.reshape(
                    rows, [len(names), batch, self.embedding_dim]),
                    [1, 0, 2])
        rows = {}
        for group in self.groups:
            rows.update(group({f: flat_ids[f] for f in group.features},
                              training=training))
        for feature in self.features:
            if feature.name in rows:
                continue
            layer = self.tables[self._index[feature.table.name]]
            if isinstance(layer, ALPTEmbedding):
                rows[feature.name] = layer(flat_ids[feature.name],
                                           training=training)
            else:
                rows[feature.name] = layer(flat_ids[feature.name])
        columns = []
        for feature in self.features:
            if feature.max_ids is None:
                columns.append(rows[feature.name])  # (B, D)
                continue
            bag = bags[feature.name]
            sums = tf.reduce_sum(bag.with_flat_values(rows[feature.name]),
                                 axis=1)
            counts = bag.row_lengths()[:, None]
            columns.append(combine(sums, counts, feature.combiner))  # (B, D)
        return tf.stack(columns, axis=1)  # (B, F, D)

    def compute_output_shape(self, input_shape):
        shapes = list(input_shape.values()) if isinstance(input_shape, dict) \
            else input_shape
        batch = None
        if isinstance(shapes, (list, tuple)) and shapes and not isinstance(
                shapes[0], (int, type(None))):
            first = shapes[0]
            first = first.as_list() if hasattr(first, "as_list") else first
            batch = first[0] if first else None
        return output_shape((batch, len(self.features), self.embedding_dim))

    def get_config(self):
        config = super().get_config()
        config["features"] = [f.get_config() for f in self.features]
        config["stack_tables"] = self.stack_tables
        return config
