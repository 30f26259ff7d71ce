"""The driver: GRPO on a Ray cluster, stage by stage, in data-flow order.

    run      prepare data -> pre-flight plan (gmai_rl.plan) -> start the cluster
             -> SFT cold start -> evaluate -> RL -> evaluate -> report (gmai_rl.report)
    rl_step  sample prompts -> generate n each -> reward -> filter (refill) -> advantages
             -> train (PPO epochs on the learner ranks) -> push weights
    Pipeline the same steps in a run; with algo.max_staleness > 0 the next batches are
             collected on a second thread while the learners train

Every remote call goes through the `Cluster` (gmai_rl.cluster); every group records the policy
version that generated it, so the staleness of what is trained on is measured and checked
against `algo.max_staleness` every step (0, on-policy, in the synchronous loop), never assumed. Every record goes to metrics.jsonl and the configured
dashboards (gmai_rl.dashboards); long phases show their progress (gmai_rl.progress).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gmai_rl.algo import filter_by_accuracy, group_advantages
from gmai_rl.algo.staleness import batches_to_prefetch, check_staleness, drain_points
from gmai_rl.checkpoint import (
    DriverState,
    begin,
    checkpoint_root,
    commit,
    complete_checkpoints,
    prune,
    resolve_resume,
)
from gmai_rl.cluster.cluster import Cluster
from gmai_rl.cluster.environment import check_output_dir
from gmai_rl.cluster.session import ray_session
from gmai_rl.config import AlgoConfig, TrainConfig, validate
from gmai_rl.dashboards import Dashboards, open_dashboards, run_name
from gmai_rl.data import build_prompt
from gmai_rl.evaluate import summarize
from gmai_rl.feed import Datasets, ItemSampler, load_datasets, prepare_artifacts, sft_samples
from gmai_rl.metrics import (
    CollectStats,
    StageTimer,
    StepRecord,
    eval_line,
    progress_line,
    step_metrics,
)
from gmai_rl.plan import check, make_plan, render
from gmai_rl.progress import Progress
from gmai_rl.report import write_report
from gmai_rl.types import (
    REWARD_FAILED,
    REWARD_TIMED_OUT,
    Group,
    MCQItem,
    SamplingParams,
    TrainSample,
)

log = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run the configured job end to end (or continue it from a checkpoint: `trainer.resume`);
    returns what eval.json holds."""
    started = time.perf_counter()
    validate(cfg)
    check_output_dir(cfg.trainer.output_dir)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = resume_point(cfg)
    state = DriverState.read(resume) if resume else None
    prepare_artifacts(cfg)
    data = load_datasets(cfg)
    data_s = time.perf_counter() - started
    preflight(cfg, [*data.train, *data.eval])
    with ray_session(cfg):
        result = run_on_cluster(cfg, data, out, resume, state, started, data_s)
    if cfg.dashboards.report and (md := report(cfg, out, result, time.perf_counter() - started)):
        result["report"] = str(md)
    return result


def run_on_cluster(
    cfg: TrainConfig,
    data: Datasets,
    out: Path,
    resume: Path | None,
    state: DriverState | None,
    started: float,
    data_s: float,
) -> dict[str, Any]:
    """Start the cluster, then SFT, evaluation, RL, evaluation and the final checkpoint (or the
    rest of a resumed run); the cluster is shut down at the end."""
    # Before the cluster starts (minutes on a GPU node): a dashboard that cannot open (W&B online
    # without network) fails the run in seconds.
    dashboards = open_dashboards(cfg, out, keep_lines=state.metrics_lines if state else 0)
    cluster: Cluster | None = None
    result: dict[str, Any] = {"output_dir": str(out)}
    failed = True
    try:
        cluster = Cluster.start(cfg)
        startup_s = time.perf_counter() - started - data_s
        setup = {"stage": "setup", "data_seconds": data_s, "startup_seconds": startup_s}
        if state is not None:
            restore_start = time.perf_counter()
            cluster.restore_state(str(resume), state.policy_version)
            restore_s = time.perf_counter() - restore_start
            log.info("resumed from %s after RL step %d (%.1f s)", resume, state.step, restore_s)
            resumed = {"resumed_from": str(resume), "resumed_step": state.step}
            dashboards.write({**setup, **resumed, "restore_seconds": restore_s})
            result["before_rl"] = state.before_rl
        else:
            dashboards.write(setup)
            if cfg.sft.enabled:
                run_sft(cluster, data.sft, cfg, dashboards)
                cluster.sync_weights(cfg.sync.verify)
            result["before_rl"] = evaluate_and_record(
                cluster, data.eval, cfg, dashboards, "before_rl", 0
            )
        result["during_rl"] = run_rl(cluster, data, cfg, dashboards, result["before_rl"], state)
        result["after_rl"] = evaluate_and_record(
            cluster, data.eval, cfg, dashboards, "after_rl", cfg.trainer.steps
        )
        if cfg.trainer.save_final:
            cluster.save(str(out / "final"))
            result["checkpoint"] = str(out / "final")
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        failed = False
    finally:
        dashboards.close(failed)
        if cluster is not None:
            cluster.shutdown()
    return result


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from; a fresh start may not overwrite another run's."""
    resume = resolve_resume(cfg.trainer.resume, cfg.trainer.output_dir)
    existing = complete_checkpoints(checkpoint_root(cfg.trainer.output_dir))
    if cfg.trainer.resume is None and existing:
        raise ValueError(
            f"trainer.output_dir={cfg.trainer.output_dir} already holds checkpoints of a run "
            f"({existing[-1].name}): set trainer.resume=auto to continue it, or choose another "
            "trainer.output_dir"
        )
    return resume


