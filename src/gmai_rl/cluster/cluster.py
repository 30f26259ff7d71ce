"""The `Cluster`: start and stop the run's actors, and every stage the driver runs on them.

The driver (gmai_rl.loop) calls `generate`, `score`, `train`, `train_sft`, `sync_weights`,
`save_state`... Each splits its work over the actors, launches every call before awaiting any
(`waits.gather`), and returns the results in input order. The weight push is a `WeightSync`,
the replacement of dead workers a `Recovery`; the `Cluster` composes them.

How each stage survives a rollout worker's death (the table of every fault:
docs/architecture.md): `generate` hands a dead worker's prompts to the workers still alive
(none lost, none generated twice), `sync_weights` replaces every worker that died since the last
push before pushing (and again any that dies during it), `save_state` replaces one that died
and saves the replacement's state, `sleep_rollouts`/`wake_rollouts` note the death for the next
push. Learner ranks are not replaceable: their death stops the stage at once, naming the rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

from gmai_rl.cluster.actors import LEARNER, REWARD, ROLLOUT, Actors
from gmai_rl.cluster.errors import RolloutsDiedError, StageTimeoutError
from gmai_rl.cluster.placement import contiguous_shares, plan_bundles
from gmai_rl.cluster.recovery import Recovery, note_deaths
from gmai_rl.cluster.session import check_resources, ray_session, ready_placement_group
from gmai_rl.cluster.waits import IN_PLACE, Policy, died, gather
from gmai_rl.cluster.weight_sync import WeightSync
from gmai_rl.config import TrainConfig
from gmai_rl.learner.batching import plan_rank_batches, split_even
from gmai_rl.learner.options import OptimOptions
from gmai_rl.learner.rank_metrics import (
    check_step_decisions,
    combine_rank_metrics,
    combine_sft_metrics,
)
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams, TrainSample, failed_reward

log = logging.getLogger(__name__)


class Cluster:
    """The actors of one training run, and every remote call the driver makes to them."""

    def __init__(self, cfg: TrainConfig, placement_group: Any) -> None:
        self.cfg = cfg
        self.placement_group = placement_group
        # Engines that give their accelerator memory back while the learners train (colocated
        # vLLM with sleep mode); whether a sleep drops their weights is the weight sync's
        # `resend_frozen` (level 2: every push after it carries every weight).
        self.rollouts_sleep = engine_spec(cfg.rollout.backend).sleeps(cfg)
        self.rollouts_asleep = False
        self.weights_dropped = False
        """The engines woke from a sleep that dropped their weights and no push has filled them
        since: they must not generate."""
        self.actors = Actors(cfg, placement_group, plan_bundles(cfg.cluster))
        self.sync = WeightSync(cfg, self.actors)
        self.recovery = Recovery(cfg, self.actors, self.sync)

    # ------------------------------------------------------------------------ start, stop

    @classmethod
    def start(cls, cfg: TrainConfig) -> Cluster:
        """Check that the cluster can hold the run, place and start every actor, form the learner
        group and the weight-sync group; on failure, remove whatever was started."""
        return cls._start(cfg)

    @classmethod
    def start_generation(cls, cfg: TrainConfig) -> Cluster:
        """A cluster of `cfg`'s rollout and reward workers only, generating from the checkpoint
        at model.path (evaluation, rejection sampling): no learners, no weight-sync group, the
        engines awake throughout. A dead rollout worker's prompts go to the others, and with
        none left the dead are replaced (they load the same checkpoint)."""
        alone = replace(cfg.cluster, learner_ranks=0, colocate=False)
        return cls._start(replace(cfg, cluster=alone))

    @classmethod
    def _start(cls, cfg: TrainConfig) -> Cluster:
        plan = plan_bundles(cfg.cluster)
        check_resources(cfg, plan)
        cluster = cls(cfg, ready_placement_group(cfg, plan))
        try:
            cluster.actors.start(sleeps=cluster.rollouts_sleep)
            cluster.rollouts_asleep = cluster.rollouts_sleep
            backend, world = cluster.sync.form() if plan.learner_bundles else ("none", 0)
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
            len(cluster.actors.rewards),
            backend,
            world,
        )
        return cluster

    def shutdown(self) -> None:
        """Kill every actor and release the placement group. A stage still running on another
        thread (the pipeline's) then fails instead of replacing the actors."""
        from ray.util.placement_group import remove_placement_group

        self.recovery.closed = True
        self.actors.kill_all()
        remove_placement_group(self.placement_group)

    # ---------------------------------------------------------------------- what it holds

    @property
    def timeout_s(self) -> float:
        """The bound on every stage's calls (cluster.call_timeout_s)."""
        return self.actors.call_timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self.actors.call_timeout_s = seconds

    @property
    def learners(self) -> list[Any]:
        return self.actors.learners

    @property
    def rollouts(self) -> list[Any]:
        return self.actors.rollouts

    @property
    def version(self) -> int:
        """The rollout workers' policy version: weight pushes loaded (`sync_weights`)."""
        return self.sync.version

    @property
    def rollout_restarts(self) -> int:
        return self.recovery.rollout_restarts

    @property
    def reward_restarts(self) -> int:
        return self.recovery.reward_restarts

    # ----------------------------------------------------------------------------- stages

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions per prompt, one Group per prompt in order; prompts are spread evenly
        over the live rollout workers. A dead worker's prompts go to the others, each generated
        once; with none left, the dead are replaced first (`Recovery.replace_rollouts`)."""
        self._ready_to_generate()
        groups: list[Group | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        while todo:
            if not (live := self.recovery.live_rollouts()):
                self.recovery.replace_rollouts("generate", push=True)
                live = self.recovery.live_rollouts()
            work = [
                (w, s) for w, s in zip(live, contiguous_shares(todo, len(live)), strict=True) if s
            ]
            called = {w: self.rollouts[w] for w, _ in work}
            calls = [
                (
                    f"{ROLLOUT} {w}",
                    called[w].generate.remote([prompts[i] for i in share], n, sampling),
                )
                for w, share in work
            ]
            todo = []
            for (w, share), out in zip(
                work, gather("generate", calls, self.timeout_s, IN_PLACE), strict=True
            ):
                if died(out):
                    log.warning("%s; its prompts go to the other workers", out)
                    self.recovery.note_dead(w, called[w], out)
                    todo += share
                else:
                    for i, group in zip(share, out, strict=True):
                        groups[i] = group
            todo.sort()
        return cast(list[Group], groups)  # every prompt's group is in by now

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
        shares = contiguous_shares(pairs, len(self.actors.rewards))
        results: dict[int, list[dict[str, float]]] = {}
        todo = [i for i, share in enumerate(shares) if share]
        policy = Policy(keep_dead=IN_PLACE.keep_dead, stalls_in_place=True)
        while todo:
            calls = [
                (f"{REWARD} {i}", self.actors.rewards[i].score.remote(shares[i])) for i in todo
            ]
            retry = []
            for i, out in zip(
                todo, gather("score", calls, self.cfg.reward.timeout_s, policy), strict=True
            ):
                if isinstance(out, StageTimeoutError):
                    self.recovery.replace_reward(i, out)
                    results[i] = [failed_reward(timed_out=True) for _ in shares[i]]
                elif died(out):
                    self.recovery.replace_reward(i, out)
                    retry.append(i)
                else:
                    results[i] = out
            todo = retry
        breakdowns = iter(b for i in sorted(results) for b in results[i])
        for g in groups:
            g.rewards = [next(breakdowns) for _ in g.completions]

    def start_stage(self, optim: OptimOptions, reset_reference: bool = False) -> None:
        """Begin a training stage (SFT or RL) on every learner rank: its LR schedule and, with
        `reset_reference`, the KL reference set to the current policy."""
        self._all(LEARNER, "start stage", "start_stage", optim, reset_reference)

    def train(self, samples: Sequence[TrainSample], num_minibatches: int) -> dict[str, float]:
        """PPO epochs over a rollout batch, each rank on its share; the ranks' combined metrics."""
        plans = plan_rank_batches(samples, len(self.learners), num_minibatches)
        self.sleep_rollouts()
        calls = self._training_calls("train_rl", [(plan,) for plan in plans])
        return combine_rank_metrics(self._checked("train", gather("train", calls, self.timeout_s)))

    def train_sft(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One SFT optimizer step on a batch split evenly over the ranks."""
        num_tokens = sum(len(s.completion_ids) for s in samples)
        shards = split_even(samples, len(self.learners))
        self.sleep_rollouts()
        calls = self._training_calls("train_sft", [(shard, num_tokens) for shard in shards])
        return combine_sft_metrics(self._checked("sft", gather("sft", calls, self.timeout_s)))

    def _training_calls(self, method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        """Each learner rank's training call, sent under the sync lock once the weight sync
        knows the learners move past the pushed version (a replacement on another thread
        then either runs before them or refuses)."""
        with self.sync.lock:
            self.sync.training()
            return [
                (f"{LEARNER} {rank}", getattr(learner, method).remote(*a))
                for rank, (learner, a) in enumerate(zip(self.learners, args, strict=True))
            ]

    def _checked(self, stage: str, ranks: list[dict[str, float]]) -> list[dict[str, float]]:
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

    def sync_weights(self, verify: bool) -> int:
        """Push the learner's weights to every rollout worker; returns the new policy version.

        Workers that died since the last push are replaced first (they are pinged: Ray knows
        at once), and any that dies during the push is replaced after it, then the push is
        repeated, whole: every worker ends with the learner's weights. With `verify`, every
        tensor's checksum on every worker must equal what rank 0 sent. Sleeping engines are
        woken first.
        """
        self.wake_rollouts()
        return self._push(verify)

    def _push(self, verify: bool, same_weights: bool = False) -> int:
        with self.sync.lock:
            self.recovery.find_dead_rollouts("weight sync")
            self.recovery.replace_rollouts("weight sync", push=False)
            while True:
                try:
                    version = self.sync.push(verify, same_weights)
                    self.weights_dropped = False
                    return version
                except RolloutsDiedError as died_in_push:
                    note_deaths(self.recovery, died_in_push.dead)
                    self.recovery.replace_rollouts("weight sync", push=False)

    # ------------------------------------------------------------- sleeping engines

    def sleep_rollouts(self) -> None:
        """Colocated engines release their accelerator memory for training (a no-op for engines
        that keep it, and for engines asleep already). Training calls this itself: no learner
        trains beside an awake engine."""
        if self.rollouts_sleep and not self.rollouts_asleep:
            self._on_live_rollouts("sleep", "sleep")
            self.rollouts_asleep = True

    def wake_rollouts(self) -> None:
        """... and take it back, once the learners have returned their allocator's cached
        blocks (training's peak would otherwise stay reserved beside the waking engine). Every
        wake goes through here; the weight push and generation call it themselves. Engines
        whose sleep dropped their weights then hold none to generate with until the next push,
        which carries every weight (`WeightSync.plan`)."""
        if self.rollouts_asleep:
            self._all(LEARNER, "wake up", "release_cached_memory")
            self._on_live_rollouts("wake up", "wake_up")
            self.rollouts_asleep = False
            self.weights_dropped = self.sync.resend_frozen

    def _ready_to_generate(self) -> None:
        """Engines awake, holding the learners' weights. After a sleep that dropped them (the
        one at start, before any push) the learners' current weights are pushed again, as the
        same policy version."""
        self.wake_rollouts()
        if not self.weights_dropped:
            return
        if not self.sync.current:
            raise RuntimeError(
                "the rollout engines dropped their weights in a sleep and the learners have "
                f"trained past policy version {self.sync.version}: push before generating"
            )
        log.info("the engines' sleep dropped their weights: pushing them again")
        self._push(self.cfg.sync.verify, same_weights=True)

    def _on_live_rollouts(self, stage: str, method: str) -> None:
        """`method` on every live rollout worker; a death is noted for the next push."""
        live = self.recovery.live_rollouts()
        called = [self.rollouts[i] for i in live]
        calls = self.actors.calls(ROLLOUT, method, only=live)
        for i, actor, out in zip(
            live, called, gather(stage, calls, self.timeout_s, IN_PLACE), strict=True
        ):
            if died(out):
                self.recovery.note_dead(i, actor, out)

    def policy_version(self) -> int:
        """The rollout workers' policy version (weight updates loaded)."""
        versions = self._all(ROLLOUT, "policy version", "get_policy_version")
        if len(set(versions)) != 1:
            raise RuntimeError(f"rollout workers disagree on the policy version: {versions}")
        return int(versions[0])

    # ------------------------------------------------------------------------ checkpoints

    def save_state(self, folder: str) -> None:
        """Every actor writes its part of a resumable checkpoint into `folder` (a path every
        node can reach): the learner ranks their DeepSpeed state, the rollout workers their RNG.
        A rollout worker that dies meanwhile is replaced (it is given the current weights) and
        its replacement's state is saved."""
        n = len(self.learners)
        calls = self.actors.calls(LEARNER, "save_state", folder)
        called = list(self.rollouts)
        calls += self._rollout_saves(folder, range(len(called)))
        policy = Policy(keep_dead=lambda i, death: i >= n)
        outcomes = gather("save checkpoint", calls, self.timeout_s, policy)
        dead = [i for i, out in enumerate(outcomes[n:]) if died(out)]
        for i in dead:
            self.recovery.note_dead(i, called[i], outcomes[n + i])
        if dead:
            self.recovery.replace_rollouts("save checkpoint", push=True)
            gather("save checkpoint", self._rollout_saves(folder, dead), self.timeout_s)

    def _rollout_saves(self, folder: str, workers: Sequence[int]) -> list[Any]:
        return [
            (f"{ROLLOUT} {i}", self.rollouts[i].save_state.remote(f"{folder}/rollout_{i}.pt"))
            for i in workers
        ]

    def restore_state(self, folder: str, policy_version: int) -> None:
        """Load a checkpoint `save_state` wrote: the learners' state, then a full weight push
        (the workers started from the model path), then the workers' RNG and policy version."""
        self._all(LEARNER, "load checkpoint", "load_state", folder)
        self.sync.frozen_pushed = False
        self.sync_weights(self.cfg.sync.verify)
        calls = [
            (f"{ROLLOUT} {i}", worker.load_state.remote(f"{folder}/rollout_{i}.pt"))
            for i, worker in enumerate(self.rollouts)
        ]
        gather("load checkpoint", calls, self.timeout_s)
        if self.policy_version() != policy_version:
            raise RuntimeError(f"resumed workers are not at policy version {policy_version}")
        self.sync.version = policy_version

    def save(self, path: str) -> None:
        """Write the policy as an HF checkpoint (every rank takes part; rank 0 writes)."""
        self._all(LEARNER, "save", "save_pretrained", path)
        log.info("saved checkpoint to %s", path)

    # ------------------------------------------------------------------------- inspection

    def learner_weights(self) -> dict[str, Any]:
        """The policy's full parameters on CPU (every rank takes part under ZeRO-3)."""
        return dict(self._all(LEARNER, "read weights", "named_parameters")[0])

    def rollout_checksums(self) -> list[dict[str, str]]:
        """Each rollout worker's checksums of its engine's weights, in the plan's wire dtypes."""
        return self._all(ROLLOUT, "checksums", "weight_checksums", self.sync.full_plan)

    def _all(self, kind: str, stage: str, method: str, *args: Any) -> list[Any]:
        """`method` on every actor of a kind; any failure ends the stage."""
        return gather(stage, self.actors.calls(kind, method, *args), self.timeout_s)


@contextmanager
def generation_cluster(cfg: TrainConfig) -> Iterator[Cluster]:
    """A generation cluster of `cfg` (`Cluster.start_generation`) in a Ray session of its own
    (`ray_session`), shut down on exit: what `gmai-rl eval --ray` and `gmai-rl synth --ray`
    generate on."""
    with ray_session(cfg):
        cluster = Cluster.start_generation(cfg)
        try:
            yield cluster
        finally:
            cluster.shutdown()
