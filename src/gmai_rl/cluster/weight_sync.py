"""The learner -> rollout weight push, as the driver runs it: the group, its plans, the versions.

Learner rank 0 and every rollout member (one per HF worker, one per vLLM tensor-parallel worker)
form the sync group (gmai_rl.sync.group); a push is every learner rank's `push_weights` (ZeRO-3
gathers bucket by bucket, rank 0 sends) and every rollout worker's `receive_weights`, all
launched before any is awaited, since each blocks on the others. The transport itself:
docs/weight-sync.md.

What `WeightSync` keeps between pushes:
- the bucket plans: every parameter, and the trainable ones only (frozen parameters, e.g. a
  frozen vision tower, travel once, and again whenever the engines may have lost them);
- which formation of the group is live (`generation`: one more each time it is re-formed around
  a replaced worker; a stale member is refused) and its store's address;
- the policy version the rollout workers hold (`version`: pushes loaded), and whether the
  learners still hold exactly those weights (`current`: False from a training step's start to
  the next push), which decides whether a replacement may be given the learners' weights as
  that version;
- `lock`: held by whatever changes the group or pushes through it; with algo.max_staleness > 0
  the pipeline's thread generates while the driver's thread trains.

A rollout worker that dies during a push is seen by Ray at once; the push's other members are
told to stop waiting on it through rank 0's store (`request_abort`: NCCL waits poll it; gloo
members are never left waiting on a dead peer), and `RolloutsDiedError` names the dead once the
others have left. Replacing them is gmai_rl.cluster.recovery's job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from gmai_rl.cluster.actors import LEARNER, ROLLOUT, Actors
from gmai_rl.cluster.errors import ActorDiedError, RolloutsDiedError
from gmai_rl.cluster.placement import sync_backend, sync_ranks
from gmai_rl.cluster.waits import Policy, died, gather
from gmai_rl.config import TrainConfig
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.sync.buckets import Bucket
from gmai_rl.sync.group import SyncGroupError, request_abort

log = logging.getLogger(__name__)


class WeightSync:
    """The weight-sync group of one run and every push through it."""

    def __init__(self, cfg: TrainConfig, actors: Actors) -> None:
        self.cfg, self.actors = cfg, actors
        self.lock = threading.RLock()
        self.full_plan: list[Bucket] = []
        """Every parameter of the policy."""
        self.trainable_plan: list[Bucket] = []
        """The parameters training changes: after the first push, the only ones that travel."""
        self.frozen_pushed = False
        # An engine whose sleep discards its weights (vLLM level 2), frozen ones included, gets
        # every push whole.
        self.resend_frozen = engine_spec(cfg.rollout.backend).sleep_discards_weights(cfg)
        self.version = 0
        self.current = True
        """The learners hold the weights of `version` (no training step since the push)."""
        self.generation = 0
        self.address: tuple[str, int] | None = None
        self.offsets: list[int] = []
        """Each rollout worker's first rank in the group (`placement.sync_ranks`)."""
        self.members: list[int] = []
        """Each rollout worker's number of ranks in the group."""

    def form(self) -> tuple[str, int]:
        """(Re-)form the group, generation `self.generation`: learner rank 0 and every rollout
        worker join it, all launched before any is awaited (each join blocks until the whole
        group is there); the first time, rank 0 then plans the buckets. Returns the group's
        backend and world size."""
        cfg, actors, timeout = self.cfg, self.actors, self.cfg.cluster.start_timeout_s
        # The store lives on learner rank 0's node, on a port rank 0 reserves just now (a
        # reservation lasts a minute; the actors' start before this can take longer).
        (port,) = gather("start", actors.calls(LEARNER, "reserve_port", only=[0]), timeout)
        members = gather("start", actors.calls(ROLLOUT, "sync_members"), timeout)
        offsets, world = sync_ranks(members)
        host, backend = actors.learner_host, sync_backend(cfg.cluster)
        group = (world, backend, cfg.sync.timeout_s, self.generation)
        joins = [("learner rank 0", actors.learners[0].join_sync_group.remote(host, port, *group))]
        joins += [
            (f"rollout worker {i}", worker.join_sync_group.remote(host, port, offset, *group))
            for i, (worker, offset) in enumerate(zip(actors.rollouts, offsets, strict=True))
        ]
        gather("start: joining the weight-sync group", joins, timeout)
        self.address, self.offsets, self.members = (host, port), offsets, members
        if not self.full_plan:
            self._plan(timeout)
        return backend, world

    def _plan(self, timeout: float) -> None:
        wire = str(self.cfg.sync.wire_dtype) if self.cfg.sync.wire_dtype else None
        size, rank0 = self.cfg.sync.bucket_mb * 2**20, self.actors.learners[0]
        self.full_plan, self.trainable_plan = gather(
            "start",
            [
                ("learner rank 0", rank0.sync_plan.remote(size, wire)),
                ("learner rank 0", rank0.sync_plan.remote(size, wire, True)),
            ],
            timeout,
        )
        if self.cfg.model.lora.enabled:
            # Every rollout worker loads the same base (model.path) the learners' adapters sit
            # on, and the base never trains: only the adapters ever travel, from the first push.
            self.full_plan = self.trainable_plan

    def plan(self) -> list[Bucket]:
        """What the next push carries: every parameter the first time (and whenever the engines
        may have lost their frozen weights), then only the trainable ones, since frozen
        parameters (a frozen vision tower: ~0.67B at 7B) never change."""
        if self.frozen_pushed and not self.resend_frozen:
            return self.trainable_plan
        return self.full_plan

    def training(self) -> None:
        """The learners are about to train: from here to the next push they hold weights no
        rollout worker has. Call it holding `lock`, before the training calls are sent."""
        self.current = False

    def push(self, verify: bool, same_weights: bool = False) -> int:
        """One push (`plan()`) to every rollout worker; returns the workers' policy version.

        With `verify`, every tensor's checksum on every worker must equal what rank 0 sent.
        `same_weights`: the learners' weights are those of `version` already (a re-push to a
        replaced worker): every worker stays at `version`.

        Raises:
            RolloutsDiedError: rollout workers died during the push (or rank 0 could not reach
                them); the others have left it, holding the new weights or not.
            ActorDiedError: a learner rank died (at once: nothing to replace).
        """
        plan, n = self.plan(), len(self.actors.learners)
        calls = self.actors.calls(
            LEARNER, "push_weights", plan, verify, self.cfg.sync.max_buckets_in_flight
        )
        calls += self.actors.calls(ROLLOUT, "receive_weights", plan, verify)
        told: list[ActorDiedError] = []

        def rollout_death(index: int, death: ActorDiedError) -> bool:
            if index < n:
                return False  # a learner rank: the run stops, nothing waits on
            if not told:
                told.append(death)
                self.abort(str(death))
            return True

        outcomes = gather(
            "weight sync",
            calls,
            self.actors.call_timeout_s,
            Policy(rollout_death, settle=True),
        )
        sent, received = outcomes[0], outcomes[n:]
        dead = {i: r for i, r in enumerate(received) if died(r)}
        lost = sent.get("lost", {}) if isinstance(sent, dict) else {}
        dead.update(self._unreached(lost, dead))
        if dead:
            raise RolloutsDiedError(dead)
        if verify:
            _check_checksums(sent["checksums"], received)
        versions = {r["version"] for r in received}
        if len(versions) != 1:
            raise RuntimeError(
                f"rollout workers disagree on the policy version: {sorted(versions)}"
            )
        self.frozen_pushed = self.current = True
        if same_weights:
            self.set_versions(self.version)
        else:
            self.version = versions.pop()
        return self.version

    def _unreached(
        self, lost: Mapping[int, str], dead: Mapping[int, ActorDiedError]
    ) -> dict[int, ActorDiedError]:
        """Rollout workers not seen dead whose group ranks rank 0 could not reach: they did not
        take the push (a broken link), so they are replaced like the dead."""
        out = {}
        for i, (first, count) in enumerate(zip(self.offsets, self.members, strict=True)):
            why = [lost[r] for r in range(first, first + count) if r in lost]
            if why and i not in dead:
                out[i] = ActorDiedError(
                    f"weight sync: rollout worker {i} was not reached: {why[0]}"
                )
        return out

    def abort(self, reason: str) -> None:
        """Tell every member of the live group to stop waiting on it (see module docstring)."""
        if self.address is None:
            return
        try:
            request_abort(*self.address, reason)
        except SyncGroupError as err:  # the group's own deadline still ends every wait
            log.warning("%s", err)

    def set_versions(self, version: int) -> None:
        """Tell every rollout worker the policy version its weights are."""
        calls = self.actors.calls(ROLLOUT, "set_policy_version", version)
        gather("policy version", calls, self.actors.call_timeout_s)
        self.version = version


def _check_checksums(sent: Mapping[str, str] | None, received: list[Any]) -> None:
    """Every worker's checksums equal what rank 0 sent, tensor for tensor."""
    for i, r in enumerate(received):
        bad = [name for name, digest in (sent or {}).items() if r["checksums"].get(name) != digest]
        if bad or len(r["checksums"]) != len(sent or {}):
            raise RuntimeError(f"rollout worker {i}: weights differ from the learner's: {bad[:5]}")
