"""Clipped policy-gradient loss (PPO / GRPO / DAPO) with an optional KL penalty to a reference.

Per response token t of sequence i, with ratio r = pi(y_t) / pi_old(y_t) and advantage A:

    pg = max(-A * r, -A * clip(r, 1 - clip_eps_low, 1 + clip_eps_high))
    pg = min(pg, -A * dual_clip_c)            only where A < 0, when dual-clip is on
    loss = agg(pg) + kl_coef * agg(KL(pi || pi_ref))

Asymmetric bounds are DAPO's clip-higher (e.g. 0.2 / 0.28: low-probability tokens with A > 0 may
grow further before the clip stops them). Dual-clip (Ye et al. 2020, as in OpenRLHF and veRL)
bounds the loss of a token with A < 0 whose ratio has run past c: without it, -A * r grows
without limit in r.

Gradient accumulation: `aggregate` divides by normalisers that the caller may pass for the whole
optimizer mini-batch (every micro-batch on every data-parallel rank). Then the micro-batch losses
add up to the mini-batch loss, whatever the split, instead of being a mean of means that
over-weights short micro-batches. `loss_normalisers` counts them with the same convention that
`aggregate` uses when they are not given.

Off-policy correction (`truncated_is_weights`): the ratio's denominator is pi_prox, the learner's
own log-probs of the batch at the start of the training step, and each token's loss is weighted by
w = min(pi_prox / pi_behav, C), pi_behav being the rollout engine's log-probs:

    pg = w * pg                               when behaviour log-probs and a cap C are given

Left out: entropy bonus (the learner logs entropy only), value/critic losses (GRPO has none),
sequence-level importance weights and rejection of tokens by their weight (veRL's rollout
correction offers both; AReaL drops tokens over its cap instead of truncating them).
"""

from __future__ import annotations

import torch

from gmai_rl.algo.kl import LOG_RATIO_CLAMP, kl_estimate

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

Normaliser = float | torch.Tensor


