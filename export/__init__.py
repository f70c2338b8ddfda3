"""SavedModel / TF Serving export, installed as `alpt_keras.export`.

`export_for_serving(model, base_path, model_name=...)` writes
`<base>/<model_name>/<version>/` with the ALPT tables still integer codes
plus step sizes, dequantized in the graph with stock ops.
"""

from alpt_keras.export.saved_model import (
    SIGNATURE_KEY,
    export_for_serving,
    export_size_report,
    next_version,
    serving_variables,
)

__all__ = [
    "SIGNATURE_KEY",
    "export_for_serving",
    "export_size_report",
    "next_version",
    "serving_variables",
]
