"""CTR models and data pipelines, installed as `alpt_keras.models`.

Models are assembled from parts: `FeatureEmbedding` (per-feature tables from
`FeatureConfig`/`TableConfig`), an interaction layer and an `MLP`. Presets:
`build_dnn`, `build_dcn`, `build_deepfm`, `build_ipnn`, `build_dlrm`,
`build_wide_deep` (all `build_ctr_model(features, model=...)`).
"""

from alpt_keras.models.ctr_models import (
    SUPPORTED_MODELS,
    build_ctr_model,
    build_dcn,
    build_deepfm,
    build_dlrm,
    build_dnn,
    build_ipnn,
    build_wide_deep,
    feature_inputs,
)
from alpt_keras.models.feature_embedding import FeatureEmbedding
from alpt_keras.models.features import (
    EMBEDDING_KINDS,
    FeatureConfig,
    TableConfig,
    simple_features,
)
from alpt_keras.models.layers import (
    MLP,
    FactorizationMachine,
    FieldDotInteraction,
    InnerProducts,
    SumFields,
)
from alpt_keras.models.raw_features import RawFeatures
from alpt_keras.models.synthetic import (
    SyntheticCTR,
    criteo_like_synthetic,
    make_synthetic_ctr,
)

__all__ = [
    "EMBEDDING_KINDS",
    "MLP",
    "SUPPORTED_MODELS",
    "FactorizationMachine",
    "FeatureConfig",
    "FeatureEmbedding",
    "FieldDotInteraction",
    "InnerProducts",
    "RawFeatures",
    "SumFields",
    "SyntheticCTR",
    "TableConfig",
    "build_ctr_model",
    "build_dcn",
    "build_deepfm",
    "build_dlrm",
    "build_dnn",
    "build_ipnn",
    "build_wide_deep",
    "criteo_like_synthetic",
    "feature_inputs",
    "make_synthetic_ctr",
    "simple_features",
]
