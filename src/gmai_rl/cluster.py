"""The one boundary to Ray: placement, the actors of a run, fan-out, gathering, timeouts.

The driver (gmai_rl.loop) calls methods of a `Cluster`: `generate`, `score`, `train`,
`train_sft`, `sync_weights`, `save`... Each splits its work over the actors, launches every call
before awaiting any, and gathers the results in order. Nothing else in the package imports Ray
(the actor modules are plain classes that this module wraps with `ray.remote`).

Every wait is bounded: the placement group and the actors' constructors by
`cluster.start_timeout_s`, every stage by `cluster.call_timeout_s`. A stage that does not answer
in time raises `StageTimeoutError`, one whose actor died (or whose rollout engine broke,
`EngineBrokenError`) `ActorDiedError`, each naming the stage and the actors; any other exception
raised inside an actor arrives as itself, with a note naming them.

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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gmai_rl.config import ClusterConfig, TrainConfig
from gmai_rl.learner.batching import plan_rank_batches, split_even
from gmai_rl.learner.options import OptimOptions
from gmai_rl.learner.rank_metrics import combine_rank_metrics, combine_sft_metrics
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.options import Backend, Device
from gmai_rl.sync.buckets import Bucket
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams, TrainSample

log = logging.getLogger(__name__)

T = TypeVar("T")

# ------------------------------------------------------------------------ placement (pure)


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


# ---------------------------------------------------------------------------------- errors


class ClusterError(RuntimeError):
    """A stage could not complete on the cluster."""


class StageTimeoutError(ClusterError):
    """Some actors did not answer within the stage's timeout."""


class ActorDiedError(ClusterError):
    """An actor's process died (killed, out of memory, node lost) during a stage."""


# ----------------------------------------------------------------------------------- ray


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
    ports = {}
    if cfg.cluster.metrics_export_port is not None:
        ports["_metrics_export_port"] = cfg.cluster.metrics_export_port
    ray.init(
        num_cpus=cfg.cluster.num_cpus or max(int(needed + 0.999), 1),
        include_dashboard=cfg.cluster.dashboard,
        runtime_env=runtime_env,
        log_to_driver=True,
        **ports,
    )


Call = tuple[str, Any]
"""(the actor's name for messages, the ObjectRef of its pending call)."""


