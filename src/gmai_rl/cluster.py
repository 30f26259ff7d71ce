"""The one boundary to Ray: placement, the actors of a run, fan-out, gathering, timeouts.

The driver (gmai_rl.loop) calls methods of a `Cluster`: `generate`, `score`, `train`,
`train_sft`, `sync_weights`, `save`... Each splits its work over the actors, launches every call
before awaiting any, and gathers the results in order. Nothing else in the package imports Ray
(the actor modules are plain classes that this module wraps with `ray.remote`).

Before it creates anything, `Cluster.start` checks that the cluster can hold the placement group
and every reward worker (`resource_shortfall`, pure), and stops naming what is missing. Every
wait is bounded: the placement group and the actors' constructors by
`cluster.start_timeout_s`, every stage by `cluster.call_timeout_s`. A stage that does not answer
in time raises `StageTimeoutError`, one whose actor died (or whose rollout engine broke,
`EngineBrokenError`) `ActorDiedError`, each naming the stage and the actors; any other exception
raised inside an actor arrives as itself, with a note naming them.

Bundle layout (`plan_bundles`, pure):
- separate (default): one bundle per learner rank, then one per rollout worker;
- colocated: one bundle per learner rank, each shared by that rank and one rollout worker, each
  actor taking half of the bundle's CPUs and GPUs (generation and training alternate in time).
Reward workers are light (REWARD_WORKER_CPUS each) and sit outside the placement group.

Under `ray job submit` the driver runs in a temporary copy of the job's working directory, which
Ray deletes with the session: `check_output_dir` refuses outputs there. The actors take the
environment variables they need in their own runtime env (`actor_env`), which Ray merges over
the job's, so the driver never passes one to `ray.init` (that conflicts with the job's).

Start-up order matters: the learner ranks rendezvous on rank 0's node (address found by a probe task
in bundle 0), then learner rank 0 and every rollout worker join the weight-sync group, all launched
before any is awaited, since each join blocks until the whole group is there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gmai_rl.config import ClusterConfig, PlacementStrategy, TrainConfig
from gmai_rl.learner.batching import plan_rank_batches, split_even
from gmai_rl.learner.options import OptimOptions
from gmai_rl.learner.rank_metrics import (
    check_step_decisions,
    combine_rank_metrics,
    combine_sft_metrics,
)
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.options import Backend, Device
from gmai_rl.sync.buckets import Bucket
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams, TrainSample, failed_reward

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


@dataclass
class RestartLimit:
    """At most `max_restarts` replacements within any `window_s` seconds: a worker that dies
    again and again (a bad node, an input that crashes the engine) stops the run instead."""

    max_restarts: int
    window_s: float
    times: list[float] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        """Count a replacement at `now` if the window has room for it."""
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.max_restarts:
            return False
        self.times.append(now)
        return True


# ------------------------------------------------------------------------ resources (pure)

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

    sizes = "; ".join(_format(node) for node in nodes)
    problems = []
    for bundle in {tuple(sorted(b.items())): b for b in bundles}.values():
        if not any(fits(bundle, node) for node in nodes):
            problems.append(f"no node can hold a bundle of {_format(bundle)} (nodes: {sizes})")
    if strategy == PlacementStrategy.STRICT_PACK and not problems:
        whole = _sum_resources(bundles)
        if not any(fits(whole, node) for node in nodes):
            problems.append(
                f"cluster.placement_strategy=STRICT_PACK puts every bundle ({_format(whole)} in "
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


def _format(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))


# ------------------------------------------------------------------ environment (pure)

JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a submitted job's driver: the job's runtime env, as JSON."""


