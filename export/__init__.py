"""SavedModel / TF Serving export, installed as `alpt_keras.export`.

The exporter that keeps low-bit tables arrives with issue 4.
"""
