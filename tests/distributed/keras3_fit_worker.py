"""A plain Keras 3 `model.fit` under MultiWorkerMirroredStrategy (no
alpt_keras): the keras-team/keras#20585 canary, run once per worker."""

import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras  # noqa: E402

with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
model.fit(np.ones((64, 3)), np.ones((64, 1)), batch_size=16, verbose=0)
print("fit ok")
