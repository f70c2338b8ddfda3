"""Loads are validated and atomic (issue 13, item 3): a table refuses
codes outside its `num_bits` range and step sizes that are not finite and
> 0, keeping its values; `alpt_keras.load_weights` leaves the whole model
unchanged when a file does not fit."""

import h5py
import numpy as np
import pytest

import alpt_keras
from alpt_keras import ALPTOptimizer
from alpt_keras._keras import keras
from alpt_keras.models.ctr_models import build_ctr_model
from alpt_keras.models.features import simple_features
from alpt_keras.models.synthetic import make_synthetic_ctr

NAMES = ["f0", "f1", "f2"]


def _model(bits=8, stack_tables=True, sizes=(40, 50, 60), storage="int8"):
    keras.utils.set_random_seed(0)
    features = simple_features(dict(zip(NAMES, sizes, strict=True)),
                               embedding_dim=8, num_bits=bits,
                               storage=storage)
    model = build_ctr_model(features, model="dnn", hidden_units=(8,),
                            stack_tables=stack_tables)
    model.compile(ALPTOptimizer(keras.optimizers.Adam(1e-2)),
                  "binary_crossentropy")
    return model


def _data(n=128):
    d = make_synthetic_ctr(n, num_fields=3, vocab_size=40, seed=0)
    return ({name: d.ids[:, i].astype(np.int64)
             for i, name in enumerate(NAMES)}, d.labels)


def _state(model):
    return [np.array(w).tobytes() for w in model.weights]


def _logical(model):
    """Logical table name -> bytes of its codes and step sizes."""
    return {spec.name: (np.asarray(codes).tobytes(),
                        np.asarray(steps).tobytes())
            for table in alpt_keras.tables(model)
            for spec, codes, steps in table.logical_values()}


def _saved(tmp_path, model, name="m.weights.h5"):
    x, y = _data()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / name)
    model.save_weights(path)
    return path


def _step_size_datasets(path):
    """The h5 datasets holding step sizes (float32 `[V, 1]` next to int8
    codes)."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and {"1", "2"} <= set(obj.keys()):
            codes, steps = obj["1"], obj["2"]
            if codes.dtype == np.int8 and steps.dtype == np.float32 and \
                    steps.ndim == 2 and steps.shape[1] == 1:
                found.append(f"{name}/2")

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


@pytest.mark.parametrize("stack_tables", [True, False])
def test_8_bit_codes_are_refused_by_a_4_bit_table(tmp_path, stack_tables):
    path = _saved(tmp_path, _model(8, stack_tables))
    target = _model(4, stack_tables)
    target(_data()[0])
    before = _state(target)
    with pytest.raises(ValueError, match=r"4-bit codes must be in \[-8, 7\]"
                       r"\. Received: \d+ codes outside"):
        alpt_keras.load_weights(target, path)
    assert _state(target) == before  # every layer, not only the table


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
@pytest.mark.parametrize("stack_tables", [True, False])
def test_step_sizes_that_are_not_finite_and_positive_are_refused(
        tmp_path, bad, stack_tables):
    source = _model(8, stack_tables)
    path = _saved(tmp_path, source)
    datasets = _step_size_datasets(path)
    assert len(datasets) == 3, datasets  # one per logical table
    with h5py.File(path, "r+") as f:
        steps = f[datasets[-1]][...]
        # The h5 path names the layer, not the feature: find the table
        # whose step sizes these are.
        refusing = [name for name, (_, saved) in _logical(source).items()
                    if saved == steps.tobytes()]
        steps[3, 0] = bad
        f[datasets[-1]][...] = steps
    target = _model(8, stack_tables)
    target(_data()[0])
    logical_before = _logical(target)
    with pytest.raises(ValueError, match="step sizes must be finite and > 0"
                       r"\. Received: 1 that are not"):
        target.load_weights(path)  # the table refuses, whatever the loader
    assert len(refusing) == 1, datasets[-1]
    assert _logical(target)[refusing[0]] == logical_before[refusing[0]]
    partly_loaded = _state(target)  # Keras assigned the earlier tables
    with pytest.raises(ValueError, match="step sizes must be finite"):
        alpt_keras.load_weights(target, path)
    assert _state(target) == partly_loaded


def test_load_weights_restores_every_layer_when_a_later_one_fails(tmp_path):
    """Another `input_dim` in the last table: Keras's own `load_weights`
    has overwritten earlier layers by the time it fails; the library's
    `load_weights` puts them back."""
    path = _saved(tmp_path, _model(8, False))
    target = _model(8, False, sizes=(40, 50, 61))
    target(_data()[0])
    before = _state(target)
    with pytest.raises(ValueError, match="shape"):
        alpt_keras.load_weights(target, path)
    assert _state(target) == before
    plain = _model(8, False, sizes=(40, 50, 61))
    plain(_data()[0])
    plain_before = _state(plain)
    with pytest.raises(ValueError):
        plain.load_weights(path)
    # Documented: Keras assigns layer by layer (why the helper exists).
    assert _state(plain) != plain_before


def test_load_weights_loads_a_file_that_fits(tmp_path):
    source = _model(8, True)
    path = _saved(tmp_path, source)
    target = _model(8, False)
    x = _data()[0]
    target(x)
    alpt_keras.load_weights(target, path)
    np.testing.assert_array_equal(target.predict(x, verbose=0),
                                  source.predict(x, verbose=0))


def test_load_model_after_import_alpt_keras_alone(tmp_path):
    """A saved CTR model loads in a process that only ran `import
    alpt_keras` (the model layers register on that import)."""
    import subprocess
    import sys

    model = _model(8, True)
    path = str(tmp_path / "m.keras")
    _saved(tmp_path, model)
    model.save(path)
    x = _data()[0]
    want = model.predict(x, verbose=0)
    np.savez(tmp_path / "x.npz", **x)
    script = (
        "import sys, numpy as np\n"
        "import alpt_keras\n"
        "from alpt_keras.compat import keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], m.predict(x, verbose=0))\n")
    proc = subprocess.run(
        [sys.executable, "-c", script, path, str(tmp_path / "x.npz"),
         str(tmp_path / "p.npy")], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), want)
