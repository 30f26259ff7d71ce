"""Placement and start-up: one Ray placement group holding the learner ranks and rollout workers.

Bundle layout (`plan_bundles`, pure):
- separate (default): one bundle per learner rank, then one per rollout worker;
- colocated: one bundle per learner rank, each shared by that rank and one rollout worker, each
  actor taking half of the bundle's CPUs and GPUs (generation and training alternate in time).
Reward workers are light and sit outside the placement group.

Start-up order matters: the learner ranks rendezvous on rank 0's node (address found by a probe task
in bundle 0), then learner rank 0 and every rollout worker join the weight-sync group, all launched
before any is awaited, since each join blocks until the whole group is there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from gmai_rl.config import ClusterConfig, TrainConfig
from gmai_rl.sync.buckets import Bucket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundlePlan:
    bundles: list[dict[str, float]]
    learner_bundles: list[int]
    rollout_bundles: list[int]
    learner_resources: dict[str, float]
    """num_cpus / num_gpus of each learner actor."""
    rollout_resources: dict[str, float]


def plan_bundles(cfg: ClusterConfig) -> BundlePlan:
    """Bundles of the placement group and which bundle each actor goes to."""
    learner = {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_learner}
    rollout = {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_rollout_worker}
    if cfg.colocate:
        if cfg.rollout_workers != cfg.learner_ranks:
            raise ValueError(
                "cluster.colocate pairs each rollout worker with a learner rank: set "
                f"cluster.rollout_workers ({cfg.rollout_workers}) = cluster.learner_ranks "
                f"({cfg.learner_ranks})"
            )
        shared = {k: max(learner[k], rollout[k]) for k in learner}
        half = {k: v / 2 for k, v in shared.items()}
        bundles = [_nonzero(shared) for _ in range(cfg.learner_ranks)]
        ranks = list(range(cfg.learner_ranks))
        return BundlePlan(bundles, ranks, ranks, half, half)
    bundles = [_nonzero(learner)] * cfg.learner_ranks + [_nonzero(rollout)] * cfg.rollout_workers
    return BundlePlan(
        bundles,
        list(range(cfg.learner_ranks)),
        list(range(cfg.learner_ranks, cfg.learner_ranks + cfg.rollout_workers)),
        learner,
        rollout,
    )


def _nonzero(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if v > 0}


def sync_backend(cfg: ClusterConfig) -> str:
    """NCCL when both sides of the broadcast hold GPUs of their own, else gloo.

    Colocated actors share a GPU, and NCCL refuses two ranks of one group on one device, so
    colocated runs broadcast over gloo through host memory (a CUDA-IPC handoff would avoid the
    copy; not implemented).
    """
    if cfg.colocate:
        return "gloo"
    return "nccl" if cfg.gpus_per_learner > 0 and cfg.gpus_per_rollout_worker > 0 else "gloo"


def sync_ranks(members: list[int]) -> tuple[list[int], int]:
    """Each rollout worker's first sync-group rank, and the group's world size.

    Learner rank 0 is group rank 0; rollout worker i takes `members[i]` consecutive ranks (1 for
    an HF engine, one per tensor-parallel worker for vLLM), in worker order.
    """
    if any(m < 1 for m in members):
        raise ValueError(f"every rollout worker needs at least one sync rank, got {members}")
    offsets, next_rank = [], 1
    for m in members:
        offsets.append(next_rank)
        next_rank += m
    return offsets, next_rank


def init_ray(cfg: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
    if cfg.cluster.gpus_per_learner == 0:
        env["DS_ACCELERATOR"] = "cpu"
    runtime_env = {"env_vars": env}
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address, runtime_env=runtime_env)
        return
    plan = plan_bundles(cfg.cluster)
    needed = sum(b.get("CPU", 0) for b in plan.bundles) + cfg.reward.num_workers * 0.5
    ray.init(
        num_cpus=cfg.cluster.num_cpus or max(int(needed + 0.999), 1),
        include_dashboard=cfg.cluster.dashboard,
        runtime_env=runtime_env,
        log_to_driver=True,
    )


@dataclass
class Cluster:
    """Handles to the actors of one training run."""

    learners: list[Any]
    rollouts: list[Any]
    rewards: list[Any]
    placement_group: Any
    sync_plan: list[Bucket]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.learners + self.rollouts + self.rewards:
            ray.kill(actor)
        remove_placement_group(self.placement_group)


def start_cluster(cfg: TrainConfig) -> Cluster:
    """Place and start every actor, form the learner group and the weight-sync group."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from gmai_rl.learner.worker import Learner
    from gmai_rl.reward.worker import RewardWorker
    from gmai_rl.rollout.worker import RolloutWorker

    plan = plan_bundles(cfg.cluster)
    pg = placement_group(plan.bundles, strategy=cfg.cluster.placement_strategy)
    ray.get(pg.ready(), timeout=cfg.sync.timeout_s)

    def in_bundle(index: int, resources: dict[str, float]) -> dict[str, Any]:
        return {
            "num_cpus": resources.get("CPU", 0),
            "num_gpus": resources.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index
            ),
        }

    # The learner group's rendezvous lives on rank 0's node: a probe task there picks the port.
    probe = ray.remote(_node_address).options(**in_bundle(plan.learner_bundles[0], {"CPU": 0}))
    master_addr, master_port = ray.get(probe.remote())
    world = cfg.cluster.learner_ranks
    learner_cls = ray.remote(Learner)
    learners = [
        learner_cls.options(**in_bundle(b, plan.learner_resources)).remote(
            cfg.model, cfg.learner, cfg.algo.loss, rank, world, master_addr, master_port
        )
        for rank, b in enumerate(plan.learner_bundles)
    ]
    rollout_cls = ray.remote(RolloutWorker)
    rollouts = [
        rollout_cls.options(**in_bundle(b, plan.rollout_resources)).remote(
            cfg.rollout.backend,
            cfg.model,
            device=cfg.rollout.device,
            torch_threads=cfg.rollout.torch_threads,
            max_batch_prompts=cfg.rollout.max_batch_prompts,
            seed=cfg.trainer.seed + 1000 * (i + 1),
            engine_kwargs=rollout_engine_kwargs(cfg),
        )
        for i, b in enumerate(plan.rollout_bundles)
    ]
    reward_cls = ray.remote(RewardWorker)
    rewards = [
        reward_cls.options(num_cpus=0.5).remote(cfg.reward.fn, cfg.reward.format_weight)
        for _ in range(cfg.reward.num_workers)
    ]
    # Wait for every actor's constructor (model loading, DeepSpeed init) before wiring the sync.
    ray.get([a.ping.remote() for a in learners])
    ray.get([r.get_policy_version.remote() for r in rollouts])

    host, port = ray.get(learners[0].sync_address.remote())
    offsets, sync_world = sync_ranks(ray.get([r.sync_members.remote() for r in rollouts]))
    backend, timeout = sync_backend(cfg.cluster), cfg.sync.timeout_s
    joins = [learners[0].join_sync_group.remote(host, port, sync_world, backend, timeout)]
    joins += [
        r.join_sync_group.remote(host, port, offset, sync_world, backend, timeout)
        for r, offset in zip(rollouts, offsets, strict=True)
    ]
    ray.get(joins)
    sync_plan = ray.get(
        learners[0].sync_plan.remote(cfg.sync.bucket_mb * 2**20, cfg.sync.wire_dtype)
    )
    log.info(
        "cluster up: %d learner rank(s), %d rollout worker(s), %d reward worker(s), sync %s "
        "(world size %d)",
        len(learners),
        len(rollouts),
        len(rewards),
        backend,
        sync_world,
    )
    return Cluster(learners, rollouts, rewards, pg, sync_plan)


def rollout_engine_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Engine options of the configured backend (the vLLM section for vLLM; HF takes none)."""
    return {"vllm": cfg.rollout.vllm} if cfg.rollout.backend == "vllm" else {}


def _node_address() -> tuple[str, int]:
    from gmai_rl.sync.group import find_free_port, node_ip_address

    return node_ip_address(), find_free_port()
