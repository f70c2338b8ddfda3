"""Under a 2-worker MultiWorkerMirroredStrategy an int8 ALPT table is
refused with a clear error and a packed one builds (run once per worker)."""

import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
from alpt_keras import ALPTEmbedding  # noqa: E402

with strategy.scope():
    try:
        ALPTEmbedding(10, 4, name="t").build()
    except ValueError as error:
        assert "storage='packed'" in str(error), error
        print("int8 refused:", error)
    else:
        raise AssertionError("an int8 table was created under MWMS")
    packed = ALPTEmbedding(10, 4, storage="packed", name="p")
    packed.build()
assert packed.unpacked_codes().shape == (10, 4)
print("packed ok")