def loss_normalisers(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and sequence counts of a batch, the way `aggregate` counts them.

    Args:
        mask: `[B, L]` 1 (or True) for response tokens.

    Returns:
        `(num_tokens, num_seqs)`, 0-d int64 tensors on `mask`'s device: the number of response
        tokens, and the number of sequences with at least one response token (all-padding rows,
        e.g. from padding a rank's micro-batch, do not count). Sum them over micro-batches and
        all-reduce them over data-parallel ranks before passing them to `aggregate` /
        `policy_loss`; no host sync is needed.
    """
    mask = mask.bool()
    return mask.sum(), mask.any(dim=-1).sum()


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: Normaliser | None = None,
    num_seqs: Normaliser | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar over the response tokens.

    Modes:
        token-mean               sum of all response-token values / num_tokens
        seq-mean-token-mean      sum over sequences of (the sequence's token mean) / num_seqs
        seq-mean-token-sum-norm  sum over sequences of (the sequence's token sum / norm_len)
                                 / num_seqs (Dr.GRPO; norm_len is a constant such as the
                                 generation budget, so long answers are not down-weighted)

    Args:
        values: `[B, L]` per-token values. Entries outside the mask are ignored, even inf/NaN.
        mask: `[B, L]` 1 (or True) for response tokens.
        mode: one of `AGG_MODES`.
        num_tokens: the token-mean denominator. None: this batch's own count. Pass the total over
            the optimizer mini-batch (see `loss_normalisers`) when accumulating micro-batches.
        num_seqs: the seq-mean denominator, likewise (sequences with no response token do not
            count; they contribute 0 to the numerator).
        norm_len: required by "seq-mean-token-sum-norm", ignored by the others.
        Each mode reads only the normalisers it needs, so a caller may always pass all three.

    Returns:
        0-d tensor. A batch with no response token gives 0.0 (not NaN) with a zero gradient.
        The per-sequence token mean is local to a sequence, so split micro-batches by sequence,
        never inside one.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGG_MODES}")
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(
            f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, L]"
        )
    _check_positive("num_tokens", num_tokens)
    _check_positive("num_seqs", num_seqs)
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)  # [B, L]

    if mode == "token-mean":
        if num_tokens is None:
            num_tokens = mask.sum().clamp(min=1)
        return values.sum() / num_tokens

    tokens_per_seq = mask.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_seq = values.sum(dim=-1) / tokens_per_seq.clamp(min=1)  # [B]
    else:
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"{mode} needs a positive norm_len, got {norm_len}")
        per_seq = values.sum(dim=-1) / norm_len  # [B]
    if num_seqs is None:
        num_seqs = (tokens_per_seq > 0).sum().clamp(min=1)
    return per_seq.sum() / num_seqs


def _check_behaviour_args(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None,
    behaviour_is_cap: float | None,
) -> None:
    if (behaviour_logprobs is None) != (behaviour_is_cap is None):
        raise ValueError(
            "behaviour_logprobs and behaviour_is_cap go together: pass both or neither"
        )
    if behaviour_logprobs is not None and behaviour_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"behaviour_logprobs has shape {tuple(behaviour_logprobs.shape)}, expected "
            f"{tuple(logprobs.shape)} like logprobs"
        )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    loss_agg: str = "token-mean",
    num_tokens: Normaliser | None = None,
    num_seqs: Normaliser | None = None,
    norm_len: float | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
    behaviour_is_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss plus `kl_coef` times the KL to a reference (module docstring).

    Args:
        logprobs: `[B, L]` log-probs of the sampled tokens under the policy being trained
            (differentiable; `token_logprobs` of the learner's logits).
        old_logprobs: `[B, L]` log-probs under the policy that sampled them (no gradient); with
            `behaviour_logprobs`, under the proximal policy pi_prox (`truncated_is_weights`).
        advantages: `[B]` one per sequence, broadcast over its tokens, or `[B, L]` per token.
        mask: `[B, L]` 1 (or True) for response tokens; everything else is ignored, even NaN.
        ref_logprobs: `[B, L]` log-probs under the reference policy, or None when there is no
            reference (then `kl_coef` must be 0). Given with `kl_coef == 0`, the KL is only logged.
        kl_coef: weight of the aggregated KL in the loss; 0 disables the penalty.
        kl_estimator: "k1", "k2" or "k3" (`gmai_rl.algo.kl`).
        clip_eps_low, clip_eps_high: the ratio is clipped to [1 - low, 1 + high].
        dual_clip_c: None, or c > 1: the loss of a token with A < 0 is at most -A * c.
        loss_agg, num_tokens, num_seqs, norm_len: see `aggregate`; the KL term is aggregated the
            same way, so with global normalisers the micro-batch losses sum to the mini-batch one.
        behaviour_logprobs: `[B, L]` log-probs under the rollout engine that sampled the tokens
            (pi_behav), or None. Given, with `behaviour_is_cap`, each token's policy loss is
            weighted by `truncated_is_weights(old_logprobs, behaviour_logprobs, mask, cap)` (the
            KL term is not). Both or neither: None for both is the plain clipped loss, bit for bit.
        behaviour_is_cap: the cap C >= 1 on that weight.

    Returns:
        `(loss, metrics)`. `loss` is a 0-d tensor to call backward on. `metrics` maps names to
        detached 0-d float32 tensors on the input device, so the loss never forces a host sync;
        the learner stacks them and calls `.tolist()` once per step. "loss", "pg_loss" and
        "kl_loss" use the given normalisers (with global normalisers they are this micro-batch's
        share: sum them over micro-batches); every other metric is a mean over this batch's
        response tokens (weight it by "num_tokens" to combine batches):
            clip_frac        tokens where the clip was active (the clipped term won the max)
            clip_frac_high   ... with A > 0 and r > 1 + clip_eps_high
            clip_frac_low    ... with A < 0 and r < 1 - clip_eps_low
            dual_clip_frac   tokens with A < 0 held by the dual clip (0 when it is off)
            ratio_mean, ratio_min, ratio_max   of r (1.0 when there is no response token)
            approx_kl        KL(pi_old || pi) estimated as (r - 1) - log r
            ref_kl           mean per-token KL estimate to the reference (when given)
            is_weight_mean      mean truncated importance weight w (with behaviour_logprobs)
            is_truncated_frac   tokens whose weight the cap held (pi_prox / pi_behav >= cap)
            num_tokens       response tokens in this batch
    """
    _check_policy_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, kl_coef)
    _check_clip_args(clip_eps_low, clip_eps_high, dual_clip_c)
    _check_behaviour_args(logprobs, behaviour_logprobs, behaviour_is_cap)
    mask = mask.bool()
    # Padding may hold anything (-inf from a masked vocabulary, NaN): zero it before arithmetic so
    # neither the forward values nor the backward through exp() can turn into NaN.
    logprobs = torch.where(mask, _upcast(logprobs), 0.0)  # [B, L]
    old_logprobs = torch.where(mask, _upcast(old_logprobs.detach()), 0.0)  # [B, L]
    adv = _upcast(advantages.detach())
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(mask, adv, 0.0)  # [B, 1] | [B, L]

    # Clamp the log-ratio before exp(): a stale or diverged token can give |log r| of hundreds,
    # and exp() would overflow to inf (then inf * 0 = NaN in the masked sum). Past +-20 the token
    # gets no gradient: with A > 0 it is clipped (r > 1 + eps) or negligible (r < e^-20); with
    # A < 0 it is dual-clipped, or, with dual-clip off, its loss saturates at -A * e^20 instead of
    # sending an e^20-sized gradient into the optimizer.
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, L]
    ratio = log_ratio.exp()  # [B, L]
    pg, clip_active, dual_held = clipped_surrogate(
        ratio, adv, clip_eps_low, clip_eps_high, dual_clip_c
    )  # [B, L] each
    is_weights: torch.Tensor | None = None
    if behaviour_logprobs is not None and behaviour_is_cap is not None:
        # old_logprobs is pi_prox here; the weight is data (no gradient), so the gradient is
        # w times the clipped loss's gradient, token by token.
        is_weights = truncated_is_weights(old_logprobs, behaviour_logprobs, mask, behaviour_is_cap)
        pg = is_weights * pg  # [B, L]

    def agg(values: torch.Tensor) -> torch.Tensor:
        return aggregate(
            values, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len
        )

    pg_loss = agg(pg)
    loss = pg_loss
    kl: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None
    if ref_logprobs is not None:
        ref_logprobs = torch.where(mask, _upcast(ref_logprobs.detach()), 0.0)  # [B, L]
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_coef > 0):
            kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)  # [B, L]
            kl_loss = agg(kl)
        if kl_coef > 0:
            loss = pg_loss + kl_coef * kl_loss

    with torch.no_grad():
        metrics = {"loss": loss, "pg_loss": pg_loss}
        metrics |= _ratio_metrics(ratio, log_ratio, adv, clip_active, dual_held, mask)
        if kl is not None and kl_loss is not None:
            metrics["kl_loss"] = kl_loss
            metrics["ref_kl"] = _token_mean(kl, mask)
        if is_weights is not None and behaviour_is_cap is not None:
            metrics["is_weight_mean"] = _token_mean(is_weights, mask)
            metrics["is_truncated_frac"] = _token_mean(is_weights >= behaviour_is_cap, mask)
    return loss, {name: value.detach().float() for name, value in metrics.items()}


