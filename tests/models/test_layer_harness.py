"""The layer test harnesses Keras and tf_keras run on their own layers
(issue 16): Keras 3's `TestCase.run_layer_test` (serialization, symbolic
and eager calls, weight counts, training, mixed precision) and tf_keras's
`test_utils.layer_test` (config round trip, Functional model,
`compute_output_shape`, training).

tf_keras's harness takes one dense input; layers with several, ragged or
sparse inputs go through `harness.structured_layer_test`, the same steps.
Neither harness can train an ALPT table (a plain optimizer fails its step
by design): `harness.alpt_training_check` is their training check with
`ALPTOptimizer`, in both flavours."""

import numpy as np
import pytest
import tensorflow as tf

from alpt_keras import IS_KERAS_3, ALPTEmbedding, ALPTEmbeddingGroup
from alpt_keras.models import FeatureEmbedding
from alpt_keras.models.features import FeatureConfig, TableConfig
from alpt_keras.models.layers import (
    MLP,
    FactorizationMachine,
    FieldDotInteraction,
    InnerProducts,
    SumFields,
)
from tests.models.harness import alpt_training_check, structured_layer_test

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


# ------------------------------------------------ structured inputs
def _ids(*rows):
    return np.array(rows, "int64")


def _table(name, input_dim, **kwargs):
    return ALPTEmbedding(input_dim, 4, seed=len(name), name=name,
                         **kwargs).get_config()


def _features(stack_tables, **table):
    """Three features: `user` one-hot, `item` multi-hot (padded with
    -1), `city` one-hot on a float32 table or an ALPT one."""
    city_kind = table.pop("city_kind", "alpt")
    return {"features": [
        FeatureConfig("user", TableConfig("user", 10, 4, seed=1, **table)),
        FeatureConfig("item", TableConfig("item", 20, 4, seed=2, **table),
                      max_ids=3, combiner="mean"),
        FeatureConfig("city", TableConfig("city", 7, 4, seed=3,
                                          kind=city_kind, **table)),
    ], "stack_tables": stack_tables}


FEATURE_IDS = [_ids(1, 2, 9), _ids([3, 19, -1], [-1, -1, 5], [0, 3, 3]),
               _ids(6, 0, 2)]
FEATURE_ROWS = {"user": [1, 2, 9], "item": [3, 19, 5, 0], "city": [6, 0, 2]}


def _structured():
    """name -> (layer class, kwargs, input data, Keras 3 input flag,
    expected output shape (batch 3), rows each logical table looks up)."""
    ragged = tf.ragged.constant([[1, 2], [3], [4, 5, 6]], dtype=tf.int64)
    sparse = tf.sparse.from_dense(_ids([1, 2, 0], [3, 0, 0], [4, 5, 6]))
    return {
        "alpt_embedding_ragged_mean": (
            ALPTEmbedding, {"input_dim": 20, "output_dim": 4,
                            "combiner": "mean", "seed": 0, "name": "t"},
            ragged, "ragged", (3, 4), {"t": [1, 2, 3, 4, 5, 6]}),
        # A sparse tensor's implicit zeros are not ids: row 0 of the
        # example [3, 0, 0] is not looked up, only stored ones are.
        "alpt_embedding_sparse_sum": (
            ALPTEmbedding, {"input_dim": 20, "output_dim": 4,
                            "combiner": "sum", "seed": 0, "name": "t"},
            sparse, "sparse", (3, 4), {"t": [1, 2, 3, 4, 5, 6]}),
        "group_dense": (
            ALPTEmbeddingGroup, {"tables": [
                _table("user", 10), _table("item", 20, combiner="sum")]},
            [_ids(1, 2, 9), _ids([3, 19], [0, 5], [1, 1])], None,
            [(3, 4), (3, 4)], {"user": [1, 2, 9], "item": [3, 19, 0, 5, 1]}),
        "group_ragged_packed_table_step": (
            ALPTEmbeddingGroup, {"tables": [
                _table(n, v, combiner=c, num_bits=4, storage="packed",
                       step_size="table")
                for n, v, c in (("user", 10, "mean"), ("item", 20, "sqrtn"))]},
            [tf.ragged.constant([[1], [2, 3], [9]], dtype=tf.int64), ragged],
            "ragged", [(3, 4), (3, 4)],
            {"user": [1, 2, 3, 9], "item": [1, 2, 3, 4, 5, 6]}),
        # Two features share table "t"; 2-bit codes.
        "group_sparse_shared_2bit": (
            ALPTEmbeddingGroup, {"tables": [
                _table("t", 20, combiner="sum", num_bits=2)],
                "features": {"a": "t", "b": "t"}},
            [sparse, tf.sparse.from_dense(_ids([7, 0, 0], [8, 9, 0],
                                               [0, 0, 1]))],
            "sparse", [(3, 4), (3, 4)], {"t": [1, 2, 3, 4, 5, 6, 7, 8, 9]}),
        "feature_embedding_stacked": (
            FeatureEmbedding, _features(True), FEATURE_IDS, None,
            (3, 3, 4), FEATURE_ROWS),
        "feature_embedding_separate_packed": (
            FeatureEmbedding, _features(False, num_bits=4, storage="packed"),
            FEATURE_IDS, None, (3, 3, 4), FEATURE_ROWS),
        # A float32 table beside a stacked pair: the inner optimizer
        # trains it; the check follows the ALPT tables.
        "feature_embedding_float32_city": (
            FeatureEmbedding, _features(True, city_kind="float32"),
            FEATURE_IDS, None, (3, 3, 4),
            {k: v for k, v in FEATURE_ROWS.items() if k != "city"}),
    }


