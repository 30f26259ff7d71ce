"""Online filters: MM-EUREKA's accuracy band (bounds included) and DAPO's zero-variance filter."""

import random

import pytest
import torch

from gmai_rl.algo import FilterResult, filter_by_accuracy, filter_zero_variance, group_advantages


def test_accuracy_band_by_hand():
    # n = 8 samples per group: 0/8 too hard, 8/8 too easy, bounds 0.1 and 0.9 themselves kept
    accuracy = [0.0, 0.125, 0.5, 0.875, 1.0, 0.1, 0.9, 0.05, 0.95]
    result = filter_by_accuracy(accuracy, low=0.1, high=0.9)
    assert result == FilterResult(keep=[1, 2, 3, 5, 6], dropped_too_easy=2, dropped_too_hard=2)
    assert result.num_dropped == 4


def test_bounds_survive_float32_rounding():
    # float32(0.1) = 0.100000001 and float32(0.9) = 0.899999976; 3 of 10 right as a float32 mean
    accuracy = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float32).mean()
    result = filter_by_accuracy(torch.stack([accuracy, 1 - accuracy, torch.tensor(0.3)]), 0.1, 0.9)
    assert result.keep == [0, 1, 2]
    assert filter_by_accuracy(torch.tensor([0.3]), low=0.3, high=0.3).keep == [0]


def test_full_range_keeps_everything_and_empty_input_is_fine():
    assert filter_by_accuracy([0.0, 1.0, 0.5], low=0.0, high=1.0).keep == [0, 1, 2]
    assert filter_by_accuracy([]) == FilterResult(keep=[], dropped_too_easy=0, dropped_too_hard=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_filter_matches_loop(seed):
    rng = random.Random(seed)
    accuracy = [rng.randint(0, 8) / 8 for _ in range(50)]
    result = filter_by_accuracy(torch.tensor(accuracy, dtype=torch.float64), low=0.2, high=0.8)
    assert result.keep == [g for g, a in enumerate(accuracy) if 0.2 <= a <= 0.8]
    assert result.dropped_too_easy == sum(a > 0.8 for a in accuracy)
    assert result.dropped_too_hard == sum(a < 0.2 for a in accuracy)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0.5], 0.6, 0.4), "low <= high"),
        (([0.5], -0.1, 0.9), "low <= high"),
        (([0.5], 0.1, 1.1), "low <= high"),
        (([float("nan")], 0.1, 0.9), "NaN"),
        ((torch.zeros(2, 2), 0.1, 0.9), "1-D"),
    ],
)
def test_accuracy_filter_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        filter_by_accuracy(*args)


def test_zero_variance_by_hand():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    assert filter_zero_variance(rewards) == [1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_variance_matches_loop_and_the_zero_advantage_groups(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (40, 4), generator=g).float() * 1.1  # many constant groups
    keep = filter_zero_variance(rewards)
    assert keep == [i for i, row in enumerate(rewards.tolist()) if len(set(row)) > 1]
    zero_adv = (group_advantages(rewards) == 0).all(dim=1)
    assert keep == [i for i in range(40) if not zero_adv[i]]


def test_zero_variance_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\[G, n\]"):
        filter_zero_variance(torch.zeros(4))
