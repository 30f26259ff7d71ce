"""A step's batch, from rollouts to training samples (no Ray, no cluster).

rollout(items) -> scored groups        (gmai_rl.pipeline.rollout_fn: generate, then score)
collect_groups: drop the prompts the rollout could not generate, filter groups by accuracy
                (algo.accuracy_filter), refill until the batch is full
make_train_samples: group-relative advantages (gmai_rl.algo), one sample per completion
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from gmai_rl.algo import filter_by_accuracy, group_advantages
from gmai_rl.config import AlgoConfig
from gmai_rl.feed import ItemSampler
from gmai_rl.metrics import CollectStats
from gmai_rl.types import REWARD_FAILED, REWARD_TIMED_OUT, Group, MCQItem, TrainSample

log = logging.getLogger(__name__)

RolloutFn = Callable[[list[MCQItem]], list[Group]]
"""Generate n completions for each item and score them: one scored Group per item, in order."""


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
