"""The command-line tools, installed as `alpt_keras.cli`.

`alpt-train` (`python -m alpt_keras.cli`) trains, evaluates, saves and
exports a CTR model. It sits above `alpt_keras.models` and
`alpt_keras.export`, the only package that imports both; the core package
never imports it.
"""

from alpt_keras.cli.train import cluster_from_env, main

__all__ = ["cluster_from_env", "main"]
