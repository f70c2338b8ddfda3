"""Installs `alpt_keras`, with `models/`, `export/` and `cli/` as its
subpackages."""

from setuptools import setup

setup(
    name="alpt_keras",
    version="0.1.0",
    description=(
        "Adaptive low-precision (ALPT) embedding tables for TensorFlow/Keras "
        "CTR models, trained and served as integer codes."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=["alpt_keras", "alpt_keras.update", "alpt_keras.kernels",
              "alpt_keras.models",
              "alpt_keras.export", "alpt_keras.cli"],
    # The kernels' C++ source, compiled on first use (alpt_keras/kernels).
    package_data={"alpt_keras.kernels": ["*.cc"]},
    package_dir={
        "alpt_keras": "alpt_keras",
        "alpt_keras.models": "models",
        "alpt_keras.export": "export",
        "alpt_keras.cli": "cli",
    },
    # Versions checked together on CPU (TF 2.21 era); TFRS needs tf_keras.
    install_requires=[
        "tensorflow==2.21.0",
        "tf-keras==2.21.0",
        "keras==3.15.1",
        "tensorflow-recommenders==0.7.7",
        "tensorflow-serving-api==2.21.0",
        # Keras 3 cross/dot interaction layers (TFRS serves tf_keras).
        "keras-rs==0.4.0",
        # alpt-train --tensorboard (TensorFlow no longer depends on it).
        "tensorboard==2.21.0",
        "numpy>=1.26,<2.5",
    ],
    extras_require={
        "test": ["pytest==9.0.3", "pytest-timeout==2.4.0", "ruff==0.17.6",
                 "matplotlib==3.10.7"],
        # The accuracy benchmark's plot.
        "bench": ["matplotlib==3.10.7"],
        # The FBGEMM peer of benchmarks/embedding_step.py; best installed in
        # its own environment (`--peer-python`). PyPI's Linux torch wheel
        # is the CUDA build; the CPU build is torch==2.13.0+cpu.
        "peer": ["torch==2.13.0", "fbgemm-gpu-cpu==1.8.0", "numpy"],
    },
    entry_points={"console_scripts": [
        "alpt-train=alpt_keras.cli:main",
        "alpt-export=alpt_keras.export.cli:main",
        "alpt-evaluate=alpt_keras.cli.evaluate:main",
    ]},
    license="Apache-2.0",
)
