"""Which dead workers the run replaces, when, and within what limit.

Every death is acted on when Ray reports it, never by waiting out a deadline:
- a rollout worker's death is noted (`note_dead`) wherever it is seen: its share of a
  generation goes to the workers still alive (gmai_rl.cluster.cluster), and it is replaced
  before the next weight push (`replace_rollouts`), which then carries every weight to it.
  Before each push the workers are pinged (`find_dead_rollouts`), so one that died while idle
  (while the learners trained) never joins a push as a dead member;
- replacing rollout workers means new actors in the same bundles (a seed of their own), the
  weight-sync group re-formed by every member (a group cannot take a new one), every worker told
  the current policy version, and, where no push follows at once (a checkpoint, a generation
  left with no worker), the learners' current weights pushed whole and checked. That is only
  right while the learners hold the weights of that version (`WeightSync.current`): when every
  worker died while the learners trained ahead, `RolloutsLostError` says to push first;
- a reward worker holds no weights: it is replaced at once and its batch scored again (or, if
  it hung past reward.timeout_s, its batch counts as failed);
- a learner rank's death stops the run, naming the rank (`trainer.resume=auto` continues from
  the last checkpoint).

`RestartLimit` stops a crash loop: more than cluster.max_restarts replacements (rollout and
reward workers together) within cluster.restart_window_s stop the run instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from gmai_rl.cluster.actors import REWARD, ROLLOUT, Actors
from gmai_rl.cluster.errors import (
    ActorDiedError,
    ClusterError,
    RolloutsDiedError,
    RolloutsLostError,
)
from gmai_rl.cluster.waits import IN_PLACE, died, gather
from gmai_rl.cluster.weight_sync import WeightSync
from gmai_rl.config import TrainConfig

log = logging.getLogger(__name__)


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


class Recovery:
    """Replaces the workers that died, for one run's `Actors` and `WeightSync`."""

    def __init__(self, cfg: TrainConfig, actors: Actors, sync: WeightSync) -> None:
        self.cfg, self.actors, self.sync = cfg, actors, sync
        self.limit = RestartLimit(cfg.cluster.max_restarts, cfg.cluster.restart_window_s)
        self.rollout_restarts = 0
        """Rollout workers replaced since the start."""
        self.reward_restarts = 0
        """Reward workers replaced since the start."""
        self.dead: dict[int, ActorDiedError] = {}
        """Rollout workers seen dead and not yet replaced, by index."""
        self.closed = False
        """The run is shutting down: nothing is replaced any more."""

    # ------------------------------------------------------------------- rollout workers

    def note_dead(self, i: int, actor: Any, death: ActorDiedError) -> None:
        """Rollout worker `i` (the actor a call was made on) died. A death seen on an actor
        that has been replaced since (by another thread) is old news."""
        if self.actors.rollouts[i] is actor:
            self.dead.setdefault(i, death)

    def live_rollouts(self) -> list[int]:
        """The rollout workers not known to be dead, in order."""
        return [i for i in range(len(self.actors.rollouts)) if i not in self.dead]

    def find_dead_rollouts(self, stage: str) -> None:
        """Ping every rollout worker not known dead; note those Ray reports dead (at once)."""
        live = self.live_rollouts()
        handles = [self.actors.rollouts[i] for i in live]
        calls = self.actors.calls(ROLLOUT, "ping", only=live)
        outcomes = gather(stage, calls, self.actors.call_timeout_s, IN_PLACE)
        for i, actor, outcome in zip(live, handles, outcomes, strict=True):
            if died(outcome):
                self.note_dead(i, actor, outcome)

    def replace_rollouts(self, stage: str, push: bool) -> None:
        """Replace every rollout worker noted dead (see the module docstring). `push`: push the
        learners' weights (those of the current version) to every worker now; else the caller
        pushes next, and that push carries every weight."""
        push = push and bool(self.actors.learners)  # a generation cluster: nothing to push
        with self.sync.lock:
            while self.dead:
                if push and not self.sync.current:
                    raise RolloutsLostError(
                        f"{stage}: no rollout worker left that holds policy version "
                        f"{self.sync.version}, and the learners have trained past it; "
                        f"{'; '.join(str(d) for d in self.dead.values())}"
                    )
                self._replace(stage)
                if not push:
                    return
                try:
                    self.sync.push(verify=True, same_weights=True)
                except RolloutsDiedError as died_again:
                    for i, death in died_again.dead.items():
                        self.note_dead(i, self.actors.rollouts[i], death)

    def _replace(self, stage: str) -> None:
        dead, self.dead = dict(self.dead), {}
        for death in dead.values():
            self.count(death)
            log.warning("%s; replacing it", death)
        started = time.monotonic()
        self.sync.generation += 1
        for i in dead:
            ray.kill(self.actors.rollouts[i], no_restart=True)  # dead already, or as good as
            self.actors.rollouts[i] = self.actors.start_rollout(i, self.sync.generation)
        self.actors.await_started(ROLLOUT, only=sorted(dead))
        if self.actors.learners:  # else a generation cluster: the checkpoint's weights are all
            self.sync.form()
        self.sync.frozen_pushed = False  # a new engine holds the model path's weights
        self.sync.set_versions(self.sync.version)
        self.rollout_restarts += len(dead)
        log.warning(
            "%s: replaced rollout worker(s) %s in %.1f s (sync group generation %d, policy "
            "version %d)",
            stage,
            sorted(dead),
            time.monotonic() - started,
            self.sync.generation,
            self.sync.version,
        )

    # -------------------------------------------------------------------- reward workers

    def replace_reward(self, i: int, fault: ClusterError) -> None:
        """A new reward worker `i` for one that died or hung (within the restart limit)."""
        self.count(fault)
        log.warning("%s; replacing it", fault)
        ray.kill(self.actors.rewards[i], no_restart=True)
        self.actors.rewards[i] = self.actors.start_reward()
        self.actors.await_started(REWARD, only=[i])
        self.reward_restarts += 1

    # ---------------------------------------------------------------------------- limit

    def count(self, fault: ClusterError) -> None:
        """Count one replacement, or raise `fault` when the restart limit is spent (or the
        cluster is shutting down)."""
        if self.closed:
            raise type(fault)(f"{fault}; the cluster is shutting down") from fault
        if not self.limit.allow(time.monotonic()):
            limit = self.limit
            raise type(fault)(
                f"{fault}; {len(limit.times)} worker replacement(s) within "
                f"{limit.window_s:g} s already (cluster.max_restarts={limit.max_restarts}, "
                "cluster.restart_window_s): stopping rather than restarting in a loop"
            ) from fault


def note_deaths(recovery: Recovery, dead: Mapping[int, ActorDiedError]) -> None:
    """Note each of `dead` (rollout worker index -> death) on the worker now in its place."""
    for i, death in dead.items():
        recovery.note_dead(i, recovery.actors.rollouts[i], death)
