"""Local TF clusters for tests: real processes on 127.0.0.1.

Every process runs in its own session (process group); whatever happens —
a failing worker, a timeout, a failing assertion in the test — all groups
are killed before `run_cluster` returns or raises, so no child outlives the
test.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time


def alpt_train(argv, output_dir, timeout=300):
    """Runs `python <argv> --output-dir output_dir` as one plain process
    (the single-process reference of a cluster run); returns its report."""
    proc = subprocess.run(
        [sys.executable] + list(argv) + ["--output-dir", str(output_dir)],
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_report(output_dir)


def read_report(directory):
    """The `report.json` that `alpt-train --output-dir` writes."""
    with open(os.path.join(directory, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def free_ports(count):
    """Ports that were free a moment ago on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_spec(**task_counts):
    """`{"worker": ["127.0.0.1:p", ...], ...}` with fresh ports."""
    ports = iter(free_ports(sum(task_counts.values())))
    return {task: [f"127.0.0.1:{next(ports)}" for _ in range(count)]
            for task, count in task_counts.items()}


@dataclasses.dataclass
class TaskResult:
    task: str
    returncode: int
    log: str


def _kill(process):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def run_cluster(spec, argv, log_dir, env=None, timeout=300,
                daemons=("ps",)):
    """Runs `argv` once per task of `spec` with its TF_CONFIG.

    Tasks listed in `daemons` (parameter servers) never exit by
    themselves; they are stopped once every other task has exited.
    Returns {task name: TaskResult}; raises `TimeoutError` (after killing
    everything) when the others do not finish within `timeout` seconds.
    """
    base_env = dict(os.environ if env is None else env)
    base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    base_env["PYTHONUNBUFFERED"] = "1"
    processes, logs = {}, {}
    try:
        for task_type, addresses in spec.items():
            for index in range(len(addresses)):
                name = f"{task_type}-{index}"
                task_env = dict(base_env, TF_CONFIG=json.dumps({
                    "cluster": spec,
                    "task": {"type": task_type, "index": index}}))
                logs[name] = os.path.join(log_dir, f"{name}.log")
                with open(logs[name], "w") as log:
                    processes[name] = subprocess.Popen(
                        [sys.executable] + list(argv), env=task_env,
                        stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)
        waited = [n for n in processes if n.split("-")[0] not in daemons]
        deadline = time.monotonic() + timeout
        while True:
            codes = {n: processes[n].poll() for n in waited}
            if any(c not in (None, 0) for c in codes.values()):
                break  # one failed: the others would wait forever
            if all(c == 0 for c in codes.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"cluster tasks still running after {timeout} s: "
                    f"{[n for n, c in codes.items() if c is None]}; logs: "
                    f"{_tails(logs)}")
            time.sleep(0.2)
    finally:
        for process in processes.values():
            _kill(process)
    return {n: TaskResult(n, processes[n].returncode, _read(logs[n]))
            for n in processes}


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _tails(logs):
    return {n: _read(p)[-1500:] for n, p in logs.items()}


def assert_succeeded(results, tasks):
    for name in tasks:
        result = results[name]
        assert result.returncode == 0, (
            f"{name} exited with {result.returncode}:\n{result.log[-3000:]}")


def in_process_cluster(num_workers, num_ps):
    """Worker and parameter-server `tf.distribute.Server`s inside this
    process (TF's in-process pattern); returns a cluster resolver for
    `ParameterServerStrategy`. The servers live until the process exits:
    create one cluster per process.
    """
    import tensorflow as tf

    spec = cluster_spec(worker=num_workers, ps=num_ps)
    cluster = tf.train.ClusterSpec(spec)
    config = tf.compat.v1.ConfigProto()
    # Each in-process worker needs its own inter-op thread beyond the
    # coordinator's; with the default (= cores) a 2-core machine deadlocks.
    config.inter_op_parallelism_threads = num_workers + 1
    for i in range(num_workers):
        tf.distribute.Server(cluster, job_name="worker", task_index=i,
                             config=config, protocol="grpc")
    for i in range(num_ps):
        tf.distribute.Server(cluster, job_name="ps", task_index=i,
                             protocol="grpc")
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster, rpc_layer="grpc")
