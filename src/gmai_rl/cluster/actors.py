"""The run's actors and how each kind is started in its place.

Learner ranks and rollout workers go into their bundles of the placement group
(`placement.plan_bundles`); reward workers sit outside it. The actor modules are plain classes
(`Learner`, `RolloutWorker`, `RewardWorker`) that this module wraps with `ray.remote`.

Start-up order matters: the learner ranks rendezvous on rank 0's node (address found by a probe
task in bundle 0). Reward workers are awaited first: they start in seconds while the others load
the model, so a bad reward.fn stops the start at once. A colocated vLLM engine checks at start-up
that its share of the GPU is free, so it starts (and goes to sleep) before the learners take
memory there. Every constructor is awaited within cluster.start_timeout_s.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gmai_rl.cluster.environment import actor_env
from gmai_rl.cluster.errors import StageTimeoutError
from gmai_rl.cluster.placement import REWARD_WORKER_CPUS, BundlePlan
from gmai_rl.cluster.session import free_resources, node_address
from gmai_rl.cluster.waits import RAISE, Call, gather
from gmai_rl.config import TrainConfig
from gmai_rl.learner.worker import Learner
from gmai_rl.reward.worker import RewardWorker
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.options import Device
from gmai_rl.rollout.worker import RolloutWorker

LEARNER, ROLLOUT, REWARD = "learner rank", "rollout worker", "reward worker"
"""How messages name each kind of actor ("rollout worker 1")."""


class Actors:
    """The learner ranks, rollout workers and reward workers of one run, in their places."""

    def __init__(self, cfg: TrainConfig, placement_group: Any, plan: BundlePlan) -> None:
        self.cfg, self.placement_group, self.plan = cfg, placement_group, plan
        self.learners: list[Any] = []
        self.rollouts: list[Any] = []
        self.rewards: list[Any] = []
        self.learner_host = ""
        """Learner rank 0's node address, where the learner group's and the sync group's
        stores live."""
        self.call_timeout_s = cfg.cluster.call_timeout_s
        """The bound on every stage's calls (cluster.call_timeout_s), read by every stage."""

    def of(self, kind: str) -> list[Any]:
        return {LEARNER: self.learners, ROLLOUT: self.rollouts, REWARD: self.rewards}[kind]

    def calls(
        self, kind: str, method: str, *args: Any, only: list[int] | None = None
    ) -> list[Call]:
        """The same method called on every actor of a kind (or those at `only`), named."""
        actors = self.of(kind)
        return [
            (f"{kind} {i}", getattr(actors[i], method).remote(*args))
            for i in (range(len(actors)) if only is None else only)
        ]

    # ------------------------------------------------------------------------------ start

    def start(self, sleeps: bool) -> None:
        """Start every actor and wait for each one's constructor (model loading, DeepSpeed
        init). `sleeps`: rollout engines that sleep while the learners train (colocated vLLM):
        started and put to sleep before the learners. Without learner bundles (a generation
        cluster), the rollout and reward workers only."""
        if not self.plan.learner_bundles:
            self.rewards = [self.start_reward() for _ in range(self.cfg.reward.num_workers)]
            self.rollouts = [
                self.start_rollout(i, 0) for i in range(len(self.plan.rollout_bundles))
            ]
            self.await_started(REWARD)
            self.await_started(ROLLOUT)
            return
        master_addr, master_port = self._probe_learner_node()
        self.learner_host = master_addr
        self.rewards = [self.start_reward() for _ in range(self.cfg.reward.num_workers)]
        if sleeps:
            self.rollouts = [
                self.start_rollout(i, 0) for i in range(len(self.plan.rollout_bundles))
            ]
            self.await_started(REWARD)
            self.await_started(ROLLOUT)
            gather("start", self.calls(ROLLOUT, "sleep"), self.cfg.cluster.start_timeout_s)
            self.learners = self._start_learners(master_addr, master_port)
        else:
            self.learners = self._start_learners(master_addr, master_port)
            self.rollouts = [
                self.start_rollout(i, 0) for i in range(len(self.plan.rollout_bundles))
            ]
            self.await_started(REWARD)
        self.await_started(LEARNER)
        self.await_started(ROLLOUT)

    def await_started(self, kind: str, only: list[int] | None = None) -> None:
        """Wait for the constructors of a kind's actors (at most cluster.start_timeout_s); a
        timeout also says what the cluster has free."""
        try:
            gather(
                "start",
                self.calls(kind, "ping", only=only),
                self.cfg.cluster.start_timeout_s,
                RAISE,
            )
        except StageTimeoutError as err:
            raise StageTimeoutError(f"{err}; {free_resources()}") from None

    def _start_learners(self, master_addr: str, master_port: int) -> list[Any]:
        cfg, plan = self.cfg, self.plan
        learner = ray.remote(Learner)
        return [
            learner.options(**self._in_bundle(b, plan.learner_resources)).remote(
                cfg.model,
                cfg.learner,
                cfg.algo.loss,
                rank,
                cfg.cluster.learner_ranks,
                master_addr,
                master_port,
                use_gpu=cfg.cluster.gpus_per_learner > 0,
            )
            for rank, b in enumerate(plan.learner_bundles)
        ]

    def start_rollout(self, i: int, generation: int) -> Any:
        """Rollout worker `i` in its bundle. A replacement (a later sync-group `generation`)
        samples from a seed of its own."""
        cfg = self.cfg
        options = self._in_bundle(self.plan.rollout_bundles[i], self.plan.rollout_resources)
        return (
            ray.remote(RolloutWorker)
            .options(**options)
            .remote(
                cfg.rollout.backend,
                cfg.model,
                device=rollout_device(cfg),
                torch_threads=cfg.rollout.torch_threads,
                max_batch_prompts=cfg.rollout.max_batch_prompts,
                seed=cfg.trainer.seed + 1000 * (i + 1) + 1_000_000 * generation,
                engine_kwargs=engine_spec(cfg.rollout.backend).engine_kwargs(cfg.rollout),
            )
        )

    def start_reward(self) -> Any:
        """A reward worker, outside the placement group (REWARD_WORKER_CPUS)."""
        r = self.cfg.reward
        options = {"num_cpus": REWARD_WORKER_CPUS, "runtime_env": self._runtime_env()}
        return (
            ray.remote(RewardWorker)
            .options(**options)
            .remote(
                r.fn,
                r.format_weight,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                overlong_buffer=r.overlong_buffer,
                overlong_penalty=r.overlong_penalty,
            )
        )

    def _probe_learner_node(self) -> tuple[str, int]:
        """Learner rank 0's node address and a port reserved there now (a task in its bundle;
        `find_free_ports` says for how long)."""
        probe = ray.remote(node_address).options(
            **self._in_bundle(self.plan.learner_bundles[0], {"CPU": 0})
        )
        try:
            ((address, port),) = gather(
                "start", [("probe", probe.remote())], self.cfg.cluster.start_timeout_s
            )
        except StageTimeoutError as err:
            raise StageTimeoutError(f"{err}; {free_resources()}") from None
        return address, port

    def _runtime_env(self) -> dict[str, Any]:
        return {"env_vars": actor_env(self.cfg, os.environ)}

    def _in_bundle(self, index: int, resources: dict[str, float]) -> dict[str, Any]:
        """Ray options placing an actor or task in bundle `index` of the run's group."""
        return {
            "num_cpus": resources.get("CPU", 0),
            "num_gpus": resources.get("GPU", 0),
            "runtime_env": self._runtime_env(),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            ),
        }

    # ------------------------------------------------------------------------------- stop

    def kill_all(self) -> None:
        for actor in self.learners + self.rollouts + self.rewards:
            ray.kill(actor)


def rollout_device(cfg: TrainConfig) -> str:
    """The rollout workers' torch device: `rollout.device`, with auto meaning what the placement
    gives them (cuda with GPUs in their bundle, else cpu), never what a node happens to have."""
    if cfg.rollout.device != Device.auto:
        return str(cfg.rollout.device)
    return "cuda" if cfg.cluster.gpus_per_rollout_worker > 0 else "cpu"