def report(cfg: TrainConfig, out: Path, result: dict[str, Any], wall_s: float) -> Path | None:
    """report.png and report.md beside metrics.jsonl; the markdown's path. Training is done and
    saved by now, so a failure here is logged, not raised (None)."""
    try:
        png, md = write_report(out, cfg, result, cfg.dashboards.run_name or run_name(out), wall_s)
    except Exception:
        log.exception("could not write the run's report (metrics.jsonl and eval.json are complete)")
        return None
    log.info("report: %s, %s", md, png)
    return md


def preflight(cfg: TrainConfig, items: Sequence[MCQItem]) -> None:
    """Log the pre-flight plan (memory per GPU, prompt budget measured on `items`, placement);
    stop, before anything starts, when it cannot fit."""
    plan = make_plan(cfg, items=items)
    log.info("%s", render(plan))
    problems = check(plan)
    if problems:
        raise ValueError(
            "the configuration cannot fit (gmai-rl plan prints the whole plan):\n  "
            + "\n  ".join(problems)
        )


# -------------------------------------------------------------------------------------- sft


def run_sft(
    cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig, dashboards: Dashboards
) -> None:
    """Cross-entropy on reference reasoning traces (the paper's cold start)."""
    from gmai_rl.models.loading import load_processor, tokenizer_of

    samples = sft_samples(items, tokenizer_of(load_processor(cfg.model)), cfg.data.system_prompt)
    sampler = ItemSampler(samples, cfg.trainer.seed)
    cluster.start_stage(cfg.sft_optim)
    with Progress.of(cfg.dashboards, "sft", cfg.sft.steps, unit="step") as bar:
        for step in range(cfg.sft.steps):
            start = time.perf_counter()
            record = {
                "stage": "sft",
                "step": step,
                **cluster.train_sft(sampler.take(cfg.sft.batch_size)),
                "seconds": time.perf_counter() - start,
            }
            dashboards.write(record)
            bar.update(loss=record["sft_loss"])
            if step % 10 == 0 or step == cfg.sft.steps - 1:
                log.info(
                    "sft %d/%d | loss %.4f | lr %.2e",
                    step + 1,
                    cfg.sft.steps,
                    record["sft_loss"],
                    record["lr"],
                )


# --------------------------------------------------------------------------------------- rl