STRUCTURED = sorted(_structured())


@pytest.mark.parametrize("name", STRUCTURED)
def test_alpt_training_check(name):
    """The harnesses' training check for ALPT tables: one `fit` step
    through `ALPTOptimizer` moves exactly the rows the batch looks up."""
    cls, kwargs, data, _, _, touched = _structured()[name]
    alpt_training_check(cls(**kwargs), data, touched)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items()
                                        if c[0] is ALPTEmbedding))
def test_alpt_training_check_dense(name):
    cls, kwargs, shape, *_ = CASES[name]
    data = _input(cls, kwargs, shape)
    alpt_training_check(cls(**kwargs, name="t"), data,
                        {"t": np.unique(data)})


def test_alpt_training_check_can_fail():
    """Negative control: a row the batch does not look up, claimed as
    looked up, fails the check (it did not go down)."""
    kwargs = {"input_dim": 20, "output_dim": 4, "seed": 0, "name": "t"}
    data = _ids([1, 2], [3, 4])
    with pytest.raises(AssertionError):
        alpt_training_check(ALPTEmbedding(**kwargs), data,
                            {"t": [1, 2, 3, 4, 5]})


if IS_KERAS_3:

    @pytest.mark.parametrize("name", STRUCTURED)
    def test_keras3_harness_structured(name):
        cls, kwargs, data, flag, out, _ = _structured()[name]
        case = testing.TestCase()
        case.run_layer_test(
            cls, init_kwargs=kwargs, input_data=data,
            input_ragged=flag == "ragged", input_sparse=flag == "sparse",
            expected_output_shape=out, run_training_check=False)

else:

    @pytest.mark.parametrize("name", STRUCTURED)
    def test_tf_keras_structured_layer_test(name):
        cls, kwargs, data, _, out, _ = _structured()[name]
        outs = out if isinstance(out, list) else [out]
        symbolic = [(None,) + shape[1:] for shape in outs]
        result = structured_layer_test(
            cls, kwargs, data, symbolic if isinstance(out, list)
            else symbolic[0])
        got = [np.asarray(r).shape for r in tf.nest.flatten(result)]
        assert got == outs

    class _WrongShape(ALPTEmbedding):
        """Claims one column more than it returns."""

        def compute_output_shape(self, input_shape):
            shape = super().compute_output_shape(input_shape)
            return tf.TensorShape(shape.as_list()[:-1] + [shape[-1] + 1])

    def test_structured_layer_test_can_fail():
        """Negative control: a wrong `compute_output_shape` is caught."""
        _, kwargs, data, *_ = _structured()["alpt_embedding_ragged_mean"]
        with pytest.raises(AssertionError):
            structured_layer_test(_WrongShape, kwargs, data, (None, 4))
