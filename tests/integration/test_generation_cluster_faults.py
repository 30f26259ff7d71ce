"""A generation cluster (`Cluster.start_generation`: rollout and reward workers, no learners, as
`gmai-rl eval --ray` starts) when its rollout workers die: a worker SIGKILLed while it
generates hands its prompts to the other, and with none left alive the dead are replaced from
the checkpoint, with no weight-sync group to re-form (faults tier)."""

import os
import signal

import pytest

from gmai_rl.cluster.cluster import Cluster
from gmai_rl.cluster.session import ray_session
from gmai_rl.data import build_prompt
from gmai_rl.feed import load_datasets
from gmai_rl.types import SamplingParams
from support import KillWhen, titled

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]
ray = pytest.importorskip("ray")


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_dead_rollout_workers_of_a_generation_cluster_lose_no_prompt(small_config, tmp_path):
    cfg = small_config(tmp_path, "cluster.rollout_workers=2", "rollout.max_batch_prompts=2")
    prompts = [build_prompt(item) for item in load_datasets(cfg).eval[:8]]
    greedy = SamplingParams(0.0, 1.0, 8, seed=0)
    with ray_session(cfg):
        cluster = Cluster.start_generation(cfg)
        try:
            assert cluster.learners == [] and len(cluster.rollouts) == 2
            victim = pid_of(cluster.rollouts[1])
            with KillWhen(victim, [victim], titled("RolloutWorker.generate")) as killer:
                groups = cluster.generate(prompts, 1, greedy)
            assert killer.killed_at is not None
            assert [g.prompt.id for g in groups] == [p.id for p in prompts]
            assert all(len(g.completions) == 1 for g in groups)

            # Worker 0 dies too, idle: no live worker is left, both are replaced from the
            # checkpoint at the next call, which answers every prompt again.
            os.kill(pid_of(cluster.rollouts[0]), signal.SIGKILL)
            again = cluster.generate(prompts, 1, greedy)
            assert [g.prompt.id for g in again] == [p.id for p in prompts]
            assert cluster.rollout_restarts == 2
            assert cluster.policy_version() == 0  # the checkpoint's weights, on every worker
        finally:
            cluster.shutdown()
