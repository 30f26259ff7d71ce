"""The driver: GRPO on a Ray cluster, stage by stage, in data-flow order.

    run      prepare data -> start the cluster -> SFT cold start -> evaluate -> RL -> evaluate
    rl_step  sample prompts -> generate n each -> reward -> filter (refill) -> advantages
             -> train (PPO epochs on the learner ranks) -> push weights

Every remote call goes through the `Cluster` (gmai_rl.cluster); every group records the policy
version that generated it, so with one sync per step the rollout is on-policy (staleness 0) and
the metrics say so rather than assume it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gmai_rl.algo import filter_by_accuracy, group_advantages
from gmai_rl.cluster import Cluster, check_output_dir, ray_session
from gmai_rl.config import AlgoConfig, TrainConfig, validate
from gmai_rl.data import build_prompt
from gmai_rl.evaluate import summarize
from gmai_rl.feed import Datasets, ItemSampler, load_datasets, prepare_artifacts, sft_samples
from gmai_rl.metrics import (
    CollectStats,
    MetricsLog,
    StageTimer,
    StepRecord,
    eval_line,
    progress_line,
    step_metrics,
)
from gmai_rl.types import Group, MCQItem, SamplingParams, TrainSample

log = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run the configured job end to end; returns what eval.json holds."""
    validate(cfg)
    check_output_dir(cfg.trainer.output_dir)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_artifacts(cfg)
    data = load_datasets(cfg)
    with ray_session(cfg):
        return run_on_cluster(Cluster.start(cfg), data, cfg, out)


def run_on_cluster(cluster: Cluster, data: Datasets, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """SFT, evaluation, RL, evaluation and the final checkpoint on a started cluster, which is
    shut down at the end."""
    metrics = MetricsLog(out / "metrics.jsonl")
    result: dict[str, Any] = {"output_dir": str(out)}
    try:
        if cfg.sft.enabled:
            run_sft(cluster, data.sft, cfg, metrics)
            cluster.sync_weights(cfg.sync.verify)
        result["before_rl"] = evaluate(cluster, data.eval, cfg)
        log.info("held-out before RL: %s", eval_line(result["before_rl"]))
        result["during_rl"] = run_rl(cluster, data, cfg, metrics, out)
        result["after_rl"] = evaluate(cluster, data.eval, cfg)
        log.info("held-out after RL: %s", eval_line(result["after_rl"]))
        if cfg.trainer.save_final:
            cluster.save(str(out / "final"))
            result["checkpoint"] = str(out / "final")
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    finally:
        metrics.close()
        cluster.shutdown()
    return result


# -------------------------------------------------------------------------------------- sft


def run_sft(
    cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig, metrics: MetricsLog
) -> None:
    """Cross-entropy on reference reasoning traces (the paper's cold start)."""
    from gmai_rl.models.loading import load_processor, tokenizer_of

    samples = sft_samples(items, tokenizer_of(load_processor(cfg.model)), cfg.data.system_prompt)
    sampler = ItemSampler(samples, cfg.trainer.seed)
    cluster.start_stage(cfg.sft_optim)
    for step in range(cfg.sft.steps):
        start = time.perf_counter()
        record = {
            "stage": "sft",
            "step": step,
            **cluster.train_sft(sampler.take(cfg.sft.batch_size)),
            "seconds": time.perf_counter() - start,
        }
        metrics.write(record)
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
    cluster: Cluster, data: Datasets, cfg: TrainConfig, metrics: MetricsLog, out: Path
) -> list[dict[str, Any]]:
    """`trainer.steps` RL steps with periodic evaluation and checkpoints; returns the evaluations."""
    # The KL reference (if any) is the policy RL starts from, i.e. after the SFT cold start.
    cluster.start_stage(cfg.rl_optim, reset_reference=True)
    sampler = ItemSampler(data.train, cfg.trainer.seed)
    history = []
    for step in range(cfg.trainer.steps):
        record = step_metrics(step, rl_step(cluster, sampler, cfg))
        metrics.write(record)
        log.info(progress_line(record, cfg.trainer.steps))
        if step == 0:
            # Start-up cost is what a user waits for before training shows: a line to find.
            log.info("first RL step done at unix time %.3f", time.time())
        done = step + 1
        if (
            cfg.trainer.eval_every
            and done % cfg.trainer.eval_every == 0
            and done < cfg.trainer.steps
        ):
            evaluation = {"step": done, **evaluate(cluster, data.eval, cfg)}
            history.append(evaluation)
            metrics.write({"stage": "eval", **evaluation})
            log.info("held-out at step %d: %s", done, eval_line(evaluation))
        if cfg.trainer.save_every and done % cfg.trainer.save_every == 0:
            cluster.save(str(out / "checkpoints" / f"step_{done}"))
    return history


def rl_step(cluster: Cluster, sampler: ItemSampler[MCQItem], cfg: TrainConfig) -> StepRecord:
    """One GRPO step: collect a filtered batch of scored groups, train on it, push the weights."""
    timer = StageTimer()
    groups, stats = collect_groups(
        rollout_fn(cluster, cfg, timer), sampler, cfg.algo.prompts_per_step, cfg.algo
    )
    samples = make_train_samples(groups, cfg.algo.estimator)
    with timer("train"):
        cluster.sleep_rollouts()
        train_metrics = cluster.train(samples, cfg.learner.num_minibatches)
    with timer("sync"):
        cluster.wake_rollouts()
        version = cluster.sync_weights(cfg.sync.verify)
    return StepRecord(groups, stats, train_metrics, version, timer)


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
        return groups

    return rollout


def collect_groups(
    rollout: RolloutFn, sampler: ItemSampler[MCQItem], want: int, algo: AlgoConfig
) -> tuple[list[Group], CollectStats]:
    """Roll out prompts until `want` groups pass the online accuracy filter.

    Each refill round oversamples by the drop rate seen so far. When the rounds run out, the batch
    is topped up with filtered-out groups (counted as padded) so every step trains on a full batch.
    """
    kept: list[Group] = []
    dropped: list[Group] = []
    stats = CollectStats()
    for _ in range(1 + (algo.max_refill_rounds if algo.accuracy_filter else 0)):
        missing = want - len(kept)
        if missing <= 0:
            break
        keep_rate = len(kept) / stats.generated_groups if stats.generated_groups else 1.0
        groups = rollout(sampler.take(math.ceil(missing / max(keep_rate, 0.25))))
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
        dropped += [g for i, g in enumerate(groups) if i not in keep]
    if len(kept) < want:
        stats.padded_groups = want - len(kept)
        kept += dropped[: stats.padded_groups]
    return kept[:want], stats


def group_accuracy(group: Group) -> float:
    if any("accuracy" not in r for r in group.rewards):
        raise ValueError(
            "algo.accuracy_filter needs an 'accuracy' in every reward breakdown; the configured "
            "reward returns none (disable the filter or add it)"
        )
    return sum(r["accuracy"] for r in group.rewards) / len(group.rewards)


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


def evaluate(cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig) -> dict[str, Any]:
    """Held-out accuracy of one answer per question (greedy by default): see gmai_rl.evaluate."""
    if not items:
        return {}
    sampling = SamplingParams(
        cfg.rollout.eval_temperature, 1.0, cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )
    prompts = [build_prompt(item, cfg.data.system_prompt) for item in items]
    return summarize(cluster.generate(prompts, 1, sampling), items)
