"""`FeatureEmbedding`: a dict of categorical ids -> stacked field embeddings."""

import tensorflow as tf

from alpt_keras import ALPTEmbedding
from alpt_keras.compat import keras, register
from alpt_keras.models.features import FeatureConfig
from alpt_keras.table import combine


@register
class FeatureEmbedding(keras.layers.Layer):
    """Looks up every feature in its table and stacks the rows.

    One-hot features take ids `[B]`; multi-hot features take `[B, max_ids]`
    where `-1` marks an empty slot (anywhere in the row), reduced with their
    combiner. Features naming
    the same table share it. All tables must have the same width `D`.

    Args:
        features: list of `FeatureConfig` (or their configs).
        **kwargs: base layer arguments.

    Call returns float `[B, F, D]` in the order of `features`.

    Example:

    >>> from alpt_keras.models.features import simple_features
    >>> layer = FeatureEmbedding(simple_features({"user": 10, "item": 20}))
    >>> layer({"user": tf.constant([1, 2]), "item": tf.constant([3, 4])}).shape
    TensorShape([2, 2, 16])
    """

    def __init__(self, features, **kwargs):
        super().__init__(**kwargs)
        self.features = [
            f if isinstance(f, FeatureConfig) else FeatureConfig.from_config(f)
            for f in features
        ]
        if not self.features:
            raise ValueError("`features` must not be empty. Received: []")
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
                tables[config.name] = (config, config.make_layer())
        widths = {c.embedding_dim for c, _ in tables.values()}
        if len(widths) != 1:
            raise ValueError(
                "All tables must have the same `embedding_dim` to be "
                f"stacked. Received: {sorted(widths)}"
            )
        self.embedding_dim = widths.pop()
        self.table_configs = [c for c, _ in tables.values()]
        # A list attribute, so both Keras flavours track the sublayers.
        self.tables = [layer for _, layer in tables.values()]
        self._table_index = {c.name: i for i, c in
                             enumerate(self.table_configs)}

    def table_for(self, feature_name):
        """The table layer of `feature_name`."""
        for feature in self.features:
            if feature.name == feature_name:
                return self.tables[self._table_index[feature.table.name]]
        raise KeyError(f"Unknown feature {feature_name!r}")

    def build(self, input_shape=None):
        for layer in self.tables:
            if not layer.built:
                layer.build((None,))
        self.built = True

    def call(self, inputs, training=None):
        missing = [f.name for f in self.features if f.name not in inputs]
        if missing:
            raise ValueError(
                f"Missing features {missing}. "
                f"Received feature keys: {sorted(inputs)}"
            )
        columns = []
        for feature in self.features:
            table = self.tables[self._table_index[feature.table.name]]
            ids = inputs[feature.name]
            if feature.max_ids is None:
                columns.append(self._lookup(table, tf.reshape(ids, [-1]),
                                            training))  # (B, D)
                continue
            # -1 is padding wherever it stands; other negative ids still
            # reach the table, which rejects them.
            bags = tf.ragged.boolean_mask(ids, tf.not_equal(ids, -1))
            rows = self._lookup(table, bags.flat_values, training)
            sums = tf.reduce_sum(bags.with_flat_values(rows), axis=1)
            counts = bags.row_lengths()[:, None]
            columns.append(combine(sums, counts, feature.combiner))  # (B, D)
        return tf.stack(columns, axis=1)  # (B, F, D)

    @staticmethod
    def _lookup(table, ids, training):
        if isinstance(table, ALPTEmbedding):
            return table(ids, training=training)
        return table(ids)

    def compute_output_shape(self, input_shape):
        return (None, len(self.features), self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config["features"] = [f.get_config() for f in self.features]
        return config
