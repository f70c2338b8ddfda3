"""tests/cluster.py leaves no child behind, whatever the tasks do."""

import os

import pytest

from tests.cluster import cluster_spec, run_cluster

# Each task writes its pid and waits for every other task's. Worker 0 exits
# with argv[2]; after a success the other workers finish too, after a
# failure they wait "forever" (a hung collective); parameter servers serve
# until stopped. argv[3] is the number of tasks.
TASK = """
import json, os, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
name = f"{task['type']}-{task['index']}"
path = os.path.join(sys.argv[1], name)
open(path + ".tmp", "w").write(str(os.getpid()))
os.rename(path + ".tmp", path + ".pid")
while len([f for f in os.listdir(sys.argv[1]) if f.endswith(".pid")]) < \
        int(sys.argv[3]):  # every task has started
    time.sleep(0.05)
if name == "worker-0":
    sys.exit(int(sys.argv[2]))
if task["type"] == "worker" and sys.argv[2] == "0":
    sys.exit(0)
time.sleep(600)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(directory):
    return [int(open(os.path.join(directory, f)).read())
            for f in os.listdir(directory) if f.endswith(".pid")]


@pytest.mark.parametrize("exit_code", [1, 0])
def test_a_failing_or_finished_task_stops_the_rest(tmp_path, exit_code):
    pids = tmp_path / "pids"
    pids.mkdir()
    results = run_cluster(cluster_spec(worker=2, ps=1),
                          ["-c", TASK, str(pids), str(exit_code), "3"],
                          str(tmp_path), timeout=60)
    assert results["worker-0"].returncode == exit_code
    # After a failure worker 1 would wait forever: killed.
    assert results["worker-1"].returncode == (-9 if exit_code else 0)
    assert results["ps-0"].returncode < 0  # a daemon: always stopped
    found = _pids(pids)
    assert len(found) == 3
    assert not any(_alive(pid) for pid in found)


def test_a_timeout_kills_everything_and_says_who_hung(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = cluster_spec(worker=2)
    hang = TASK.replace("sys.exit(int(sys.argv[2]))", "time.sleep(600)")
    with pytest.raises(TimeoutError, match="worker-1"):
        run_cluster(spec, ["-c", hang, str(pids), "1", "2"],
                    str(tmp_path), timeout=5)
    found = _pids(pids)
    assert len(found) == 2
    assert not any(_alive(pid) for pid in found)
