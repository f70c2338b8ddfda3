"""Shared test setup: quiet TensorFlow, two logical CPUs, flavour helpers.

Each Keras flavour runs in its own pytest process (see tests/run_all.sh):
the flavour is fixed when TensorFlow is first imported.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices for MirroredStrategy tests; must happen before any
# op initialises the runtime.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration(),
     tf.config.LogicalDeviceConfiguration()],
)

import alpt_keras  # noqa: E402

FLAVOUR = "keras3" if alpt_keras.IS_KERAS_3 else "tf_keras"


def pytest_report_header(config):
    return f"alpt_keras flavour: {FLAVOUR} (tf.keras -> {tf.keras.__name__})"


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole process.

    Several MirroredStrategy objects in one process reuse collective
    instance keys and abort each other's collectives ("Collective instance
    100 expected type 0 ... got type 2"), so tests share this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(autouse=True)
def _fresh_session():
    alpt_keras._keras.keras.backend.clear_session()
    yield
