"""alpt_keras: low-precision (ALPT) embedding tables for TensorFlow/Keras.

The Keras flavour (Keras 3 or tf_keras) is chosen once, at import, from what
`tf.keras` resolves to; set `TF_USE_LEGACY_KERAS=1` before importing
TensorFlow to use tf_keras (needed by TensorFlow Recommenders).
"""

from alpt_keras import _startup

# Only in the command-line tools: TensorFlow's start-up lines are caught
# (`alpt_keras._startup`). Before anything below imports TensorFlow.
_startup.quiet_tensorflow_import()

from alpt_keras import quantizers, update  # noqa: E402
from alpt_keras._keras import IS_KERAS_3  # noqa: E402
from alpt_keras.callbacks import (  # noqa: E402
    ALPTMonitor,
    NonFiniteStepsError,
    StopOnSkippedSteps,
)
from alpt_keras.embedding import ALPTEmbedding  # noqa: E402
from alpt_keras.group import ALPTEmbeddingGroup  # noqa: E402
from alpt_keras.optimizer import ALPTOptimizer  # noqa: E402
from alpt_keras.saving import load_weights  # noqa: E402
from alpt_keras.sharding import RowPartitioner  # noqa: E402
from alpt_keras.table import TableState, tables  # noqa: E402
from alpt_keras.two_pass import TwoPassTrainStep, step_size_pass, two_pass  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ALPTEmbedding",
    "ALPTEmbeddingGroup",
    "ALPTMonitor",
    "ALPTOptimizer",
    "IS_KERAS_3",
    "NonFiniteStepsError",
    "RowPartitioner",
    "StopOnSkippedSteps",
    "TableState",
    "TwoPassTrainStep",
    "load_weights",
    "quantizers",
    "step_size_pass",
    "tables",
    "two_pass",
    "update",
]

# The model layers (`FeatureEmbedding`, `MLP`, ...) register with Keras when
# imported, so `keras.models.load_model` works after `import alpt_keras`.
from alpt_keras import models  # noqa: E402, F401
