"""MultiWorkerMirroredStrategy: `alpt-train` as 2 worker processes.

Real processes on 127.0.0.1 (tests/cluster.py kills them whatever
happens). Keras 3 `model.fit` cannot run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so training runs in the tf_keras pass and the
Keras 3 pass holds a strict-xfail canary that fails once upstream is fixed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alpt_keras import IS_KERAS_3
from alpt_keras.cli import cluster_from_env
from tests.cluster import (
    alpt_train,
    assert_succeeded,
    cluster_spec,
    read_report,
    run_cluster,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# 4 fields of 300 ids, 20 steps of 256: every row is touched many times.
ARGS = ["-m", "alpt_keras.cli", "--num-examples", "6400", "--num-fields",
        "4", "--vocab-size", "300", "--zipf-exponent", "0", "--batch-size",
        "256", "--epochs", "1", "--hidden-units", "32", "--bits", "4",
        "--learning-rate", "5e-3", "--verbose", "0"]


def _codes(model_path):
    import alpt_keras.models  # noqa: F401  (registers the model's layers)
    from alpt_keras._keras import keras

    model = keras.models.load_model(model_path, compile=False)
    layer = model.get_layer("embedding")
    out = {}
    for table in layer.tables:  # stacked: the group holds the rows
        group = table.stacked_in
        steps = table.step_sizes if group is None else \
            group.table_step_sizes(table.name)
        out[table.name] = (table.unpacked_codes().numpy().astype(int),
                           np.array(steps))
    return out


@pytest.mark.slow
@pytest.mark.skipif(IS_KERAS_3, reason="Keras 3 model.fit fails under "
                    "MultiWorkerMirroredStrategy (keras-team/keras#20585); "
                    "runs in the tf_keras pass")
def test_two_workers_agree_bitwise_and_match_one_process(tmp_path):
    out = tmp_path / "cluster"
    results = run_cluster(cluster_spec(worker=2),
                          ARGS + ["--output-dir", str(out)], str(tmp_path))
    assert_succeeded(results, ["worker-0", "worker-1"])
    chief, other = read_report(out), read_report(out / "worker-1")
    assert chief["cluster"]["num_workers"] == 2
    assert chief["cluster"]["is_chief"] and not other["cluster"]["is_chief"]
    assert chief["config"]["storage"] == "packed"  # auto in a cluster
    assert chief["replicas"] == 2
    # Codes and Δ of every table, bit for bit, on both workers.
    assert chief["table_digests"] == other["table_digests"]
    assert len(chief["table_digests"]) == 4
    # Only the chief writes model files.
    assert sorted(os.listdir(out / "worker-1")) == ["report.json"]

    single = tmp_path / "single"
    assert alpt_train(ARGS + ["--storage", "packed"],
                      single)["table_digests"] != {}
    cluster_codes = _codes(str(out / "model.keras"))
    single_codes = _codes(str(single / "model.keras"))
    changed = 0
    for name, (codes, steps) in cluster_codes.items():
        ref_codes, ref_steps = single_codes[name]
        diff = codes - ref_codes
        print(f"{name}: {np.mean(diff != 0):.4%} of codes differ from one "
              f"process; Δ max rel. diff "
              f"{np.max(np.abs(steps / ref_steps - 1)):.2e}")
        # Same global batches; only float summation order differs (each
        # worker sums its half of the batch, then the all-reduce).
        assert np.mean(diff != 0) <= 1e-3, (name, np.mean(diff != 0))
        assert np.abs(diff).max() <= 1, name
        np.testing.assert_allclose(steps, ref_steps, rtol=1e-5)
        changed += np.sum(codes != _initial_codes(name, codes.shape))
    assert changed > 0.3 * 4 * 300 * 16  # it really trained


def _initial_codes(name, shape):
    """The codes the CLI's table `name` starts from (seed = 0 + field)."""
    from alpt_keras import ALPTEmbedding

    seed = int(name[1:]) - 1  # "C1" -> 0
    layer = ALPTEmbedding(shape[0], shape[1], num_bits=4, seed=seed,
                          name=name)
    layer.build()
    return layer.unpacked_codes().numpy().astype(int)


