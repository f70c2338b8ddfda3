"""Runs an export the way TF Serving does, without importing alpt_keras.

Usage: python serving_check.py VERSION_DIR INPUTS.npz OUTPUTS.npz
Loads the SavedModel into a TF1 Session (tags {"serve"}), feeds the
`serving_default` signature tensors and writes every output, plus the op
types of the graph and its functions, to OUTPUTS.npz.
"""

import sys

import numpy as np
import tensorflow as tf

version_dir, inputs_path, outputs_path = sys.argv[1:4]
assert "alpt_keras" not in sys.modules
inputs = dict(np.load(inputs_path))
with tf.compat.v1.Session(graph=tf.Graph()) as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"],
                                                version_dir)
    signature = meta.signature_def["serving_default"]
    feed = {signature.inputs[name].name: value
            for name, value in inputs.items()}
    fetch = {name: info.name for name, info in signature.outputs.items()}
    try:
        outputs = session.run(fetch, feed)
        error = ""
    except tf.errors.InvalidArgumentError as e:
        outputs, error = {}, e.message
ops = {node.op for node in meta.graph_def.node}
for function in meta.graph_def.library.function:
    ops.update(node.op for node in function.node_def)
assert "alpt_keras" not in sys.modules
np.savez(outputs_path, _ops=np.array(sorted(ops)), _error=np.array(error),
         **outputs)
