"""Group-relative advantages: every sample is scored against the other samples of its prompt.

A "group" is the n completions sampled for one prompt. All estimators here give one scalar per
sample (outcome reward, no per-token credit assignment); the loss broadcasts it over the tokens.

    grpo    A_i = (r_i - mean(r)) / (std(r) + eps)        GRPO (DeepSeekMath), MM-EUREKA, GMAI-VL-R1
    drgrpo  A_i =  r_i - mean(r)                          Dr.GRPO: no std division (no difficulty bias)
    rloo    A_i =  r_i - mean(r_j for j != i)             REINFORCE leave-one-out

std is the sample standard deviation (Bessel-corrected, divisor n - 1), i.e. `torch.std` as
veRL, OpenRLHF/MM-EUREKA and TRL compute it, so advantages and clip/learning-rate settings carry
over from those recipes. With a fixed group size the choice only rescales every advantage by the
same factor sqrt(n / (n - 1)); it does not change which samples are pushed up or down.

Every estimator needs n >= 2: with one sample there is nothing to compare against (the sample std
is undefined, the leave-one-out baseline is empty, and r - mean is identically zero).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: torch.Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of G groups of n samples each.

    Args:
        rewards: `[G, n]` float rewards, row g holding the n samples of prompt g. Must be finite.
        estimator: "grpo", "drgrpo" or "rloo" (see the module docstring).
        eps: added to the std in "grpo" so a near-constant group does not explode.

    Returns:
        `[G, n]` advantages, same dtype as `rewards` (integer rewards become the default float
        dtype). A group whose rewards are all exactly equal gets exactly 0.0 for every estimator,
        not a float-noise residue: it carries no learning signal, and `r - mean` of e.g. three
        0.1 rewards is 1e-17, which "grpo" would turn into ~1e-11 / eps.

    Raises:
        ValueError: on a non-2-D input, n < 2, non-finite rewards or an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be [G, n] (G groups of n samples), got shape {tuple(rewards.shape)}"
        )
    n = rewards.shape[1]
    if n < 2:
        raise ValueError(
            f"group advantages need at least 2 samples per prompt, got n={n}: with one sample "
            "there is no baseline to compare against (set rollout.samples_per_prompt >= 2)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")

    mean = rewards.mean(dim=1, keepdim=True)  # [G, 1]
    if estimator == "grpo":
        std = rewards.std(dim=1, keepdim=True, correction=1)  # [G, 1]
        adv = (rewards - mean) / (std + eps)  # [G, n]
    elif estimator == "drgrpo":
        adv = rewards - mean  # [G, n]
    else:  # rloo
        others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)  # [G, n]
        adv = rewards - others_mean  # [G, n]

    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)  # [G, 1]
    return adv.masked_fill(constant, 0.0)  # [G, n]