def test_int8_tables_are_refused_under_multi_worker(tmp_path):
    """Collectives refuse int8: a clear error naming `storage='packed'`
    instead of TF's failure inside the initial-value broadcast."""
    results = run_cluster(cluster_spec(worker=2),
                          [os.path.join(HERE, "int8_refused_worker.py")],
                          str(tmp_path), timeout=180)
    assert_succeeded(results, ["worker-0", "worker-1"])
    assert all("packed ok" in r.log for r in results.values())


class KerasIssue20585(Exception):
    """The known upstream failure, and only it."""


@pytest.mark.skipif(not IS_KERAS_3, reason="canary for Keras 3")
@pytest.mark.xfail(strict=True, raises=KerasIssue20585,
                   reason="keras-team/keras#20585: Keras 3 model.fit under "
                   "MultiWorkerMirroredStrategy fails with a PerReplica "
                   "conversion error. When this XPASSes, upstream is fixed: "
                   "enable Keras 3 in alpt-train and the test above.")
def test_keras3_multi_worker_fit_canary(tmp_path):
    results = run_cluster(cluster_spec(worker=2),
                          [os.path.join(HERE, "keras3_fit_worker.py")],
                          str(tmp_path), timeout=180)
    for result in results.values():
        if result.returncode != 0 and "PerReplica" in result.log:
            raise KerasIssue20585(result.log[-500:])
    # Any other failure is a real one (not the known bug): fail loudly.
    assert_succeeded(results, ["worker-0", "worker-1"])


@pytest.mark.skipif(not IS_KERAS_3, reason="Keras 3 message")
@pytest.mark.parametrize("tasks, chief, issue", [
    (dict(worker=2), "worker", "keras-team/keras#20585"),
    (dict(chief=1, worker=1, ps=1), "chief", "keras-team/keras#18624")])
def test_alpt_train_in_a_keras3_cluster_says_what_to_do(tasks, chief, issue):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster_spec(**tasks),
         "task": {"type": chief, "index": 0}}))
    proc = subprocess.run([sys.executable] + ARGS, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TF_USE_LEGACY_KERAS=1" in proc.stderr
    assert issue in proc.stderr


@pytest.mark.parametrize("raw, message", [
    ("{not json", "TF_CONFIG must be JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG must be JSON"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", '
     '"index": 0}}', "task type 'evaluator'"),
])
def test_bad_tf_config_is_quoted(raw, message):
    with pytest.raises(SystemExit, match=message):
        cluster_from_env({"TF_CONFIG": raw})


def test_tf_config_roles():
    spec = {"worker": ["a:1", "b:2"]}
    roles = [cluster_from_env({"TF_CONFIG": json.dumps(
        {"cluster": spec, "task": {"type": "worker", "index": i}})})
        for i in range(2)]
    assert [r["is_chief"] for r in roles] == [True, False]
    assert all(r["num_workers"] == 2 for r in roles)
    assert cluster_from_env({}) is None
    with_chief = {"chief": ["c:0"], "worker": ["a:1"]}
    role = cluster_from_env({"TF_CONFIG": json.dumps(
        {"cluster": with_chief, "task": {"type": "worker", "index": 0}})})
    assert not role["is_chief"] and role["num_workers"] == 2
    ps = {"chief": ["c:0"], "worker": ["a:1"], "ps": ["p:2", "p:3"]}
    role = cluster_from_env({"TF_CONFIG": json.dumps(
        {"cluster": ps, "task": {"type": "ps", "index": 1}})})
    assert role["kind"] == "parameter_server" and role["num_ps"] == 2
    with pytest.raises(SystemExit, match="needs a 'chief'"):
        cluster_from_env({"TF_CONFIG": json.dumps(
            {"cluster": {"worker": ["a:1"], "ps": ["p:2"]},
             "task": {"type": "worker", "index": 0}})})
