"""Per-token estimators of KL(pi || pi_ref) from log-probabilities of tokens sampled from pi.

With x = log pi_ref(y) - log pi(y) for a sampled token y (Schulman, "Approximating KL
Divergence", 2020):

    k1 = -x                   unbiased, high variance, can be negative
    k2 = x^2 / 2              biased, low variance, >= 0
    k3 = exp(x) - x - 1       unbiased, low variance, >= 0 (the GRPO paper's choice)

Only k3 exponentiates, so only k3 is clamped (see `LOG_RATIO_CLAMP` and `K3_MAX`).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

LOG_RATIO_CLAMP = 20.0
"""Bound on any log-ratio fed to exp(): exp(20) ~ 4.9e8 is finite in fp32 (and in bf16, whose
range matches fp32), while a log-ratio of ~89 (fp32) or ~11 (fp16) would overflow to inf and turn
the loss into NaN."""

K3_MAX = 10.0
"""Upper clamp on k3, as OpenRLHF and veRL do: beyond it (x > ~2.5, the policy gives a token
e^2.5 ~ 12x less probability than the reference) the term stops growing and has no gradient, so a
handful of tokens cannot dominate the KL penalty."""


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token KL estimate of the policy against a reference policy.

    Args:
        logprobs: `[B, L]` log pi(y_t) of the sampled tokens under the policy being trained.
        ref_logprobs: `[B, L]` log pi_ref(y_t) of the same tokens under the reference policy.
        estimator: "k1", "k2" or "k3" (module docstring).

    Returns:
        `[B, L]` per-token estimates, unmasked: aggregate them with the response mask (`aggregate`
        in `gmai_rl.algo.loss`). Differentiable with respect to `logprobs`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
    log_ratio = ref_logprobs - logprobs  # [B, L]  x = log pi_ref - log pi
    if estimator == "k1":
        return -log_ratio  # [B, L]
    if estimator == "k2":
        return 0.5 * log_ratio.square()  # [B, L]
    # Clamp before exp() so a token the policy has all but ruled out cannot overflow to inf.
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, L]
    k3 = log_ratio.exp() - log_ratio - 1.0  # [B, L]
    # min=0: for |x| ~ 1e-8 fp32 rounding can make exp(x) - x - 1 a hair negative.
    return k3.clamp(min=0.0, max=K3_MAX)  # [B, L]
