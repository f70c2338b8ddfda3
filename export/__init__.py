"""SavedModel / TF Serving export, installed as `alpt_keras.export`.

`export_for_serving(model, base_path, model_name=...)` writes
`<base>/<model_name>/<version>/` with the ALPT tables still integer codes
plus step sizes, dequantized in the graph with stock ops.
"""

from alpt_keras.export.client import (
    GrpcPredictClient,
    RestPredictClient,
    ServingError,
)
from alpt_keras.export.saved_model import (
    IDS_SIGNATURE_KEY,
    SIGNATURE_KEY,
    export_for_serving,
    export_size_report,
    next_version,
    serving_input_signature,
    serving_variables,
)
from alpt_keras.export.serving_files import (
    read_warmup_requests,
    write_model_config,
    write_warmup_requests,
)

__all__ = [
    "GrpcPredictClient",
    "IDS_SIGNATURE_KEY",
    "RestPredictClient",
    "SIGNATURE_KEY",
    "ServingError",
    "export_for_serving",
    "export_size_report",
    "next_version",
    "read_warmup_requests",
    "serving_input_signature",
    "serving_variables",
    "write_model_config",
    "write_warmup_requests",
]