def run_rl(
    cluster: Cluster,
    data: Datasets,
    cfg: TrainConfig,
    dashboards: Dashboards,
    before_rl: dict[str, Any],
    resume: DriverState | None = None,
) -> list[dict[str, Any]]:
    """`trainer.steps` RL steps with periodic evaluation and checkpoints; returns the evaluations.

    From a checkpoint (`resume`) the learners already hold their stage, schedule position and KL
    reference, and the item order continues where it stopped.
    """
    sampler = ItemSampler(data.train, cfg.trainer.seed)
    history: list[dict[str, Any]] = []
    if resume is None:
        # The KL reference (if any) is the policy RL starts from, i.e. after the SFT cold start.
        cluster.start_stage(cfg.rl_optim, reset_reference=True)
    else:
        sampler.load_state(resume.sampler)
        history = list(resume.during_rl)
    first = resume.step if resume else 0
    steps = cfg.trainer.steps
    drains = drain_points(steps, cfg.trainer.eval_every, cfg.trainer.save_every)
    with (
        Progress.of(cfg.dashboards, "rl", steps, unit="step") as bar,
        Pipeline(cluster, sampler, cfg, steps, drains) as pipeline,
    ):
        if first:
            bar.advance_to(first)
        for step in range(first, cfg.trainer.steps):
            record = step_metrics(step, pipeline.step(step))
            dashboards.write(record)
            log.info(progress_line(record, cfg.trainer.steps))
            bar.update(reward=record["reward_mean"], acc=record["accuracy"])
            if step == first:
                # Start-up cost is what a user waits for before training shows: a line to find.
                log.info("first RL step done at unix time %.3f", time.time())
            done = step + 1
            if (
                cfg.trainer.eval_every
                and done % cfg.trainer.eval_every == 0
                and done < cfg.trainer.steps
            ):
                evaluation = evaluate_and_record(
                    cluster, data.eval, cfg, dashboards, "during_rl", done
                )
                if evaluation:
                    history.append({"step": done, **evaluation})
            every = cfg.trainer.save_every
            if every and (done % every == 0 or done == cfg.trainer.steps):
                state = DriverState(
                    done,
                    record["policy_version"],
                    sampler.state(),
                    dashboards.jsonl.lines,
                    before_rl,
                    history,
                )
                save_checkpoint(cluster, cfg, state)
    return history


def save_checkpoint(cluster: Cluster, cfg: TrainConfig, state: DriverState) -> Path:
    """Write a resumable checkpoint atomically (gmai_rl.checkpoint), keep the newest ones."""
    root = checkpoint_root(cfg.trainer.output_dir)
    partial = begin(root, state.step)
    start = time.perf_counter()
    cluster.save_state(str(partial))
    state.write(partial)
    final = commit(partial)
    prune(root, cfg.trainer.keep_checkpoints)
    log.info("checkpoint %s written in %.1f s", final, time.perf_counter() - start)
    return final


def rl_step(cluster: Cluster, sampler: ItemSampler[MCQItem], cfg: TrainConfig) -> StepRecord:
    """One synchronous GRPO step: collect a filtered batch of scored groups, train on it, push
    the weights."""
    with Pipeline(cluster, sampler, cfg, steps=1) as pipeline:
        return pipeline.step(0)


@dataclass
class Batch:
    """A step's scored groups and how they were collected (`generate`, `reward` seconds)."""

    groups: list[Group]
    stats: CollectStats
    timer: StageTimer


class Pipeline:
    """The RL steps' stages in order: collect a batch, train on it, push the weights.

    With `algo.max_staleness` = s > 0 the batches of later steps are collected on a thread of
    their own while the learners train (`gmai_rl.algo.staleness`: which ones, and where the
    pipeline drains). Only training overlaps collection: the push waits for the thread's
    batches, so each batch is generated whole by the policy of a known version and a run is as
    reproducible as the synchronous loop, which s = 0 is, call for call.
    """

    def __init__(
        self,
        cluster: Cluster,
        sampler: ItemSampler[MCQItem],
        cfg: TrainConfig,
        steps: int,
        drains: Container[int] = (),
    ) -> None:
        self.cluster, self.sampler, self.cfg = cluster, sampler, cfg
        self.steps, self.drains = steps, drains
        self.ready: dict[int, Batch] = {}
        """Batches collected ahead, by step."""
        self.next_batch = 0
        """The first step whose batch is neither collected nor being collected."""
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if self.pool is not None:  # after a failure the thread ends with the cluster's actors
            self.pool.shutdown(wait=kind is None, cancel_futures=True)

    def collect(self) -> Batch:
        """The next batch: the sampler's next prompts, generated, scored, filtered, refilled."""
        timer = StageTimer()
        groups, stats = collect_groups(
            rollout_fn(self.cluster, self.cfg, timer),
            self.sampler,
            self.cfg.algo.prompts_per_step,
            self.cfg.algo,
        )
        return Batch(groups, stats, timer)

    def step(self, step: int) -> StepRecord:
        """Step `step`: its batch (collected now unless collected ahead), training while the
        next batches are collected, then the push."""
        cluster, cfg = self.cluster, self.cfg
        started = time.perf_counter()
        restarts_before = cluster.rollout_restarts, cluster.reward_restarts
        timer = StageTimer()
        batch = self.ready.pop(step, None)
        collected_here = []  # the rollout workers' work within this step's wall time
        if batch is None:
            batch = self.collect()
            self.next_batch = step + 1
            collected_here.append(batch)
        check_staleness(
            cluster.version, [g.policy_version for g in batch.groups], cfg.algo.max_staleness
        )
        ahead = batches_to_prefetch(
            step, self.next_batch, cfg.algo.max_staleness, self.steps, self.drains
        )
        pending = self._collect_ahead(ahead)
        samples = make_train_samples(batch.groups, cfg.algo.estimator)
        with timer("train"):
            cluster.sleep_rollouts()
            train_metrics = cluster.train(samples, cfg.learner.num_minibatches)
        if pending is not None:
            with timer("wait_rollout"):  # the learners idle until the batches ahead are in
                for index, ahead_batch in zip(ahead, pending.result(), strict=True):
                    self.ready[index] = ahead_batch
                    collected_here.append(ahead_batch)
        with timer("sync"):
            cluster.wake_rollouts()
            version = cluster.sync_weights(cfg.sync.verify)
        timer.seconds.update(batch.timer.seconds)
        return StepRecord(
            batch.groups,
            batch.stats,
            train_metrics,
            version,
            timer,
            cluster.rollout_restarts - restarts_before[0],
            cluster.reward_restarts - restarts_before[1],
            wall_s=time.perf_counter() - started,
            rollout_busy_s=sum(b.timer.seconds.get("generate", 0.0) for b in collected_here),
        )

    def _collect_ahead(self, steps: list[int]) -> Future[list[Batch]] | None:
        """Start collecting the batches of `steps`, in order, on the pipeline's thread."""
        if not steps:
            return None
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead")
        self.next_batch = steps[-1] + 1
        return self.pool.submit(lambda: [self.collect() for _ in steps])


