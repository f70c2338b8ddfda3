"""CTR models built from parts: DNN, DCN-v2, DeepFM, IPNN, DLRM, Wide&Deep.

Every model is a functional `keras.Model` assembled from the same parts: a
`FeatureEmbedding` over the categorical features, an interaction, an `MLP`
and a logit, so it trains with `compile`/`fit` and saves/loads like any
Keras model in both flavours. Outputs are click probabilities `[B, 1]`; the
logit is the layer named `"logit"`.
"""

import dataclasses

from alpt_keras.compat import keras
from alpt_keras.models.feature_embedding import FeatureEmbedding
from alpt_keras.models.features import FeatureConfig
from alpt_keras.models.layers import (
    MLP,
    FactorizationMachine,
    FieldDotInteraction,
    InnerProducts,
    SumFields,
    cross_layer,
)

SUPPORTED_MODELS = ("dnn", "dcn", "deepfm", "ipnn", "dlrm", "wide_deep")


def feature_inputs(features):
    """`keras.Input`s named after the features: int64 `[B]` or `[B, L]`."""
    return {
        f.name: keras.Input(
            shape=() if f.max_ids is None else (f.max_ids,),
            dtype="int64",
            name=f.name,
        )
        for f in features
    }


def linear_features(features):
    """First-order (wide) weights: a 1-wide table per table, per-table Δ."""
    out = []
    for f in features:
        table = dataclasses.replace(
            f.table, name=f"{f.table.name}_linear", embedding_dim=1,
            step_size="table")
        out.append(dataclasses.replace(f, table=table))
    return out


def build_ctr_model(
    features,
    model="dnn",
    hidden_units=(1024, 512, 256),
    batch_norm=True,
    dropout=0.0,
    num_cross_layers=3,
    seed=0,
    name=None,
    stack_tables=True,
):
    """Builds a CTR model over categorical `features`.

    Args:
        features: list of `FeatureConfig`.
        model: one of `SUPPORTED_MODELS`:
            - `"dnn"`: MLP over the concatenated embeddings.
            - `"dcn"`: DCN-v2, `num_cross_layers` cross layers in parallel
              with the MLP, concatenated before the logit.
            - `"deepfm"`: linear + factorization machine + MLP.
            - `"ipnn"`: MLP over embeddings and all pairwise inner products.
            - `"dlrm"`: MLP over embeddings and pairwise dot products (no
              dense features: the paper's pipelines bucketize numerics).
            - `"wide_deep"`: linear (wide) + MLP (deep).
        hidden_units: widths of the MLP. Defaults to the paper's
            `(1024, 512, 256)`.
        batch_norm: bool. BatchNorm in the MLP (the paper's setting).
        dropout: float in [0, 1).
        num_cross_layers: int, for `"dcn"`.
        seed: int. Seeds the dense initializers.
        name: model name. Defaults to `model`.
        stack_tables: bool. Stack compatible ALPT tables into one physical
            table each (`FeatureEmbedding`); the same numbers, one update
            chain per group. Defaults to `True`.

    Returns:
        A `keras.Model` mapping the feature dict to click probabilities.
    """
    if model not in SUPPORTED_MODELS:
        raise ValueError(
            f"`model` must be one of {SUPPORTED_MODELS}. "
            f"Received: model={model!r}"
        )
    features = [f if isinstance(f, FeatureConfig)
                else FeatureConfig.from_config(f) for f in features]
    inputs = feature_inputs(features)
    embedded = FeatureEmbedding(features, stack_tables=stack_tables,
                                name="embedding")(inputs)
    flat = keras.layers.Flatten(name="flatten")(embedded)  # (B, F*D)
    mlp = MLP(hidden_units, batch_norm=batch_norm, dropout=dropout,
              seed=seed, name="mlp")
    dense_init = keras.initializers.GlorotUniform(seed=seed + 1000)
    terms = []
    if model == "dnn":
        top = mlp(flat)
    elif model == "dcn":
        crossed = flat
        for i in range(num_cross_layers):
            crossed = cross_layer(name=f"cross_{i}")(flat, crossed)
        top = keras.layers.Concatenate(name="cross_and_deep")(
            [crossed, mlp(flat)])
    elif model == "ipnn":
        products = InnerProducts(name="inner_products")(embedded)
        top = mlp(keras.layers.Concatenate(name="product_layer")(
            [flat, products]))
    elif model == "dlrm":
        dots = FieldDotInteraction(name="dot_interaction")(embedded)
        top = mlp(keras.layers.Concatenate(name="interaction")([flat, dots]))
    else:  # deepfm, wide_deep
        top = mlp(flat)
    if model in ("deepfm", "wide_deep"):
        linear = FeatureEmbedding(linear_features(features),
                                  stack_tables=stack_tables,
                                  name="linear_embedding")(inputs)
        terms.append(SumFields(name="linear")(linear))
    if model == "deepfm":
        terms.append(FactorizationMachine(name="fm")(embedded))
    deep_logit = keras.layers.Dense(
        1, kernel_initializer=dense_init, name="deep_logit")(top)
    logit = deep_logit if not terms else keras.layers.Add(name="logit_sum")(
        [deep_logit] + terms)
    # float32 whatever the dtype policy (mixed precision computes the rest
    # in bfloat16/float16): the loss and the served probability need it.
    logit = keras.layers.Activation("linear", name="logit",
                                    dtype="float32")(logit)
    probability = keras.layers.Activation("sigmoid", name="probability",
                                          dtype="float32")(logit)
    return keras.Model(inputs, probability, name=name or model)


def _preset(model):
    def build(features, **kwargs):
        return build_ctr_model(features, model=model, **kwargs)

    build.__name__ = f"build_{model}"
    build.__doc__ = (f"`build_ctr_model(features, model={model!r}, ...)`.")
    return build


build_dnn = _preset("dnn")
build_dcn = _preset("dcn")
build_deepfm = _preset("deepfm")
build_ipnn = _preset("ipnn")
build_dlrm = _preset("dlrm")
build_wide_deep = _preset("wide_deep")
