"""Online filters that drop groups which would waste a policy update.

- `filter_by_accuracy` (MM-EUREKA's online filter): a prompt every sample solves (too easy) or none
  solves (too hard) gives a group-relative advantage of zero, and prompts close to those extremes
  give little signal; keep groups with `low <= mean accuracy <= high`.
- `filter_zero_variance` (DAPO's dynamic sampling): drop groups whose rewards are all equal,
  whatever the reward is made of (format + accuracy...). These are exactly the groups that
  `group_advantages` gives an all-zero advantage.
Both return indices of the groups to keep, in their original order; refilling the batch to its
target size (sampling more prompts) is the driver's decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ACCURACY_TOL = 1e-6
"""Slack on both bounds. Accuracies are means of 0/1 rewards, often computed in float32, where 1/10
is 0.100000001 and 9/10 is 0.899999976: a group exactly at a bound must not fall out by rounding."""


@dataclass(frozen=True)
class FilterResult:
    keep: list[int]
    """Indices of the kept groups, ascending."""
    dropped_too_easy: int
    """Groups with mean accuracy above `high`."""
    dropped_too_hard: int
    """Groups with mean accuracy below `low`."""

    @property
    def num_dropped(self) -> int:
        return self.dropped_too_easy + self.dropped_too_hard


def filter_by_accuracy(
    group_accuracy: Sequence[float] | torch.Tensor, low: float = 0.1, high: float = 0.9
) -> FilterResult:
    """Keep the groups whose mean accuracy lies in [low, high], bounds included.

    Inclusive like MM-EUREKA (`lower <= acc <= upper`), so `low=0.0, high=1.0` keeps everything
    and `low=high=0.5` keeps exactly the half-solved groups. With MM-EUREKA's 0.1 / 0.9 and n = 8
    samples, a group is kept when 1 to 7 samples are right.

    Args:
        group_accuracy: `[G]` mean accuracy of each group, in [0, 1].
        low, high: bounds with 0 <= low <= high <= 1.

    Returns:
        `FilterResult` with the kept indices and how many groups were too easy / too hard.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if isinstance(group_accuracy, torch.Tensor):
        if group_accuracy.dim() != 1:
            raise ValueError(
                f"group_accuracy must be 1-D [G], got shape {tuple(group_accuracy.shape)}"
            )
        accuracies = [float(a) for a in group_accuracy.tolist()]
    else:
        accuracies = [float(a) for a in group_accuracy]
    if any(math.isnan(a) for a in accuracies):
        raise ValueError("group_accuracy contains NaN")

    keep: list[int] = []
    too_easy = too_hard = 0
    for g, acc in enumerate(accuracies):
        if acc > high + ACCURACY_TOL:
            too_easy += 1
        elif acc < low - ACCURACY_TOL:
            too_hard += 1
        else:
            keep.append(g)
    return FilterResult(keep=keep, dropped_too_easy=too_easy, dropped_too_hard=too_hard)


def filter_zero_variance(rewards: torch.Tensor) -> list[int]:
    """Indices of the groups whose rewards are not all equal (exact comparison).

    Args:
        rewards: `[G, n]` rewards, row g holding the n samples of prompt g.

    Returns:
        Ascending indices of the groups to keep; `G - len(result)` groups were dropped.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    varied = rewards.amax(dim=1) != rewards.amin(dim=1)  # [G]
    return [int(g) for g in varied.nonzero().flatten().tolist()]