RolloutFn = Callable[[list[MCQItem]], list[Group]]
"""Generate n completions for each item and score them: one scored Group per item, in order."""


def rollout_fn(cluster: Cluster, cfg: TrainConfig, timer: StageTimer) -> RolloutFn:
    sampling = SamplingParams(
        cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens
    )

    def rollout(items: list[MCQItem]) -> list[Group]:
        prompts = [build_prompt(item, cfg.data.system_prompt) for item in items]
        with timer("generate"):
            groups = cluster.generate(prompts, cfg.rollout.samples_per_prompt, sampling)
        with timer("reward"):
            cluster.score(groups, items)
        check_some_rewards_scored(groups, cfg.reward.fn)
        return groups

    return rollout


def collect_groups(
    rollout: RolloutFn, sampler: ItemSampler[MCQItem], want: int, algo: AlgoConfig
) -> tuple[list[Group], CollectStats]:
    """Roll out prompts until `want` groups pass the online accuracy filter.

    Prompts the rollout dropped (images unreadable since the load: `Group.dropped`) are named in
    a warning, counted, and replaced like filtered groups. Each refill round oversamples by the
    keep rate seen so far. When the rounds run out, the batch is topped up with filtered-out
    groups, then with repeats of kept ones (counted as padded), so every step trains on a full
    batch (the learner splits it evenly); a step left with no group at all stops the run.
    """
    kept: list[Group] = []
    filtered: list[Group] = []
    stats = CollectStats()
    for _ in range(1 + algo.max_refill_rounds):
        missing = want - len(kept)
        if missing <= 0:
            break
        asked = stats.generated_groups + stats.dropped_prompts
        keep_rate = len(kept) / asked if asked else 1.0
        items = sampler.take(math.ceil(missing / max(keep_rate, 0.25)))
        groups = without_dropped(rollout(items), items, stats)
        stats.rounds += 1
        stats.generated_groups += len(groups)
        stats.all_groups += groups
        if not algo.accuracy_filter:
            kept += groups
            continue
        result = filter_by_accuracy(
            [group_accuracy(g) for g in groups], algo.filter_low, algo.filter_high
        )
        stats.dropped_too_easy += result.dropped_too_easy
        stats.dropped_too_hard += result.dropped_too_hard
        keep = set(result.keep)
        kept += [g for i, g in enumerate(groups) if i in keep]
        filtered += [g for i, g in enumerate(groups) if i not in keep]
    if len(kept) < want:
        spare = filtered + kept
        if not spare:
            raise RuntimeError(
                f"every prompt of this step was dropped ({stats.dropped_prompts} in "
                f"{stats.rounds} round(s)): their images cannot be read any more (the warnings "
                "above name them); is the image folder still there?"
            )
        stats.padded_groups = want - len(kept)
        if stats.padded_groups > len(filtered):
            log.warning(
                "batch filled with %d repeated group(s): too few prompts left after dropped ones",
                stats.padded_groups - len(filtered),
            )
        kept += [spare[i % len(spare)] for i in range(stats.padded_groups)]
    return kept[:want], stats


