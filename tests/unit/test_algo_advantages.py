"""Group advantages: hand-computed cases, a per-element loop reference, and the edge cases that
silently corrupt a run (float noise on constant groups, n = 1)."""

import math
import statistics

import pytest
import torch

from gmai_rl.algo import group_advantages


def assert_close(actual, expected, atol=1e-7, rtol=1e-7):
    # torch.allclose, not torch.testing.assert_close: the latter imports torch.distributed (~2 s).
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def loop_reference(rewards: list[list[float]], estimator: str, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        row = []
        for i, r in enumerate(group):
            if len(set(group)) == 1:
                row.append(0.0)
            elif estimator == "grpo":
                row.append((r - mean) / (statistics.stdev(group) + eps))
            elif estimator == "drgrpo":
                row.append(r - mean)
            else:
                others = [x for j, x in enumerate(group) if j != i]
                row.append(r - sum(others) / len(others))
        out.append(row)
    return out


def test_hand_computed_two_right_two_wrong():
    # mean 0.5; sample std = sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735; 0.5 / 0.57735 = 0.866025
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    grpo = group_advantages(rewards, "grpo", eps=0.0)
    assert_close(
        grpo,
        torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    drgrpo = group_advantages(rewards, "drgrpo")
    assert drgrpo.tolist() == [[0.5, -0.5, -0.5, 0.5]]
    # rloo: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    rloo = group_advantages(rewards, "rloo")
    assert_close(rloo, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]], dtype=torch.float64))


def test_hand_computed_one_of_three():
    # mean 1/3, deviations (2/3, -1/3, -1/3), sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    rewards = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    grpo = group_advantages(rewards, "grpo", eps=0.0)
    assert_close(
        grpo,
        torch.tensor([[1.154701, -0.577350, -0.577350]], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    # rloo: 1 - 0 = 1, 0 - (1 + 0) / 2 = -0.5
    assert group_advantages(rewards, "rloo").tolist() == [[1.0, -0.5, -0.5]]


def test_eps_is_added_to_std():
    # std of (1, 0) = sqrt(0.5) = 0.707107; with eps = 0.292893 the denominator is 1.0
    adv = group_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64), eps=1 - math.sqrt(0.5))
    assert_close(adv, torch.tensor([[0.5, -0.5]], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("value", [1.5, 0.1, 1 / 3, -2.7, 0.0, 1e6 + 0.1])
def test_constant_group_is_exactly_zero(estimator, value):
    rewards = torch.full((2, 7), value)
    rewards[1] = torch.tensor([1.0, 0, 0, 1, 0, 0, 0])
    adv = group_advantages(rewards, estimator)
    assert adv[0].tolist() == [0.0] * 7  # exactly 0, not 1e-8 / eps
    assert (adv[1] != 0).all()


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(estimator, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (6, 5), generator=g).double() / 2  # ties and constant groups
    rewards[0] = torch.rand(5, generator=g, dtype=torch.float64)
    expected = loop_reference(rewards.tolist(), estimator, eps=1e-6)
    assert_close(
        group_advantages(rewards, estimator, eps=1e-6), torch.tensor(expected, dtype=torch.float64)
    )


def test_grpo_groups_are_standardised_and_drgrpo_is_centred():
    rewards = torch.rand(10, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grpo = group_advantages(rewards, "grpo", eps=0.0)
    assert_close(grpo.mean(1), torch.zeros(10, dtype=torch.float64))
    assert_close(grpo.std(1), torch.ones(10, dtype=torch.float64))
    assert_close(group_advantages(rewards, "drgrpo").sum(1), torch.zeros(10, dtype=torch.float64))


def test_rloo_is_drgrpo_rescaled():
    # r_i - (S - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
    rewards = torch.rand(4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_close(group_advantages(rewards, "rloo"), group_advantages(rewards, "drgrpo") * 6 / 5)


def test_keeps_dtype_and_accepts_integer_rewards():
    assert group_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64)).dtype == torch.float64
    # std of (1, 0) = 0.707107, so the advantages are +-0.5 / 0.707107 = +-0.707107
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.get_default_dtype()
    assert adv[0].tolist() == pytest.approx([0.707107, -0.707107], abs=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_one_sample_per_group_raises(estimator):
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        group_advantages(torch.tensor([[1.0], [0.0]]), estimator)


@pytest.mark.parametrize(
    ("rewards", "estimator", "message"),
    [
        (torch.tensor([1.0, 0.0]), "grpo", r"\[G, n\]"),
        (torch.zeros(2, 2, 2), "grpo", r"\[G, n\]"),
        (torch.tensor([[1.0, float("nan")]]), "grpo", "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), "rloo", "NaN or inf"),
        (torch.tensor([[1.0, 0.0]]), "ppo", "unknown advantage estimator"),
    ],
)
def test_invalid_inputs_raise(rewards, estimator, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, estimator)