class Cluster:
    """The actors of one training run, and every remote call the driver makes to them."""

    def __init__(
        self,
        cfg: TrainConfig,
        learners: list[Any],
        rollouts: list[Any],
        rewards: list[Any],
        placement_group: Any,
        sync_plan: list[Bucket],
    ) -> None:
        self.cfg = cfg
        self.learners, self.rollouts, self.rewards = learners, rollouts, rewards
        self.placement_group = placement_group
        self.sync_plan = sync_plan
        """Every parameter of the policy."""
        self.trainable_plan = sync_plan
        """The parameters training changes: after the first push, the only ones that travel."""
        self.frozen_pushed = False
        self.timeout_s = cfg.cluster.call_timeout_s
        # Colocated vLLM engines give their GPU memory back while the learners train.
        self.rollouts_sleep = (
            cfg.cluster.colocate
            and cfg.rollout.backend == Backend.vllm
            and cfg.rollout.vllm.enable_sleep_mode
        )
        # Level-2 sleep discards the engines' weights, frozen ones included: every push is whole.
        self.resend_frozen = self.rollouts_sleep and cfg.rollout.vllm.sleep_level >= 2

    # ------------------------------------------------------------------------ start, stop

    @classmethod
    def start(cls, cfg: TrainConfig) -> Cluster:
        """Place and start every actor, form the learner group and the weight-sync group."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from gmai_rl.learner.worker import Learner
        from gmai_rl.reward.worker import RewardWorker
        from gmai_rl.rollout.worker import RolloutWorker

        timeout = cfg.cluster.start_timeout_s
        plan = plan_bundles(cfg.cluster)
        pg = placement_group(plan.bundles, strategy=str(cfg.cluster.placement_strategy))
        ready, _ = ray.wait([pg.ready()], timeout=timeout)
        if not ready:
            raise StageTimeoutError(
                f"start: the placement group ({plan.bundles}) was not ready within {timeout:g} s "
                f"(cluster.start_timeout_s); the cluster has {ray.cluster_resources()}"
            )

        def in_bundle(index: int, resources: dict[str, float]) -> dict[str, Any]:
            return {
                "num_cpus": resources.get("CPU", 0),
                "num_gpus": resources.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=index
                ),
            }

        # The learner group's rendezvous and the weight-sync group's store both live on learner
        # rank 0's node: a probe task in its bundle finds the node's address and two free ports.
        probe = ray.remote(_node_address).options(**in_bundle(plan.learner_bundles[0], {"CPU": 0}))
        ((master_addr, master_port, sync_port),) = _await(
            "start", [("probe", probe.remote())], timeout
        )
        world = cfg.cluster.learner_ranks

        def start_learners() -> list[Any]:
            learner_cls = ray.remote(Learner)
            return [
                learner_cls.options(**in_bundle(b, plan.learner_resources)).remote(
                    cfg.model,
                    cfg.learner,
                    cfg.algo.loss,
                    rank,
                    world,
                    master_addr,
                    master_port,
                    use_gpu=cfg.cluster.gpus_per_learner > 0,
                )
                for rank, b in enumerate(plan.learner_bundles)
            ]

        def start_rollouts() -> list[Any]:
            rollout_cls = ray.remote(RolloutWorker)
            return [
                rollout_cls.options(**in_bundle(b, plan.rollout_resources)).remote(
                    cfg.rollout.backend,
                    cfg.model,
                    device=rollout_device(cfg),
                    torch_threads=cfg.rollout.torch_threads,
                    max_batch_prompts=cfg.rollout.max_batch_prompts,
                    seed=cfg.trainer.seed + 1000 * (i + 1),
                    engine_kwargs=_engine_kwargs(cfg),
                )
                for i, b in enumerate(plan.rollout_bundles)
            ]

        reward_cls = ray.remote(RewardWorker)
        rewards = [
            reward_cls.options(num_cpus=0.5).remote(cfg.reward.fn, cfg.reward.format_weight)
            for _ in range(cfg.reward.num_workers)
        ]
        cluster = cls(cfg, [], [], rewards, pg, [])
        # Wait for every actor's constructor (model loading, DeepSpeed init) before wiring the sync.
        if cluster.rollouts_sleep:
            # A colocated vLLM engine checks at start-up that its share of the GPU is free, so it
            # starts before the learners take memory there, then sleeps until the first push.
            cluster.rollouts = start_rollouts()
            _await("start", cluster._calls(cluster.rollouts, "rollout worker", "ping"), timeout)
            cluster.sleep_rollouts()
            cluster.learners = start_learners()
        else:
            cluster.learners, cluster.rollouts = start_learners(), start_rollouts()
        learners, rollouts = cluster.learners, cluster.rollouts
        _await("start", cluster._calls(learners, "learner rank", "ping"), timeout)
        _await("start", cluster._calls(rollouts, "rollout worker", "ping"), timeout)
        _await("start", cluster._calls(rewards, "reward worker", "ping"), timeout)

        host, port = master_addr, sync_port
        members = _await(
            "start", cluster._calls(rollouts, "rollout worker", "sync_members"), timeout
        )
        offsets, sync_world = sync_ranks(members)
        backend, sync_timeout = sync_backend(cfg.cluster), cfg.sync.timeout_s
        joins = [
            (
                "learner rank 0",
                learners[0].join_sync_group.remote(host, port, sync_world, backend, sync_timeout),
            )
        ]
        joins += [
            (
                f"rollout worker {i}",
                r.join_sync_group.remote(host, port, offset, sync_world, backend, sync_timeout),
            )
            for i, (r, offset) in enumerate(zip(rollouts, offsets, strict=True))
        ]
        _await("start: joining the weight-sync group", joins, timeout)
        wire_dtype = str(cfg.sync.wire_dtype) if cfg.sync.wire_dtype else None
        bucket_bytes = cfg.sync.bucket_mb * 2**20
        cluster.sync_plan, cluster.trainable_plan = _await(
            "start",
            [
                ("learner rank 0", learners[0].sync_plan.remote(bucket_bytes, wire_dtype)),
                ("learner rank 0", learners[0].sync_plan.remote(bucket_bytes, wire_dtype, True)),
            ],
            timeout,
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
        return cluster

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.learners + self.rollouts + self.rewards:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    # ----------------------------------------------------------------------------- stages

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions per prompt, one Group per prompt in order; prompts are spread evenly
        over the rollout workers."""
        shares = contiguous_shares(prompts, len(self.rollouts))
        calls = [
            (f"rollout worker {i}", worker.generate.remote(share, n, sampling))
            for i, (worker, share) in enumerate(zip(self.rollouts, shares, strict=True))
            if share
        ]
        return [group for groups in self._await("generate", calls) for group in groups]

    def score(self, groups: Sequence[Group], items: Sequence[MCQItem]) -> None:
        """Fill each group's per-completion reward breakdowns (in place); completions are spread
        evenly over the reward workers."""
        pairs = [
            (c.text, item) for g, item in zip(groups, items, strict=True) for c in g.completions
        ]
        shares = contiguous_shares(pairs, len(self.rewards))
        calls = [
            (f"reward worker {i}", worker.score.remote(share))
            for i, (worker, share) in enumerate(zip(self.rewards, shares, strict=True))
            if share
        ]
        breakdowns = iter(b for chunk in self._await("score", calls) for b in chunk)
        for g in groups:
            g.rewards = [next(breakdowns) for _ in g.completions]

    def start_stage(self, optim: OptimOptions, reset_reference: bool = False) -> None:
        """Begin a training stage (SFT or RL) on every learner rank: its LR schedule and, with
        `reset_reference`, the KL reference set to the current policy."""
        self._await(
            "start stage",
            self._calls(self.learners, "learner rank", "start_stage", optim, reset_reference),
        )

    def train(self, samples: Sequence[TrainSample], num_minibatches: int) -> dict[str, float]:
        """PPO epochs over a rollout batch, each rank on its share; the ranks' combined metrics."""
        plans = plan_rank_batches(samples, len(self.learners), num_minibatches)
        calls = [
            (f"learner rank {rank}", learner.train_rl.remote(plan))
            for rank, (learner, plan) in enumerate(zip(self.learners, plans, strict=True))
        ]
        return combine_rank_metrics(self._await("train", calls))

    def train_sft(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One SFT optimizer step on a batch split evenly over the ranks."""
        num_tokens = sum(len(s.completion_ids) for s in samples)
        shards = split_even(samples, len(self.learners))
        calls = [
            (f"learner rank {rank}", learner.train_sft.remote(shard, num_tokens))
            for rank, (learner, shard) in enumerate(zip(self.learners, shards, strict=True))
        ]
        return combine_sft_metrics(self._await("sft", calls))

    def push_plan(self) -> list[Bucket]:
        """What the next push carries: every parameter the first time (and whenever the engines
        may have lost their frozen weights), then only the trainable ones, since frozen
        parameters (a frozen vision tower: ~0.67B at 7B) never change."""
        if self.frozen_pushed and not self.resend_frozen:
            return self.trainable_plan
        return self.sync_plan

    def sync_weights(self, verify: bool) -> int:
        """Push the learner's weights to every rollout worker; returns the new policy version.

        All sends and receives are launched before any is awaited: each blocks on the others.
        With `verify`, every tensor's checksum on every worker must equal what rank 0 sent.
        """
        plan, in_flight = self.push_plan(), self.cfg.sync.max_buckets_in_flight
        pushes = self._calls(self.learners, "learner rank", "push_weights", plan, verify, in_flight)
        receipts = self._calls(self.rollouts, "rollout worker", "receive_weights", plan, verify)
        results = self._await("weight sync", pushes + receipts)
        sent, received = results[0], results[len(pushes) :]
        versions = {r["version"] for r in received}
        if len(versions) != 1:
            raise RuntimeError(
                f"rollout workers disagree on the policy version: {sorted(versions)}"
            )
        if verify:
            for i, r in enumerate(received):
                bad = [
                    name
                    for name, digest in (sent or {}).items()
                    if r["checksums"].get(name) != digest
                ]
                if bad or len(r["checksums"]) != len(sent or {}):
                    raise RuntimeError(
                        f"rollout worker {i}: weights differ from the learner's: {bad[:5]}"
                    )
        self.frozen_pushed = True
        return versions.pop()

    def sleep_rollouts(self) -> None:
        """Colocated vLLM engines release their GPU memory for training (a no-op otherwise)."""
        if self.rollouts_sleep:
            self._await("sleep", self._calls(self.rollouts, "rollout worker", "sleep"))

    def wake_rollouts(self) -> None:
        """... and take it back before the weight push and generation, once the learners have
        returned their allocator's cached blocks (training's peak would otherwise stay
        reserved beside the waking engine)."""
        if self.rollouts_sleep:
            self._await(
                "wake up", self._calls(self.learners, "learner rank", "release_cached_memory")
            )
            self._await("wake up", self._calls(self.rollouts, "rollout worker", "wake_up"))

    def policy_version(self) -> int:
        """The rollout workers' policy version (weight updates loaded)."""
        versions = self._await(
            "policy version", self._calls(self.rollouts, "rollout worker", "get_policy_version")
        )
        if len(set(versions)) != 1:
            raise RuntimeError(f"rollout workers disagree on the policy version: {versions}")
        return int(versions[0])

    def save_state(self, folder: str) -> None:
        """Every actor writes its part of a resumable checkpoint into `folder` (a path every
        node can reach): the learner ranks their DeepSpeed state, the rollout workers their RNG."""
        calls = self._calls(self.learners, "learner rank", "save_state", folder)
        calls += [
            (f"rollout worker {i}", worker.save_state.remote(f"{folder}/rollout_{i}.pt"))
            for i, worker in enumerate(self.rollouts)
        ]
        self._await("save checkpoint", calls)

    def restore_state(self, folder: str, policy_version: int) -> None:
        """Load a checkpoint `save_state` wrote: the learners' state, then a full weight push
        (the workers started from the model path), then the workers' RNG and policy version."""
        self._await(
            "load checkpoint", self._calls(self.learners, "learner rank", "load_state", folder)
        )
        self.frozen_pushed = False
        self.sync_weights(self.cfg.sync.verify)
        self._await(
            "load checkpoint",
            [
                (f"rollout worker {i}", worker.load_state.remote(f"{folder}/rollout_{i}.pt"))
                for i, worker in enumerate(self.rollouts)
            ],
        )
        if self.policy_version() != policy_version:
            raise RuntimeError(f"resumed workers are not at policy version {policy_version}")

    def save(self, path: str) -> None:
        """Write the policy as an HF checkpoint (every rank takes part; rank 0 writes)."""
        self._await("save", self._calls(self.learners, "learner rank", "save_pretrained", path))
        log.info("saved checkpoint to %s", path)

    # ------------------------------------------------------------------------- inspection

    def learner_weights(self) -> dict[str, Any]:
        """The policy's full parameters on CPU (every rank takes part under ZeRO-3)."""
        per_rank = self._await(
            "read weights", self._calls(self.learners, "learner rank", "named_parameters")
        )
        return dict(per_rank[0])

    def rollout_checksums(self) -> list[dict[str, str]]:
        """Each rollout worker's checksums of its engine's weights, in the plan's wire dtypes."""
        return self._await(
            "checksums",
            self._calls(self.rollouts, "rollout worker", "weight_checksums", self.sync_plan),
        )

    # --------------------------------------------------------------------------- plumbing

    def _calls(self, actors: list[Any], kind: str, method: str, *args: Any) -> list[Call]:
        """The same method called on every actor of a kind, each call named for messages."""
        return [(f"{kind} {i}", getattr(a, method).remote(*args)) for i, a in enumerate(actors)]

    def _await(self, stage: str, calls: list[Call]) -> list[Any]:
        return _await(stage, calls, self.timeout_s)