def without_dropped(
    groups: Sequence[Group], items: Sequence[MCQItem], stats: CollectStats
) -> list[Group]:
    """The groups that were generated; each dropped one is named in a warning and counted."""
    for group, item in zip(groups, items, strict=True):
        if group.dropped is not None:
            stats.dropped_prompts += 1
            log.warning(
                "prompt %s (%s) dropped from this step: %s", item.id, item.source, group.dropped
            )
    return [group for group in groups if group.dropped is None]


def check_some_rewards_scored(groups: Sequence[Group], reward_fn: str | None) -> None:
    """A failed completion is one sample's fault; the function raising on every completion is
    the function's (a batch cut by reward.timeout_s is a fault of that batch, not proof)."""
    rewards = [r for g in groups for r in g.rewards]
    raised = [bool(r.get(REWARD_FAILED)) and not r.get(REWARD_TIMED_OUT) for r in rewards]
    if rewards and all(raised):
        raise RuntimeError(
            f"the reward function ({reward_fn or 'mcq_reward'}) failed on all {len(rewards)} "
            "completions of this rollout: the reward workers' log lines show the first "
            "tracebacks (reward.fn)"
        )


def group_accuracy(group: Group) -> float:
    """Failed completions (REWARD_FAILED) count as wrong."""
    if any("accuracy" not in r for r in group.rewards if not r.get(REWARD_FAILED)):
        raise ValueError(
            "algo.accuracy_filter needs an 'accuracy' in every reward breakdown; the configured "
            "reward returns none (disable the filter or add it)"
        )
    return sum(r.get("accuracy", 0.0) for r in group.rewards) / len(group.rewards)


def make_train_samples(groups: Sequence[Group], estimator: str) -> list[TrainSample]:
    """Group-relative advantages of the total reward, one TrainSample per completion."""
    rewards = torch.tensor([[r["total"] for r in g.rewards] for g in groups])  # [G, n]
    advantages = group_advantages(rewards, estimator)  # [G, n]
    return [
        TrainSample(g.prompt, g.prompt_ids, c.token_ids, float(a), c.logprobs, g.policy_version)
        for g, row in zip(groups, advantages.tolist(), strict=True)
        for c, a in zip(g.completions, row, strict=True)
    ]


# ------------------------------------------------------------------------------------- eval


EVAL_LOG = {"before_rl": "before RL", "during_rl": "at step {step}", "after_rl": "after RL"}
"""How the log names an evaluation of each phase."""


def evaluate_and_record(
    cluster: Cluster,
    items: Sequence[MCQItem],
    cfg: TrainConfig,
    dashboards: Dashboards,
    phase: str,
    step: int,
) -> dict[str, Any]:
    """Evaluate after `step` RL steps, log it and record it (stage "eval", with its seconds)."""
    start = time.perf_counter()
    evaluation = evaluate(cluster, items, cfg)
    if evaluation:
        seconds = time.perf_counter() - start
        dashboards.write(
            {"stage": "eval", "phase": phase, "step": step, **evaluation, "seconds": seconds}
        )
    log.info("held-out %s: %s", EVAL_LOG[phase].format(step=step), eval_line(evaluation))
    return evaluation


def evaluate(cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig) -> dict[str, Any]:
    """Held-out accuracy of one answer per question (greedy by default): see gmai_rl.evaluate.

    The questions go out in chunks that give every rollout worker one full batch
    (rollout.max_batch_prompts), so the progress bar moves without costing batch size."""
    if not items:
        return {}
    sampling = SamplingParams(
        cfg.rollout.eval_temperature, 1.0, cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )
    prompts = [build_prompt(item, cfg.data.system_prompt) for item in items]
    chunk = cfg.cluster.rollout_workers * cfg.rollout.max_batch_prompts
    groups: list[Group] = []
    with Progress.of(cfg.dashboards, "eval", len(prompts), unit="question", leave=False) as bar:
        for start in range(0, len(prompts), chunk):
            groups += cluster.generate(prompts[start : start + chunk], 1, sampling)
            bar.advance_to(len(groups))
    return summarize(groups, items)
