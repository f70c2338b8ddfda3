"""The layer test harnesses Keras and tf_keras run on their own layers
(issue 16): Keras 3's `TestCase.run_layer_test` (serialization, symbolic
and eager calls, weight counts, training, mixed precision) and tf_keras's
`test_utils.layer_test` (config round trip, Functional model,
`compute_output_shape`, training)."""

import numpy as np
import pytest

from alpt_keras import IS_KERAS_3, ALPTEmbedding
from alpt_keras.models.layers import (
    MLP,
    FactorizationMachine,
    FieldDotInteraction,
    InnerProducts,
    SumFields,
)

# (layer class, constructor kwargs, input shape, expected output shape,
#  trainable weights, non-trainable weights, plain-optimizer training)
# Float layers train with any Keras optimizer; ALPT tables need
# ALPTOptimizer (a plain one fails the step by design), so the harnesses'
# own training check is off for them.
CASES = {
    "mlp": (MLP, {"units": [8, 4]}, (3, 5), (3, 4), 4, 0, True),
    "mlp_batch_norm": (MLP, {"units": [8, 4], "batch_norm": True},
                       (3, 5), (3, 4), 8, 4, True),
    "mlp_dropout": (MLP, {"units": [6], "dropout": 0.25, "seed": 3},
                    (3, 5), (3, 6), 2, 0, True),
    "field_dot": (FieldDotInteraction, {}, (3, 4, 5), (3, 6), 0, 0, True),
    "inner_products": (InnerProducts, {}, (3, 4, 5), (3, 6), 0, 0, True),
    "factorization_machine": (FactorizationMachine, {}, (3, 4, 5), (3, 1),
                              0, 0, True),
    "sum_fields": (SumFields, {}, (3, 4, 1), (3, 1), 0, 0, True),
    # codes (int8) + Δ: Δ is trainable; the codes take sparse row updates
    # from ALPTOptimizer, which Keras counts as non-trainable.
    "alpt_embedding": (ALPTEmbedding, {"input_dim": 20, "output_dim": 4,
                                       "seed": 0}, (3, 2), (3, 2, 4), None,
                       None, False),
    "alpt_embedding_packed_mean": (
        ALPTEmbedding, {"input_dim": 20, "output_dim": 6, "num_bits": 4,
                        "storage": "packed", "combiner": "mean", "seed": 0},
        (3, 2), (3, 6), None, None, False),
}


def _input(cls, kwargs, shape):
    rng = np.random.default_rng(0)
    if cls is ALPTEmbedding:
        return rng.integers(0, kwargs["input_dim"], shape).astype("int64")
    return rng.standard_normal(shape).astype("float32")


if IS_KERAS_3:
    from keras.src import testing

    class TestKeras3Harness(testing.TestCase):
        def _case(self, name):
            cls, kwargs, shape, out, trainable, frozen, train = CASES[name]
            self.run_layer_test(
                cls, init_kwargs=kwargs,
                input_data=_input(cls, kwargs, shape),
                expected_output_shape=out,
                expected_num_trainable_weights=trainable,
                expected_num_non_trainable_weights=frozen,
                run_training_check=train)

        def test_mlp(self):
            self._case("mlp")

        def test_mlp_batch_norm(self):
            self._case("mlp_batch_norm")

        def test_mlp_dropout(self):
            self._case("mlp_dropout")

        def test_field_dot(self):
            self._case("field_dot")

        def test_inner_products(self):
            self._case("inner_products")

        def test_factorization_machine(self):
            self._case("factorization_machine")

        def test_sum_fields(self):
            self._case("sum_fields")

        def test_alpt_embedding(self):
            self._case("alpt_embedding")

        def test_alpt_embedding_packed_mean(self):
            self._case("alpt_embedding_packed_mean")

else:

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_tf_keras_layer_test(name):
        from tf_keras.src.testing_infra import test_utils

        cls, kwargs, shape, out, _, _, train = CASES[name]
        data = _input(cls, kwargs, shape)
        result = test_utils.layer_test(
            cls, kwargs=kwargs, input_data=data,
            input_dtype=str(data.dtype),
            expected_output_shape=(None,) + out[1:],  # symbolic batch
            expected_output_dtype="float32", validate_training=train)
        assert result.shape == out