def clipped_surrogate(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with DAPO's clip-higher bounds and dual-clip.

    Args:
        ratio: [B, L] pi_theta / pi_old per token.
        adv: [B, 1] per-sequence or [B, L] per-token advantages.

    Returns:
        ([B, L] loss terms max(-A r, -A clip(r)) (dual-clipped at -A c for A < 0), [B, L] where
        the clipped term was the larger, [B, L] where dual-clip held the loss).
    """
    surrogate = -adv * ratio  # [B, L]
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [B, L]
    pg = torch.maximum(surrogate, clipped)  # [B, L]
    dual_held = torch.zeros_like(pg, dtype=torch.bool)  # [B, L]
    if dual_clip_c is not None:
        dual_bound = -adv * dual_clip_c  # [B, 1] | [B, L]
        dual_held = (adv < 0) & (pg > dual_bound)  # [B, L]
        pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)  # [B, L]
    return pg, clipped > surrogate, dual_held


def _ratio_metrics(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_active: torch.Tensor,
    dual_held: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """How far the policy moved and how often clipping held it, over the real tokens."""
    return {
        "clip_frac": _token_mean(clip_active, mask),
        "clip_frac_high": _token_mean(clip_active & (adv > 0), mask),
        "clip_frac_low": _token_mean(clip_active & (adv < 0), mask),
        "dual_clip_frac": _token_mean(dual_held, mask),
        "ratio_mean": _token_mean(ratio, mask),
        "ratio_min": torch.where(mask, ratio, torch.inf).amin().nan_to_num(posinf=1.0),
        "ratio_max": torch.where(mask, ratio, -torch.inf).amax().nan_to_num(neginf=1.0),
        "approx_kl": _token_mean(ratio - 1.0 - log_ratio, mask),
        "num_tokens": mask.sum(),
    }


def truncated_is_weights(
    prox_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Truncated importance weights w = min(pi_prox / pi_behav, cap) of the sampled tokens.

    The decoupled PPO objective of AReaL (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous
    Reinforcement Learning System for Language Reasoning", arXiv 2505.24298, sec. 5) separates the
    policy that sampled a token, pi_behav (a stale policy version in the rollout engine, in another
    precision), from the proximal policy pi_prox that the PPO clip is centred on (the learner's
    own log-probs at the start of the step):

        loss_t = -w_t * min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A),
        r_t = pi_theta / pi_prox,    w_t = pi_prox / pi_behav (no gradient)

    Truncating w_t at `cap` is the truncated importance sampling (TIS) of Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training" (veRL's
    `tis_imp_ratio_cap`, typically 2): a token the engine sampled at a much lower probability than
    the learner gives it cannot dominate the gradient. AReaL's `behav_imp_weight_cap` drops such
    tokens instead; truncation keeps their (bounded) contribution.

    Args:
        prox_logprobs: `[B, L]` log pi_prox of the sampled tokens (detached here).
        behaviour_logprobs: `[B, L]` log pi_behav of the same tokens, from the rollout engine.
        mask: `[B, L]` 1 (or True) for response tokens; everything else is ignored, even NaN.
        cap: C >= 1 (a cap below 1 would down-weight even tokens both policies agree on).

    Returns:
        `[B, L]` weights in [0, cap] without gradient (exactly `cap` where truncated), 1.0
        outside the mask. A non-finite
        log-prob at a response token stays visible: NaN gives NaN (the learner then skips the
        step), a behaviour log-prob of -inf gives the cap.
    """
    if not cap >= 1:
        raise ValueError(f"behaviour_is_cap must be >= 1, got {cap}")
    if prox_logprobs.shape != behaviour_logprobs.shape or prox_logprobs.shape != mask.shape:
        raise ValueError(
            f"prox_logprobs {tuple(prox_logprobs.shape)}, behaviour_logprobs "
            f"{tuple(behaviour_logprobs.shape)} and mask {tuple(mask.shape)} must match"
        )
    mask = mask.bool()
    prox = torch.where(mask, _upcast(prox_logprobs.detach()), 0.0)  # [B, L]
    behaviour = torch.where(mask, _upcast(behaviour_logprobs.detach()), 0.0)  # [B, L]
    # Clamped before exp() against an overflow; a truncated weight is exactly `cap`.
    log_ratio = (prox - behaviour).clamp(max=LOG_RATIO_CLAMP)  # [B, L]
    return log_ratio.exp().clamp(max=cap)  # [B, L]


def logprob_mismatch(
    learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs of the sampled tokens are from the learner's.

    Args:
        learner_logprobs: `[B, L]` the learner's log-probs of the sampled tokens.
        rollout_logprobs: `[B, L]` the rollout engine's log-probs of the same tokens.
        mask: `[B, L]` 1 (or True) for response tokens; everything else is ignored, even NaN.

    Returns:
        Detached 0-d float32 tensors: "logprob_diff_mean" and "logprob_diff_max", the mean and
        the largest |learner - rollout| over the response tokens (log space; 0 without any).
    """
    mask = mask.bool()
    with torch.no_grad():
        diff = (_upcast(learner_logprobs) - _upcast(rollout_logprobs)).abs()  # [B, L]
        diff = torch.where(mask, diff, 0.0)  # |diff| >= 0, so padding cannot win the max
        diff_max = diff.amax() if diff.numel() else diff.new_zeros(())
        return {
            "logprob_diff_mean": _token_mean(diff, mask).float(),
            "logprob_diff_max": diff_max.float(),
        }


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `[B, L]` values over the True entries of the `[B, L]` bool mask; 0 if none."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (the ratio and its exp() need the mantissa); fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _check_positive(name: str, value: Normaliser | None) -> None:
    # Only Python numbers are checked: reading a tensor's value would force a device sync.
    if isinstance(value, int | float) and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_policy_args(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    kl_coef: float,
) -> None:
    shape = tuple(logprobs.shape)
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [B, L], got shape {shape}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} like logprobs")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must be [B] or [B, L] = {shape[:1]} or {shape}, "
            f"got {tuple(advantages.shape)}"
        )
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (pass kl_coef=0 to run without)")


def _check_clip_args(clip_eps_low: float, clip_eps_high: float, dual_clip_c: float | None) -> None:
    if not 0 <= clip_eps_low < 1:
        raise ValueError(f"clip_eps_low must be in [0, 1), got {clip_eps_low}")
    if clip_eps_high < 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable), got {dual_clip_c}")
