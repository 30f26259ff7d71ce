"""How a rollout batch is cut for the learner ranks: shards, mini-batches, micro-batches, normalisers.

Pure functions of sample lists. Under ZeRO every rank must run the same number of forward passes
(ZeRO-3 gathers parameters collectively inside each one), so shards are equal in size, which the
trainer's start-up checks guarantee (`check_batch_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from gmai_rl.types import TrainSample

T = TypeVar("T")


def check_batch_shape(batch_size: int, world_size: int, num_minibatches: int) -> None:
    """Raise unless a rollout batch splits evenly into mini-batches and then into rank shards."""
    if batch_size % (world_size * num_minibatches):
        raise ValueError(
            f"the rollout batch ({batch_size} samples) must divide evenly into {num_minibatches} "
            f"mini-batch(es) x {world_size} learner rank(s); change prompts per step, samples per "
            "prompt, learner ranks or num_minibatches"
        )


def split_even(items: Sequence[T], parts: int) -> list[list[T]]:
    """`parts` contiguous slices of equal length (`len(items)` must divide by `parts`)."""
    if parts < 1 or len(items) % parts:
        raise ValueError(f"cannot split {len(items)} items into {parts} equal parts")
    size = len(items) // parts
    return [list(items[i * size : (i + 1) * size]) for i in range(parts)]


def chunk(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of at most `size` items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@dataclass
class RankBatch:
    """One learner rank's share of a rollout batch."""

    minibatches: list[list[TrainSample]]
    """This rank's samples of each optimizer mini-batch."""
    num_tokens: list[int]
    """Completion tokens in each whole mini-batch, over all ranks: the token-mean denominator."""
    num_seqs: list[int]
    """Samples with at least one completion token in each whole mini-batch, over all ranks."""


def plan_rank_batches(
    samples: Sequence[TrainSample], world_size: int, num_minibatches: int
) -> list[RankBatch]:
    """Cut `samples` into `num_minibatches` mini-batches, each split evenly across the ranks.

    The normalisers are global, so the ranks' losses add up to the whole mini-batch's loss.
    """
    check_batch_shape(len(samples), world_size, num_minibatches)
    ranks = [RankBatch([], [], []) for _ in range(world_size)]
    for minibatch in split_even(samples, num_minibatches):
        tokens = sum(len(s.completion_ids) for s in minibatch)
        seqs = sum(1 for s in minibatch if s.completion_ids)
        for rank, shard in zip(ranks, split_even(minibatch, world_size), strict=True):
            rank.minibatches.append(shard)
            rank.num_tokens.append(max(tokens, 1))
            rank.num_seqs.append(max(seqs, 1))
    return ranks