def actor_env(cfg: TrainConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables every actor gets in its own runtime env (merged over the job's).

    The driver's HF_HUB_OFFLINE travels when set, so an offline driver has offline actors.
    """
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if "HF_HUB_OFFLINE" in environ:
        env["HF_HUB_OFFLINE"] = environ["HF_HUB_OFFLINE"]
    if cfg.cluster.gpus_per_learner == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for a GPU and fail
    return env


def job_working_dir(cwd: Path, environ: Mapping[str, str]) -> Path | None:
    """The temporary copy of a submitted job's working directory that the driver runs in, or
    None outside such a job.

    Ray 2.60 unpacks a job's working_dir under the session's
    runtime_resources/working_dir_files/ and starts the driver there. Should the folder be named
    otherwise, the job config Ray hands the driver still tells: a working_dir URI other than
    local:// (a folder Ray uses in place) means the driver runs in a copy.
    """
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == ("runtime_resources", "working_dir_files"):
            return Path(*parts[: i + 3])
    try:
        job = json.loads(environ.get(JOB_CONFIG_VAR) or "{}")
    except json.JSONDecodeError:
        return None
    uri = str((job.get("runtime_env") or {}).get("working_dir") or "")
    return cwd if uri and not uri.startswith("local://") else None


def output_dir_error(output_dir: str, cwd: Path, environ: Mapping[str, str]) -> str | None:
    """Why `output_dir` cannot hold the run's outputs, or None: inside a job's temporary
    working directory they would vanish with the Ray session."""
    temporary = job_working_dir(cwd, environ)
    path = (cwd / output_dir).resolve()
    if temporary is None or not path.is_relative_to(temporary.resolve()):
        return None
    return (
        f"trainer.output_dir={path} lies inside this Ray job's temporary working directory "
        f"({temporary}), which Ray deletes with the session: set trainer.output_dir to an "
        "absolute path outside it (shared storage on a multi-node cluster), or submit with "
        "launch/submit.sh, which sets one"
    )


def check_output_dir(output_dir: str) -> None:
    """Refuse, at start-up, an output folder that would not outlive the Ray session."""
    error = output_dir_error(output_dir, Path.cwd(), os.environ)
    if error:
        raise ValueError(error)


# ---------------------------------------------------------------------------------- errors


class ClusterError(RuntimeError):
    """A stage could not complete on the cluster."""


class StageTimeoutError(ClusterError):
    """Some actors did not answer within the stage's timeout."""


class ActorDiedError(ClusterError):
    """An actor's process died (killed, out of memory, node lost) during a stage."""


class RolloutsDiedError(ActorDiedError):
    """Rollout workers died during a weight push; `dead` maps each one's index to its death.
    The push's other members have left the broken collective by the time it is raised."""

    def __init__(self, dead: Mapping[int, ActorDiedError]) -> None:
        super().__init__("; ".join(str(death) for death in dead.values()))
        self.dead = dict(dead)


class InsufficientResourcesError(ClusterError):
    """The cluster cannot hold the run's placement group and actors."""


# ----------------------------------------------------------------------------------- ray


def init_ray(cfg: TrainConfig) -> bool:
    """Connect to the configured cluster (`cluster.address`, $RAY_ADDRESS, or the cluster of
    `ray job submit`), or start a local Ray advertising enough CPUs for every actor; False when
    Ray was already initialised (nothing done)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address)
        return True
    needed = run_demand(plan_bundles(cfg.cluster), cfg.reward.num_workers).get("CPU", 0)
    ports = {}
    if cfg.cluster.metrics_export_port is not None:
        ports["_metrics_export_port"] = cfg.cluster.metrics_export_port
    ray.init(
        num_cpus=cfg.cluster.num_cpus or max(math.ceil(needed), 1),
        include_dashboard=cfg.cluster.dashboard,
        log_to_driver=True,
        **ports,
    )
    return True


@contextmanager
def ray_session(cfg: TrainConfig) -> Iterator[None]:
    """Ray for one run (`init_ray`), shut down on exit if this run started it: the next run of
    a hydra multirun, in the same process, then starts its own."""
    import ray

    started = init_ray(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_resources(cfg: TrainConfig, plan: BundlePlan) -> None:
    """Stop before creating anything when the cluster cannot hold the run; warn when it can but
    other work holds what it needs (the waits are then bounded by cluster.start_timeout_s)."""
    import ray

    if not cfg.cluster.check_resources:
        return
    workers, strategy = cfg.reward.num_workers, str(cfg.cluster.placement_strategy)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = resource_shortfall(plan, workers, strategy, ray.cluster_resources(), nodes)
    if problems:
        raise InsufficientResourcesError(
            "start: the cluster cannot hold this run: "
            + "; ".join(problems)
            + ". Change those keys or add resources to the cluster (cluster.num_cpus for a "
            "local Ray; cluster.check_resources=false on an autoscaling cluster)."
        )
    busy = resource_shortfall(plan, workers, strategy, ray.available_resources())
    if busy:
        log.warning("start: waiting for resources other work holds: %s", "; ".join(busy))


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
        self.plan = plan_bundles(cfg.cluster)
        self.version = 0
        """The rollout workers' policy version: weight pushes loaded (`sync_weights`)."""
        self.sync_generation = 0
        """Formations of the weight-sync group: one more each time it is re-formed."""
        self.learner_host = ""
        """Learner rank 0's node address, where the learner group's and the sync group's stores
        live (found at the start)."""
        self.closed = False
        """Shut down: nothing is replaced any more."""
        self.sync_lock = threading.RLock()
        """Held by whatever changes the sync group or pushes through it (`sync_weights`,
        `replace_rollouts`): with `algo.max_staleness` > 0 a rollout worker may be replaced on
        the pipeline's thread while the driver's thread trains."""
        self.restart_limit = RestartLimit(cfg.cluster.max_restarts, cfg.cluster.restart_window_s)
        self.rollout_restarts = 0
        """Rollout workers replaced since the start."""
        self.reward_restarts = 0
        """Reward workers replaced since the start."""
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
        """Check that the cluster can hold the run, place and start every actor, form the learner
        group and the weight-sync group; on failure, remove whatever was started."""
        plan = plan_bundles(cfg.cluster)
        _check_resources(cfg, plan)
        cluster = cls(cfg, [], [], [], _ready_placement_group(cfg, plan), [])
        try:
            cluster._start_actors()
            backend, sync_world = cluster._join_sync_group()
        except BaseException:
            try:
                cluster.shutdown()
            except Exception:  # the start's own error is the one to see
                log.exception("start: removing the actors and placement group failed")
            raise
        log.info(
            "cluster up: %d learner rank(s), %d rollout worker(s), %d reward worker(s), sync %s "
            "(world size %d)",
            len(cluster.learners),
            len(cluster.rollouts),
            len(cluster.rewards),
            backend,
            sync_world,
        )
        return cluster

    def _start_actors(self) -> None:
        """Start the reward workers, learner ranks and rollout workers and wait for each one's
        constructor (model loading, DeepSpeed init)."""
        import ray

        from gmai_rl.learner.worker import Learner

        cfg, plan = self.cfg, self.plan
        # The learner group's rendezvous lives on learner rank 0's node: a probe task in its
        # bundle finds the node's address and reserves a port there.
        master_addr, master_port = self._probe_learner_node()
        self.learner_host = master_addr
        world = cfg.cluster.learner_ranks

        def start_learners() -> list[Any]:
            learner_cls = ray.remote(Learner)
            return [
                learner_cls.options(**self._in_bundle(b, plan.learner_resources)).remote(
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
            return [self._start_rollout(i) for i in range(len(plan.rollout_bundles))]

        self.rewards = [self._start_reward() for _ in range(cfg.reward.num_workers)]
        # The reward workers answer first: they start in seconds while the others load the
        # model, so a bad reward.fn stops the start at once.
        if self.rollouts_sleep:
            # A colocated vLLM engine checks at start-up that its share of the GPU is free, so it
            # starts before the learners take memory there, then sleeps until the first push.
            self.rollouts = start_rollouts()
            self._await_pings(self.rewards, "reward worker")
            self._await_pings(self.rollouts, "rollout worker")
            self.sleep_rollouts()
            self.learners = start_learners()
        else:
            self.learners, self.rollouts = start_learners(), start_rollouts()
            self._await_pings(self.rewards, "reward worker")
        self._await_pings(self.learners, "learner rank")
        self._await_pings(self.rollouts, "rollout worker")

    def _runtime_env(self) -> dict[str, Any]:
        return {"env_vars": actor_env(self.cfg, os.environ)}

    def _in_bundle(self, index: int, resources: dict[str, float]) -> dict[str, Any]:
        """Ray options placing an actor or task in bundle `index` of the run's group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "num_cpus": resources.get("CPU", 0),
            "num_gpus": resources.get("GPU", 0),
            "runtime_env": self._runtime_env(),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=index
            ),
        }

    def _probe_learner_node(self) -> tuple[str, int]:
        """Learner rank 0's node address and a port reserved there now (a task in its bundle;
        `find_free_ports` says for how long)."""
        import ray

        probe = ray.remote(_node_address).options(
            **self._in_bundle(self.plan.learner_bundles[0], {"CPU": 0})
        )
        ((address, port),) = _await_start(
            "start", [("probe", probe.remote())], self.cfg.cluster.start_timeout_s
        )
        return address, port

    def _start_rollout(self, i: int) -> Any:
        """Rollout worker `i` in its bundle. A replacement samples from a seed of its own."""
        import ray

        from gmai_rl.rollout.worker import RolloutWorker

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
                seed=cfg.trainer.seed + 1000 * (i + 1) + 1_000_000 * self.sync_generation,
                engine_kwargs=_engine_kwargs(cfg),
            )
        )

    def _start_reward(self) -> Any:
        """A reward worker, outside the placement group (REWARD_WORKER_CPUS)."""
        import ray

        from gmai_rl.reward.worker import RewardWorker

        options = {"num_cpus": REWARD_WORKER_CPUS, "runtime_env": self._runtime_env()}
        return (
            ray.remote(RewardWorker)
            .options(**options)
            .remote(
                self.cfg.reward.fn,
                self.cfg.reward.format_weight,
                max_new_tokens=self.cfg.rollout.max_new_tokens,
                overlong_buffer=self.cfg.reward.overlong_buffer,
                overlong_penalty=self.cfg.reward.overlong_penalty,
            )
        )

    def _await_pings(self, actors: list[Any], kind: str) -> None:
        """Wait for the actors' constructors (at most cluster.start_timeout_s)."""
        calls = self._calls(actors, kind, "ping")
        _await_start("start", calls, self.cfg.cluster.start_timeout_s)

    def _join_sync_group(self) -> tuple[str, int]:
        """Learner rank 0 and every rollout worker join the weight-sync group (all launched
        before any is awaited: each join blocks until the whole group is there); rank 0 then
        plans the buckets. Returns the group's backend and world size."""
        cfg, timeout = self.cfg, self.cfg.cluster.start_timeout_s
        # The group's store lives on learner rank 0's node, on a port rank 0 reserves just now
        # (a reservation lasts a minute; the actors' start before this can take longer). Asked
        # of the running rank: a probe task would start a worker process (~12 s on 2 cores).
        host = self.learner_host
        (port,) = _await_start(
            "start", self._calls(self.learners[:1], "learner rank", "reserve_port"), timeout
        )
        learners, rollouts = self.learners, self.rollouts
        members = _await_start(
            "start", self._calls(rollouts, "rollout worker", "sync_members"), timeout
        )
        offsets, sync_world = sync_ranks(members)
        backend, sync_timeout = sync_backend(cfg.cluster), cfg.sync.timeout_s
        generation = self.sync_generation
        joins = [
            (
                "learner rank 0",
                learners[0].join_sync_group.remote(
                    host, port, sync_world, backend, sync_timeout, generation
                ),
            )
        ]
        joins += [
            (
                f"rollout worker {i}",
                r.join_sync_group.remote(
                    host, port, offset, sync_world, backend, sync_timeout, generation
                ),
            )
            for i, (r, offset) in enumerate(zip(rollouts, offsets, strict=True))
        ]
        _await_start("start: joining the weight-sync group", joins, timeout)
        wire_dtype = str(cfg.sync.wire_dtype) if cfg.sync.wire_dtype else None
        bucket_bytes = cfg.sync.bucket_mb * 2**20
        self.sync_plan, self.trainable_plan = _await_start(
            "start",
            [
                ("learner rank 0", learners[0].sync_plan.remote(bucket_bytes, wire_dtype)),
                ("learner rank 0", learners[0].sync_plan.remote(bucket_bytes, wire_dtype, True)),
            ],
            timeout,
        )
        return backend, sync_world

    def shutdown(self) -> None:
        """Kill every actor and release the placement group. A stage still running on another
        thread (the pipeline's) then fails instead of replacing the actors."""
        import ray
        from ray.util.placement_group import remove_placement_group

        self.closed = True
        for actor in self.learners + self.rollouts + self.rewards:
            ray.kill(actor)
        remove_placement_group(self.placement_group)

    # ----------------------------------------------------------------------------- stages

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions per prompt, one Group per prompt in order; prompts are spread evenly
        over the rollout workers."""
        shares = contiguous_shares(prompts, len(self.rollouts))
        results: dict[int, list[Group]] = {}
        todo = [i for i, share in enumerate(shares) if share]
        while todo:
            called = {i: self.rollouts[i] for i in todo}
            calls = [
                (f"rollout worker {i}", called[i].generate.remote(shares[i], n, sampling))
                for i in todo
            ]
            outcomes = _await_outcomes("generate", calls, self.timeout_s)
            results.update(
                (i, out) for i, out in zip(todo, outcomes, strict=True) if not _died(out)
            )
            # A dead worker's prompts go to its replacement: none lost, none generated twice.
            dead = {i: out for i, out in zip(todo, outcomes, strict=True) if _died(out)}
            if dead:
                self.replace_rollouts(dead, "generate", called=called)
            todo = sorted(dead)
        return [group for i in sorted(results) for group in results[i]]

    def score(self, groups: Sequence[Group], items: Sequence[MCQItem]) -> None:
        """Fill each group's per-completion reward breakdowns (in place); completions are spread
        evenly over the reward workers.

        A worker that dies is replaced and its batch scored again. One that does not answer
        within `reward.timeout_s` (a reward function that hangs) is replaced, and its batch's
        completions count as failed: scoring them again would likely hang again.
        """
        pairs = [
            (c.text, item, len(c.token_ids))
            for g, item in zip(groups, items, strict=True)
            for c in g.completions
        ]
        shares = contiguous_shares(pairs, len(self.rewards))
        results: dict[int, list[dict[str, float]]] = {}
        todo = [i for i, share in enumerate(shares) if share]
        while todo:
            calls = [(f"reward worker {i}", self.rewards[i].score.remote(shares[i])) for i in todo]
            outcomes = _await_outcomes("score", calls, self.cfg.reward.timeout_s, stalls=True)
            retry = []
            for i, outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, StageTimeoutError):
                    self._replace_reward(i, outcome)
                    results[i] = [failed_reward(timed_out=True) for _ in shares[i]]
                elif _died(outcome):
                    self._replace_reward(i, outcome)
                    retry.append(i)
                else:
                    results[i] = outcome
            todo = retry
        breakdowns = iter(b for i in sorted(results) for b in results[i])
        for g in groups:
            g.rewards = [next(breakdowns) for _ in g.completions]

    def _replace_reward(self, i: int, fault: ClusterError) -> None:
        """A new reward worker `i` for one that died or hung (within the restart limit)."""
        import ray

        self._count_restart(fault)
        log.warning("%s; replacing it", fault)
        ray.kill(self.rewards[i], no_restart=True)
        self.rewards[i] = self._start_reward()
        self._await_pings([self.rewards[i]], "replacement reward worker")
        self.reward_restarts += 1

    def _count_restart(self, fault: ClusterError) -> None:
        """Count one replacement, or raise `fault` when the restart limit is spent (or the
        cluster is shutting down)."""
        if self.closed:
            raise type(fault)(f"{fault}; the cluster is shutting down") from fault
        if not self.restart_limit.allow(time.monotonic()):
            limit = self.restart_limit
            raise type(fault)(
                f"{fault}; {len(limit.times)} worker replacement(s) within "
                f"{limit.window_s:g} s already (cluster.max_restarts={limit.max_restarts}, "
                "cluster.restart_window_s): stopping rather than restarting in a loop"
            ) from fault

    def replace_rollouts(
        self,
        dead: Mapping[int, ActorDiedError],
        stage: str,
        version: int | None = None,
        called: Mapping[int, Any] | None = None,
    ) -> None:
        """Replace the rollout workers that died: a new actor in each one's bundle, the
        weight-sync group re-formed by every member (a group cannot take a new one), the
        learner's current weights pushed whole and checked, and every worker told their policy
        version: `version`, or the one they already had (a death outside the weight sync).
        `called`: the actors the deaths were seen on; one another thread has replaced since is
        left alone.

        Raises the death as `ActorDiedError` when the restart limit is spent.
        """
        with self.sync_lock:
            if called is not None:
                dead = {i: d for i, d in dead.items() if self.rollouts[i] is called[i]}
            if dead:
                self._replace_rollouts(dead, stage, version)

    def _replace_rollouts(
        self, dead: Mapping[int, ActorDiedError], stage: str, version: int | None
    ) -> None:
        import ray

        for died in dead.values():
            self._count_restart(died)
            log.warning("%s; replacing it", died)
        started = time.monotonic()
        self.sync_generation += 1
        for i in dead:
            ray.kill(self.rollouts[i], no_restart=True)  # dead already, or as good as
            self.rollouts[i] = self._start_rollout(i)
        self._await_pings([self.rollouts[i] for i in dead], "replacement rollout worker")
        self._join_sync_group()
        version = self.version if version is None else version
        self.frozen_pushed = False  # a new engine holds the model path's weights
        self._push_weights(verify=True)  # the weights of `version` again, to every member
        self._await(
            f"{stage}: replacing rollout workers",
            self._calls(self.rollouts, "rollout worker", "set_policy_version", version),
        )
        self.version = version
        self.rollout_restarts += len(dead)
        log.warning(
            "%s: replaced rollout worker(s) %s in %.1f s (sync group generation %d, policy "
            "version %d, weights verified)",
            stage,
            sorted(dead),
            time.monotonic() - started,
            self.sync_generation,
            version,
        )

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
        return combine_rank_metrics(self._checked_steps("train", self._await("train", calls)))

    def train_sft(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One SFT optimizer step on a batch split evenly over the ranks."""
        num_tokens = sum(len(s.completion_ids) for s in samples)
        shards = split_even(samples, len(self.learners))
        calls = [
            (f"learner rank {rank}", learner.train_sft.remote(shard, num_tokens))
            for rank, (learner, shard) in enumerate(zip(self.learners, shards, strict=True))
        ]
        return combine_sft_metrics(self._checked_steps("sft", self._await("sft", calls)))

    def _checked_steps(self, stage: str, ranks: list[dict[str, float]]) -> list[dict[str, float]]:
        """The ranks' results, once their step decisions agree and skips are within the limit
        (`check_step_decisions`); a skipped step is logged."""
        check_step_decisions(ranks, self.cfg.learner.max_skipped_steps)
        if skipped := int(ranks[0].get("skipped_steps", 0.0)):
            log.warning(
                "%s: %d optimizer step(s) skipped on every learner rank: a NaN or Inf loss or "
                "gradient (%d in a row; learner.max_skipped_steps=%d stops the run)",
                stage,
                skipped,
                int(ranks[0].get("skipped_in_a_row_max", 0.0)),
                self.cfg.learner.max_skipped_steps,
            )
        return ranks

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
        with self.sync_lock:
            return self._sync_weights(verify)

    def _sync_weights(self, verify: bool) -> int:
        try:
            received = self._push_weights(verify)
        except RolloutsDiedError as died:
            # The replacement's push carries the new weights to every member: the sync is done.
            self.replace_rollouts(died.dead, "weight sync", version=self.version + 1)
            return self.version
        versions = {r["version"] for r in received}
        if len(versions) != 1:
            raise RuntimeError(
                f"rollout workers disagree on the policy version: {sorted(versions)}"
            )
        self.version = versions.pop()
        return self.version

    def _push_weights(self, verify: bool) -> list[dict[str, Any]]:
        """One push (`push_plan`) to every rollout worker; what each one reported.

        A learner rank's death ends the wait at once. A rollout worker's death breaks the
        collective for every member: the others are waited for until they leave it (an error
        from the broken group, or its `sync.timeout_s` deadline), then `RolloutsDiedError`
        names the dead for replacement.
        """
        plan, in_flight = self.push_plan(), self.cfg.sync.max_buckets_in_flight
        pushes = self._calls(self.learners, "learner rank", "push_weights", plan, verify, in_flight)
        receipts = self._calls(self.rollouts, "rollout worker", "receive_weights", plan, verify)
        results = _await_collective(
            "weight sync", pushes + receipts, self.timeout_s, replaceable=len(pushes)
        )
        sent, received = results[0], results[len(pushes) :]
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
        return received

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
        self.version = policy_version

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


def _ready_placement_group(cfg: TrainConfig, plan: BundlePlan) -> Any:
    """The run's placement group once Ray has reserved it (at most cluster.start_timeout_s)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    timeout = cfg.cluster.start_timeout_s
    pg = placement_group(plan.bundles, strategy=str(cfg.cluster.placement_strategy))
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(pg)
        raise StageTimeoutError(
            f"start: the placement group ({plan.bundles}) was not ready within {timeout:g} s "
            f"(cluster.start_timeout_s); {_free_resources()}"
        )
    return pg


def _await_start(stage: str, calls: list[Call], timeout_s: float) -> list[Any]:
    """`_await` for start-up, whose timeout also says what the cluster has free: an actor that
    cannot be scheduled and one still loading its model look alike from the driver."""
    try:
        return _await(stage, calls, timeout_s)
    except StageTimeoutError as err:
        raise StageTimeoutError(f"{err}; {_free_resources()}") from None


def _free_resources() -> str:
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return f"the cluster has {_format(free) or 'nothing'} free of {_format(total)}"


def _await(stage: str, calls: list[Call], timeout_s: float) -> list[Any]:
    """The results of `calls`, in order, waiting at most `timeout_s` for all of them.

    The first call to fail ends the wait at once: in a collective stage (train, weight sync,
    save) the other actors would otherwise sit in a collective with a dead peer until their own
    timeouts, and the driver with them.
    """
    results: dict[int, Any] = {}
    for i, outcome in _each_outcome(stage, calls, timeout_s):
        if isinstance(outcome, BaseException):
            raise outcome
        results[i] = outcome
    return [results[i] for i in range(len(calls))]


def _each_outcome(stage: str, calls: list[Call], timeout_s: float) -> Iterator[tuple[int, Any]]:
    """(index, `_outcome`) of each of `calls` as it finishes; `StageTimeoutError` naming the
    calls still running once `timeout_s` has passed."""
    import ray

    deadline = time.monotonic() + timeout_s
    index = {ref: i for i, (_, ref) in enumerate(calls)}
    pending = list(index)
    while pending:
        left = max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            _raise_timeout(stage, [calls[index[ref]][0] for ref in pending], timeout_s)
        for ref in ready:
            yield index[ref], _outcome(stage, *calls[index[ref]])


def _await_collective(
    stage: str, calls: list[Call], timeout_s: float, replaceable: int
) -> list[Any]:
    """The results of a collective stage's `calls`, in order, waiting at most `timeout_s`.

    Calls from index `replaceable` on are to actors that can be replaced. The death of any
    other ends the wait at once. A replaceable actor's death breaks the collective for the
    rest, whose failures follow from it: they are waited for (the group's own deadline ends
    them), then `RolloutsDiedError` names the dead. Without a death, the first failure is
    raised once every call has ended.
    """
    outcomes: dict[int, Any] = {}
    for i, outcome in _each_outcome(stage, calls, timeout_s):
        if _died(outcome) and i < replaceable:
            raise outcome
        outcomes[i] = outcome
    dead = {i - replaceable: o for i, o in outcomes.items() if _died(o)}
    if dead:
        raise RolloutsDiedError(dead)
    for i in range(len(calls)):
        if isinstance(outcomes[i], BaseException):
            raise outcomes[i]
    return [outcomes[i] for i in range(len(calls))]


def _await_outcomes(
    stage: str, calls: list[Call], timeout_s: float, stalls: bool = False
) -> list[Any]:
    """All of `calls`' results, but a call whose actor died (or whose engine broke for good, as
    if dead) gives an `ActorDiedError` in its place instead of raising: the caller may replace
    the actor, and the others' results stand. With `stalls`, a call still running after
    `timeout_s` gives a `StageTimeoutError` in its place."""
    import ray

    refs = [ref for _, ref in calls]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending and not stalls:
        _raise_timeout(stage, [name for name, ref in calls if ref in pending], timeout_s)
    answered = iter(_gather(stage, [call for call in calls if call[1] not in pending]))
    return [
        StageTimeoutError(f"{stage}: no answer from {name} within {timeout_s:g} s")
        if ref in pending
        else next(answered)
        for name, ref in calls
    ]


def _raise_timeout(stage: str, late: list[str], timeout_s: float) -> None:
    raise StageTimeoutError(
        f"{stage}: no answer from {', '.join(late)} within {timeout_s:g} s (a stalled or "
        "unschedulable actor; see cluster.call_timeout_s / cluster.start_timeout_s)"
    )


def _gather(stage: str, calls: list[Call]) -> list[Any]:
    """The finished `calls`' results; a dead actor's (or broken engine's) as `ActorDiedError`,
    any other exception raised with a note naming the actor and stage."""
    outcomes = [_outcome(stage, name, ref) for name, ref in calls]
    for outcome in outcomes:
        if isinstance(outcome, Exception) and not _died(outcome):
            raise outcome
    return outcomes


def _outcome(stage: str, name: str, ref: Any) -> Any:
    """A finished call's result; a dead actor's (or broken engine's) `ActorDiedError`, or the
    exception it raised, noted with the actor and stage."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(ref)
    except RayActorError as err:
        return _death(f"{stage}: {name} died: {err}", err)
    except EngineBrokenError as err:  # alive, but its engine is gone for good: as if dead
        cause = getattr(err, "cause", err)  # Ray's wrapper holds the actor's own exception
        return _death(f"{stage}: {name} must be replaced: {cause}", err)
    except Exception as err:
        err.add_note(f"(raised by {name} during {stage})")
        return err


def _death(message: str, cause: BaseException) -> ActorDiedError:
    died = ActorDiedError(message)
    died.__cause__ = cause
    return died


def _died(outcome: Any) -> bool:
    return isinstance(outcome, ActorDiedError)


def rollout_device(cfg: TrainConfig) -> str:
    """The rollout workers' torch device: `rollout.device`, with auto meaning what the placement
    gives them (cuda with GPUs in their bundle, else cpu), never what a node happens to have."""
    if cfg.rollout.device != Device.auto:
        return str(cfg.rollout.device)
    return "cuda" if cfg.cluster.gpus_per_rollout_worker > 0 else "cpu"


def _engine_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Engine options of the configured backend (the vLLM section for vLLM; HF takes none)."""
    return {"vllm": cfg.rollout.vllm} if cfg.rollout.backend == Backend.vllm else {}


def _node_address() -> tuple[str, int]:
    """This node's address as Ray sees it, and a port reserved on it (`find_free_port`)."""
    import ray.util

    from gmai_rl.sync.group import find_free_port

    return ray.util.get_node_ip_address(), find_free_port()
