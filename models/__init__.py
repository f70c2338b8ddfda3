"""CTR models and data pipelines, installed as `alpt_keras.models`.

Models and loaders arrive with issue 3; `alpt_keras.models.synthetic` holds
the learnable synthetic id data used by the quick start and the tests.
"""
