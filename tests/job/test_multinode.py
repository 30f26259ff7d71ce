"""The trainer on a cluster of several nodes: a head and two worker nodes (Ray's own simulated
cluster, `ray.cluster_utils.Cluster`: each node its own raylet, object store and workers, on this
machine), the placement group SPREAD over them so the two learner ranks sit on different nodes,
and a rollout worker on a worker node SIGKILLed while it generates, then replaced there.

The run is started as a user starts one against a running cluster: `python -m gmai_rl.train`
with RAY_ADDRESS set. The processes are told apart by their parent: Ray's workers are children
of their node's raylet, and Ray titles a busy actor's process `ray::Class.method`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import TEST_SIZE, process_title

pytestmark = [pytest.mark.job, pytest.mark.timeout(1200)]
ray = pytest.importorskip("ray")


def children_titled(parents: set[int], prefix: str) -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, title)} of the processes whose parent is in `parents` and whose title
    starts with `prefix`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent in parents and (title := process_title(int(entry))).startswith(prefix):
            found[int(entry)] = (parent, title)
    return found


class Watcher(threading.Thread):
    """Kills the first rollout worker seen generating on a worker node, and records which nodes
    (raylets) hosted the learner ranks."""

    def __init__(self, raylets: set[int], worker_raylets: set[int]) -> None:
        super().__init__(daemon=True)
        self.raylets, self.worker_raylets = raylets, worker_raylets
        self.killed: tuple[int, int] | None = None  # (pid, its raylet)
        self.before: set[int] = set()
        """The rollout workers' processes at the kill."""
        self.replaced_on_its_node = False
        """A new rollout worker process was seen on the killed one's node afterwards."""
        self.learner_nodes: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            learners = children_titled(self.raylets, "ray::Learner")
            self.learner_nodes |= {parent for parent, _ in learners.values()}
            rollouts = children_titled(self.worker_raylets, "ray::RolloutWorker")
            if self.killed is None:
                for pid, (parent, title) in rollouts.items():
                    if title == "ray::RolloutWorker.generate":
                        os.kill(pid, signal.SIGKILL)
                        self.killed, self.before = (pid, parent), set(rollouts)
                        break
            else:
                node = self.killed[1]
                self.replaced_on_its_node |= any(
                    pid not in self.before and parent == node
                    for pid, (parent, _) in rollouts.items()
                )
            time.sleep(0.005)


@pytest.fixture
def three_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the nodes and the job's driver alike
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def test_a_run_spread_over_three_nodes_replaces_a_rollout_worker_killed_on_another_node(
    three_nodes, tiny_model_dir, synthetic_dir, tmp_path
):
    cluster, workers = three_nodes
    out = tmp_path / "run"
    worker_raylets = {raylet_pid(n) for n in workers}
    watcher = Watcher(worker_raylets | {raylet_pid(cluster.head_node)}, worker_raylets)
    job = [
        f"model.path={tiny_model_dir}",
        "model.build_tiny_if_missing=false",
        f"data.synthetic.dir={synthetic_dir}",
        "data.image_check_cache=null",
        *TEST_SIZE,
        "data.max_eval_items=8",
        "cluster.placement_strategy=SPREAD",
        "cluster.learner_ranks=2",
        "cluster.rollout_workers=2",
        "trainer.steps=4",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        f"trainer.output_dir={out}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    watcher.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gmai_rl.train", *job],
            env=env,
            capture_output=True,
            text=True,
            timeout=1000,
        )
    finally:
        watcher.stop.set()
        watcher.join(timeout=10)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert watcher.killed is not None, "no rollout worker was seen generating on a worker node"
    assert len(watcher.learner_nodes) == 2  # the learner ranks on two different nodes
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [0, 1, 2, 3]
    assert sum(r["rollout_restarts"] for r in rl) == 1
    assert watcher.replaced_on_its_node  # its replacement started in its bundle, on its node
    assert json.loads((out / "eval.json").read_text())["after_rl"]["n"] == 8
    assert Path(out / "final").is_dir()
