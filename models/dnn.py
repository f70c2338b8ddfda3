"""A small functional DNN over categorical fields, float32 or ALPT tables.

This is the quick-start model; the component-based CTR models (DNN, DCN,
DeepFM, IPNN, DLRM, Wide&Deep) arrive with issue 3.
"""

from alpt_keras import ALPTEmbedding
from alpt_keras.compat import keras
from alpt_keras.models.features import EMBEDDING_KINDS


def build_dnn(
    num_fields,
    vocab_size,
    embedding="alpt",
    embedding_dim=16,
    hidden_units=(64, 32),
    num_bits=8,
    rounding="stochastic",
    step_size="row",
    seed=0,
    storage="int8",
):
    """A DNN: one shared table for all fields, MLP head, sigmoid output.

    Args:
        num_fields: int. Number of id columns in the `[B, F]` input.
        vocab_size: int. Rows of the shared table.
        embedding: `"float32"` (`keras.layers.Embedding`), `"lpt"` (fixed
            step size) or `"alpt"` (learned step size).
        embedding_dim: int. Row width.
        hidden_units: tuple of int. MLP layer widths.
        num_bits, rounding, step_size, storage: `ALPTEmbedding` settings.
        seed: int. Seeds every initializer.
    """
    if embedding not in EMBEDDING_KINDS:
        raise ValueError(
            f"`embedding` must be one of {EMBEDDING_KINDS}. "
            f"Received: embedding={embedding!r}"
        )
    ids = keras.Input(shape=(num_fields,), dtype="int64", name="ids")
    if embedding == "float32":
        table = keras.layers.Embedding(
            vocab_size,
            embedding_dim,
            embeddings_initializer=keras.initializers.RandomNormal(
                stddev=0.003, seed=seed
            ),
            name="embedding",
        )
    else:
        table = ALPTEmbedding(
            vocab_size,
            embedding_dim,
            num_bits=num_bits,
            rounding=rounding,
            step_size=step_size,
            learn_step_size=embedding == "alpt",
            seed=seed,
            storage=storage,
            name="embedding",
        )
    x = keras.layers.Flatten()(table(ids))
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(
            units,
            activation="relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
        )(x)
    logits = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 99)
    )(x)
    probability = keras.layers.Activation("sigmoid", name="probability")(
        logits
    )
    return keras.Model(ids, probability, name=f"dnn_{embedding}")
