"""Where the run's actors go and what the run holds, as plain arithmetic (no Ray).

Bundle layout (`plan_bundles`):
- separate (default): one bundle per learner rank, then one per rollout worker;
- colocated: one bundle per learner rank, each shared by that rank and one rollout worker, each
  actor taking half of the bundle's CPUs and GPUs (generation and training alternate in time).
Reward workers are light (REWARD_WORKER_CPUS each) and sit outside the placement group.

Also: which backend the weight sync uses (`sync_backend`), each rollout worker's ranks in the
sync group (`sync_ranks`), how a stage's work is cut over the workers (`contiguous_shares`), and
whether a cluster can hold the run (`run_demand`, `resource_shortfall`). The pre-flight plan
(gmai_rl.plan) imports this module without starting or importing Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gmai_rl.config import ClusterConfig, PlacementStrategy

T = TypeVar("T")


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


def contiguous_shares(items: Sequence[T], parts: int) -> list[list[T]]:
    """`items` cut into `parts` contiguous slices of ceil(len / parts), the last ones shorter or
    empty; worker i takes slice i, so concatenating the results keeps the input order."""
    size = math.ceil(len(items) / parts)
    return [list(items[i * size : (i + 1) * size]) for i in range(parts)]


REWARD_WORKER_CPUS = 0.5
"""CPUs each reward worker asks for, outside the placement group."""

_KEYS_TO_CHANGE = {
    "CPU": "cluster.cpus_per_actor, cluster.learner_ranks, cluster.rollout_workers or "
    "reward.num_workers",
    "GPU": "cluster.gpus_per_learner, cluster.gpus_per_rollout_worker, cluster.learner_ranks or "
    "cluster.rollout_workers",
}


def run_demand(plan: BundlePlan, reward_workers: int) -> dict[str, float]:
    """Every resource the run holds at once: the placement group's bundles plus the reward
    workers."""
    total = _sum_resources(plan.bundles)
    if reward_workers:
        total["CPU"] = total.get("CPU", 0) + REWARD_WORKER_CPUS * reward_workers
    return total


def resource_shortfall(
    plan: BundlePlan,
    reward_workers: int,
    strategy: str,
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]] = (),
) -> list[str]:
    """Why the cluster cannot hold the run, one sentence per problem; empty when it can.

    `cluster` holds the cluster's resources (its total, or what is free), `nodes` each node's
    total; without `nodes` only the totals are compared. E.g. "the placement group takes 4 CPUs,
    the reward worker needs 0.5 more; the cluster has 4".
    """
    group = _sum_resources(plan.bundles)
    rewards = REWARD_WORKER_CPUS * reward_workers
    problems = []
    for resource in sorted(run_demand(plan, reward_workers)):
        takes, has = group.get(resource, 0), cluster.get(resource, 0)
        extra = rewards if resource == "CPU" else 0
        if takes + extra <= has + 1e-9:
            continue
        unit = f"{resource}s" if takes != 1 else resource
        text = f"the placement group takes {takes:g} {unit}"
        if extra:
            who = "the reward worker needs" if reward_workers == 1 else "the reward workers need"
            text += f", {who} {extra:g} more"
        problems.append(f"{text}; the cluster has {has:g} (see {_KEYS_TO_CHANGE.get(resource)})")
    if nodes:
        problems += _node_problems(plan.bundles, strategy, nodes)
    return problems


def _node_problems(
    bundles: Sequence[Mapping[str, float]], strategy: str, nodes: Sequence[Mapping[str, float]]
) -> list[str]:
    """Bundles that no single node can hold, under the placement strategy's rules."""

    def fits(need: Mapping[str, float], node: Mapping[str, float]) -> bool:
        return all(node.get(k, 0) + 1e-9 >= v for k, v in need.items())

    sizes = "; ".join(format_resources(node) for node in nodes)
    problems = []
    for bundle in {tuple(sorted(b.items())): b for b in bundles}.values():
        if not any(fits(bundle, node) for node in nodes):
            problems.append(
                f"no node can hold a bundle of {format_resources(bundle)} (nodes: {sizes})"
            )
    if strategy == PlacementStrategy.STRICT_PACK and not problems:
        whole = _sum_resources(bundles)
        if not any(fits(whole, node) for node in nodes):
            problems.append(
                f"cluster.placement_strategy=STRICT_PACK puts every bundle ({format_resources(whole)} in "
                f"all) on one node, and none is that large (nodes: {sizes})"
            )
    if strategy == PlacementStrategy.STRICT_SPREAD and len(bundles) > len(nodes):
        problems.append(
            f"cluster.placement_strategy=STRICT_SPREAD puts each of the {len(bundles)} bundles on "
            f"a node of its own; the cluster has {len(nodes)} node(s)"
        )
    return problems


def _sum_resources(bundles: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0) + value
    return total


def format_resources(resources: Mapping[str, float]) -> str:
    """e.g. "4 CPU, 1 GPU": the resources a message names."""
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))
