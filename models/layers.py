"""Interaction layers and the MLP shared by the CTR models.

Cross (DCN-v2) and dot (DLRM) interactions are reused from keras-rs on
Keras 3 and from TFRS on tf_keras; factorization-machine and inner-product
interactions are small enough to write here.
"""

import tensorflow as tf

from alpt_keras.compat import IS_KERAS_3, keras, output_shape, register
from alpt_keras.validation import check_float, check_int


def cross_layer(name=None):
    """A DCN-v2 cross layer `x0 ⊙ (W x + b) + x` for the active flavour."""
    if IS_KERAS_3:
        import keras_rs

        return keras_rs.layers.FeatureCross(name=name)
    import tensorflow_recommenders as tfrs

    return tfrs.layers.dcn.Cross(name=name)


def dot_interaction(name=None, dtype=None):
    """Pairwise dot products of feature vectors (DLRM), upper triangle."""
    if IS_KERAS_3:
        import keras_rs

        return keras_rs.layers.DotInteraction(name=name, dtype=dtype)
    import tensorflow_recommenders as tfrs

    return tfrs.layers.feature_interaction.DotInteraction(name=name,
                                                           dtype=dtype)


def _pairs_shape(input_shape):
    """`[B, F, D]` -> `[B, F(F-1)/2]`: one value per field pair `i < j`."""
    fields = input_shape[1]
    return output_shape((input_shape[0], fields * (fields - 1) // 2))


@register
class FactorizationMachine(keras.layers.Layer):
    """Second-order FM term `½ Σ_d [(Σ_f v_fd)² - Σ_f v_fd²]`, shape `[B, 1]`.

    Example:

    >>> FactorizationMachine()(tf.ones([2, 3, 4])).numpy().ravel().tolist()
    [12.0, 12.0]
    """

    def call(self, embeddings):  # (B, F, D)
        square_of_sum = tf.square(tf.reduce_sum(embeddings, axis=1))  # (B, D)
        sum_of_square = tf.reduce_sum(tf.square(embeddings), axis=1)  # (B, D)
        return 0.5 * tf.reduce_sum(square_of_sum - sum_of_square, axis=1,
                                   keepdims=True)

    def compute_output_shape(self, input_shape):
        return output_shape((input_shape[0], 1))


@register
class InnerProducts(keras.layers.Layer):
    """Inner products of all field pairs `i < j` (IPNN), `[B, F(F-1)/2]`.

    Example:

    >>> InnerProducts()(tf.ones([2, 3, 4])).shape
    TensorShape([2, 3])
    """

    def call(self, embeddings):  # (B, F, D)
        products = tf.matmul(embeddings, embeddings, transpose_b=True)
        num_fields = embeddings.shape[1]
        rows, cols = [], []
        for i in range(num_fields):
            for j in range(i + 1, num_fields):
                rows.append(i)
                cols.append(j)
        index = tf.constant(list(zip(rows, cols, strict=True)), tf.int32)
        # (B, P): gather the upper triangle of every (F, F) product matrix.
        return tf.transpose(tf.gather_nd(
            tf.transpose(products, [1, 2, 0]), index))

    def compute_output_shape(self, input_shape):
        return _pairs_shape(input_shape)


@register
class MLP(keras.layers.Layer):
    """Dense → (BatchNorm) → ReLU → (Dropout) blocks.

    Args:
        units: list of int. Widths of the hidden layers.
        batch_norm: bool. Defaults to `False`.
        dropout: float in [0, 1). Defaults to `0.0`.
        seed: int. Seeds the kernel initializers. Defaults to `0`.
    """

    def __init__(self, units, batch_norm=False, dropout=0.0, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        units = [check_int("units", u, minimum=1) for u in units]
        dropout = check_float("dropout", dropout, 0.0, 1.0)
        self.units, self.batch_norm = units, batch_norm
        self.dropout, self.seed = dropout, seed
        # One flat list: tf_keras saving does not walk lists of lists.
        self.stack = []
        # The sublayers follow this layer's dtype policy (mixed precision).
        policy = self.dtype_policy
        for i, width in enumerate(units):
            self.stack.append(keras.layers.Dense(
                width, kernel_initializer=keras.initializers.GlorotUniform(
                    seed=seed + i), dtype=policy))
            if batch_norm:
                # Synchronized: under Mirrored/MultiWorkerMirrored training
                # the moments are those of the global batch, as in one
                # process (the same as plain BatchNorm without a strategy).
                self.stack.append(keras.layers.BatchNormalization(
                    synchronized=True, dtype=policy))
            self.stack.append(keras.layers.ReLU(dtype=policy))
            if dropout:
                self.stack.append(keras.layers.Dropout(
                    dropout, seed=seed + i, dtype=policy))

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.stack:
            if not layer.built:
                layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        self.built = True

    def call(self, x, training=None):
        for layer in self.stack:
            if isinstance(layer, (keras.layers.BatchNormalization,
                                  keras.layers.Dropout)):
                x = layer(x, training=training)
            else:
                x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        width = self.units[-1] if self.units else input_shape[-1]
        return output_shape(tuple(input_shape[:-1]) + (width,))

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, batch_norm=self.batch_norm,
                      dropout=self.dropout, seed=self.seed)
        return config


@register
class FieldDotInteraction(keras.layers.Layer):
    """`dot_interaction` over the fields of a `[B, F, D]` tensor.

    Example:

    >>> FieldDotInteraction()(tf.ones([2, 3, 4])).shape
    TensorShape([2, 3])
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.interaction = dot_interaction(dtype=self.dtype_policy)

    def call(self, embeddings):  # (B, F, D)
        return self.interaction(tf.unstack(embeddings, axis=1))

    def compute_output_shape(self, input_shape):
        return _pairs_shape(input_shape)


@register
class SumFields(keras.layers.Layer):
    """Sums a `[B, F, 1]` tensor over its fields: `[B, 1]` (linear terms).

    Example:

    >>> SumFields()(tf.ones([2, 3, 1])).numpy().ravel().tolist()
    [3.0, 3.0]
    """

    def call(self, values):
        return tf.reduce_sum(values, axis=1)

    def compute_output_shape(self, input_shape):
        return output_shape((input_shape[0], input_shape[2]))