def _await(stage: str, calls: list[Call], timeout_s: float) -> list[Any]:
    """The results of `calls`, in order, waiting at most `timeout_s` for all of them."""
    import ray
    from ray.exceptions import RayActorError

    refs = [ref for _, ref in calls]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [name for name, ref in calls if ref in pending]
        raise StageTimeoutError(
            f"{stage}: no answer from {', '.join(late)} within {timeout_s:g} s (a stalled or "
            "unschedulable actor; see cluster.call_timeout_s / cluster.start_timeout_s)"
        )
    results = []
    for name, ref in calls:
        try:
            results.append(ray.get(ref))
        except RayActorError as err:
            raise ActorDiedError(f"{stage}: {name} died: {err}") from err
        except EngineBrokenError as err:  # alive, but its engine is gone for good: as if dead
            cause = getattr(err, "cause", err)  # Ray's wrapper holds the actor's own exception
            raise ActorDiedError(f"{stage}: {name} must be replaced: {cause}") from err
        except Exception as err:
            err.add_note(f"(raised by {name} during {stage})")
            raise
    return results


def rollout_device(cfg: TrainConfig) -> str:
    """The rollout workers' torch device: `rollout.device`, with auto meaning what the placement
    gives them (cuda with GPUs in their bundle, else cpu), never what a node happens to have."""
    if cfg.rollout.device != Device.auto:
        return str(cfg.rollout.device)
    return "cuda" if cfg.cluster.gpus_per_rollout_worker > 0 else "cpu"


def _engine_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Engine options of the configured backend (the vLLM section for vLLM; HF takes none)."""
    return {"vllm": cfg.rollout.vllm} if cfg.rollout.backend == Backend.vllm else {}


def _node_address() -> tuple[str, int, int]:
    """This node's address as Ray sees it, and two ports free on it right now."""
    import ray.util

    from gmai_rl.sync.group import find_free_ports

    master_port, sync_port = find_free_ports(2)
    return ray.util.get_node_ip_address(), master_port, sync_port
