"""Policy loss, aggregation and KL: hand-computed cases, a per-element loop reference, gradients
(zero exactly where a clip holds), global normalisers for gradient accumulation, the truncated
importance-sampling correction for off-policy batches, and inputs that must not produce NaN (empty
responses, extreme log-ratios, garbage in padding)."""

import math

import pytest
import torch

from gmai_rl.algo import (
    aggregate,
    kl_estimate,
    logprob_mismatch,
    loss_normalisers,
    policy_loss,
    truncated_is_weights,
)

F64 = torch.float64


def assert_close(actual, expected, atol=1e-9, rtol=1e-7):
    # torch.allclose, not torch.testing.assert_close: the latter imports torch.distributed (~2 s).
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def log_ratios(*ratios: float) -> torch.Tensor:
    return torch.tensor([[math.log(r) for r in ratios]], dtype=F64)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


# ---------------------------------------------------------------- hand-computed policy loss


def test_positive_advantage_clip_higher_by_hand():
    # A = +1, clip range [0.8, 1.28] (DAPO clip-higher):
    #   r = 1.10 -> -1.10          r = 1.25 -> -1.25 (inside 1.28)
    #   r = 1.50 -> -1.28 clipped  r = 0.50 -> max(-0.5, -0.8) = -0.5 (pessimistic, not clipped)
    # token-mean = -(1.10 + 1.25 + 1.28 + 0.50) / 4 = -1.0325
    logprobs = leaf(log_ratios(1.10, 1.25, 1.50, 0.50))
    loss, m = policy_loss(
        logprobs,
        torch.zeros(1, 4, dtype=F64),
        torch.tensor([1.0], dtype=F64),
        torch.ones(1, 4),
        clip_eps_low=0.2,
        clip_eps_high=0.28,
    )
    assert loss.item() == pytest.approx(-1.0325)
    assert m["clip_frac"].item() == 0.25
    assert m["clip_frac_high"].item() == 0.25
    assert m["clip_frac_low"].item() == 0.0
    assert m["ratio_min"].item() == pytest.approx(0.5)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["ratio_mean"].item() == pytest.approx((1.1 + 1.25 + 1.5 + 0.5) / 4)
    loss.backward()
    # d(-A r)/d log r = -A r, / 4 tokens; the clipped token gets exactly 0
    assert_close(logprobs.grad, torch.tensor([[-1.10 / 4, -1.25 / 4, 0.0, -0.50 / 4]], dtype=F64))


def test_symmetric_clip_clips_what_clip_higher_lets_through():
    # r = 1.25 with clip_eps_high = 0.2 -> clipped to 1.2: loss -1.2, gradient 0
    logprobs = leaf(log_ratios(1.25))
    loss, m = policy_loss(
        logprobs, torch.zeros(1, 1, dtype=F64), torch.tensor([1.0], dtype=F64), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_frac"].item() == 1.0
    loss.backward()
    assert logprobs.grad.item() == 0.0


def test_asymmetry_low_bound_applies_to_negative_advantages():
    # A = -1, clip range [0.9, 1.5]: r = 0.85 -> max(0.85, 0.9) = 0.9 clipped;
    # r = 1.45 -> max(1.45, 1.45) = 1.45 not clipped (a negative advantage is never clipped above)
    logprobs = leaf(log_ratios(0.85, 1.45))
    loss, m = policy_loss(
        logprobs,
        torch.zeros(1, 2, dtype=F64),
        torch.tensor([-1.0], dtype=F64),
        torch.ones(1, 2),
        clip_eps_low=0.1,
        clip_eps_high=0.5,
    )
    assert loss.item() == pytest.approx((0.9 + 1.45) / 2)
    assert m["clip_frac_low"].item() == 0.5
    assert m["clip_frac_high"].item() == 0.0
    loss.backward()
    assert_close(logprobs.grad, torch.tensor([[0.0, 1.45 / 2]], dtype=F64))


@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
def test_negative_advantage_and_dual_clip_by_hand(dual_clip_c):
    # A = -1, clip range [0.8, 1.2], per-token loss max(r, clip(r)):
    #   r = 0.7 -> 0.8 (clipped)   r = 0.9 -> 0.9   r = 1.5 -> 1.5   r = 4.0 -> 4.0
    # dual clip c = 3 caps the loss of A < 0 tokens at -A * c = 3: r = 4.0 -> 3.0
    logprobs = leaf(log_ratios(0.7, 0.9, 1.5, 4.0))
    loss, m = policy_loss(
        logprobs,
        torch.zeros(1, 4, dtype=F64),
        torch.tensor([-1.0], dtype=F64),
        torch.ones(1, 4),
        dual_clip_c=dual_clip_c,
    )
    if dual_clip_c is None:
        assert loss.item() == pytest.approx((0.8 + 0.9 + 1.5 + 4.0) / 4)  # 1.8
        assert m["dual_clip_frac"].item() == 0.0
    else:
        assert loss.item() == pytest.approx((0.8 + 0.9 + 1.5 + 3.0) / 4)  # 1.55
        assert m["dual_clip_frac"].item() == 0.25
    assert m["clip_frac"].item() == 0.25
    loss.backward()
    last = 0.0 if dual_clip_c else 4.0 / 4
    assert_close(logprobs.grad, torch.tensor([[0.0, 0.9 / 4, 1.5 / 4, last]], dtype=F64))


def test_dual_clip_leaves_positive_advantages_alone():
    # A = +2, r = 4: clipped to 1.2 as usual -> -2.4, the dual clip does not apply to A > 0
    loss, m = policy_loss(
        log_ratios(4.0),
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([2.0], dtype=F64),
        torch.ones(1, 1),
        dual_clip_c=3.0,
    )
    assert loss.item() == pytest.approx(-2.4)
    assert m["dual_clip_frac"].item() == 0.0


def test_kl_term_by_hand():
    # ratio 1 (log p = old), A = 0 -> pg = 0; KL k1 = log p - log ref = log 0.5 - log 0.25 = ln 2
    logprobs = torch.full((1, 2), math.log(0.5), dtype=F64)
    ref = torch.full((1, 2), math.log(0.25), dtype=F64)
    loss, m = policy_loss(
        logprobs,
        logprobs,
        torch.zeros(1, dtype=F64),
        torch.ones(1, 2),
        ref_logprobs=ref,
        kl_coef=0.1,
        kl_estimator="k1",
    )
    assert loss.item() == pytest.approx(0.1 * math.log(2))
    assert m["pg_loss"].item() == 0.0
    assert m["kl_loss"].item() == pytest.approx(math.log(2))
    assert m["ref_kl"].item() == pytest.approx(math.log(2))
    assert m["approx_kl"].item() == 0.0


def test_kl_coef_zero_ignores_reference_but_logs_it():
    lp, old, adv = (
        leaf(log_ratios(1.1, 0.9)),
        torch.zeros(1, 2, dtype=F64),
        torch.ones(1, dtype=F64),
    )
    without, m0 = policy_loss(lp, old, adv, torch.ones(1, 2))
    with_ref, m1 = policy_loss(lp, old, adv, torch.ones(1, 2), ref_logprobs=torch.zeros(1, 2))
    assert without.item() == with_ref.item()
    assert "ref_kl" not in m0 and "kl_loss" not in m0
    assert m1["ref_kl"].item() > 0
    (g0,) = torch.autograd.grad(without, lp)
    (g1,) = torch.autograd.grad(with_ref, lp)
    assert torch.equal(g0, g1)


def test_kl_coef_without_reference_raises():
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), kl_coef=0.1
        )


# ---------------------------------------------------------------- loop reference


def loop_policy_loss(
    lp, old, adv, mask, ref, kl_coef, kl_est, lo, hi, c, mode, norm_len, behav=None, cap=None
):
    """Per-token Python floats, as the formulas read; returns the total loss."""
    B, L = len(lp), len(lp[0])
    pg = [[0.0] * L for _ in range(B)]
    kl = [[0.0] * L for _ in range(B)]
    for i in range(B):
        for t in range(L):
            if not mask[i][t]:
                continue
            a = adv[i] if not isinstance(adv[i], list) else adv[i][t]
            r = math.exp(max(-20.0, min(20.0, lp[i][t] - old[i][t])))
            loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            if behav is not None:
                loss *= min(math.exp(old[i][t] - behav[i][t]), cap)
            pg[i][t] = loss
            if ref is not None:
                x = ref[i][t] - lp[i][t]
                if kl_est == "k1":
                    kl[i][t] = -x
                elif kl_est == "k2":
                    kl[i][t] = x * x / 2
                else:
                    x = max(-20.0, min(20.0, x))
                    kl[i][t] = min(max(math.exp(x) - x - 1, 0.0), 10.0)

    def agg(v):
        lengths = [sum(1 for t in range(L) if mask[i][t]) for i in range(B)]
        sums = [sum(v[i][t] for t in range(L) if mask[i][t]) for i in range(B)]
        if mode == "token-mean":
            return sum(sums) / max(sum(lengths), 1)
        nonempty = [i for i in range(B) if lengths[i] > 0]
        if mode == "seq-mean-token-mean":
            per_seq = [sums[i] / lengths[i] for i in nonempty]
        else:
            per_seq = [sums[i] / norm_len for i in nonempty]
        return sum(per_seq) / max(len(nonempty), 1)

    return agg(pg) + kl_coef * agg(kl)


def random_batch(seed, B=6, L=7, per_token_adv=False, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=dtype) * 3
    logprobs = old + torch.randn(B, L, generator=g, dtype=dtype) * 0.4  # ratios ~ 0.5 .. 2
    ref = old + torch.randn(B, L, generator=g, dtype=dtype) * 0.5
    shape = (B, L) if per_token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=dtype)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0] = 0  # one empty response
    lengths[1] = L
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return logprobs, old, adv, mask, ref


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dual_clip_c", "kl_est", "per_token_adv"),
    [(None, "k3", False), (3.0, "k1", True), (2.0, "k2", False)],
)
def test_matches_loop_reference(seed, mode, dual_clip_c, kl_est, per_token_adv):
    lp, old, adv, mask, ref = random_batch(seed, per_token_adv=per_token_adv)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=dual_clip_c, norm_len=10)
    loss, _ = policy_loss(
        lp,
        old,
        adv,
        mask,
        ref_logprobs=ref,
        kl_coef=0.05,
        kl_estimator=kl_est,
        loss_agg=mode,
        **kwargs,
    )
    expected = loop_policy_loss(
        lp.tolist(),
        old.tolist(),
        adv.tolist(),
        mask.tolist(),
        ref.tolist(),
        0.05,
        kl_est,
        0.2,
        0.28,
        dual_clip_c,
        mode,
        10,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gradient_is_zero_exactly_where_clipped(seed):
    lp, old, adv, mask, _ = random_batch(seed, B=8, L=9)
    lp = leaf(lp)
    loss, m = policy_loss(lp, old, adv, mask, clip_eps_low=0.1, clip_eps_high=0.15, dual_clip_c=2.0)
    loss.backward()
    a = adv[:, None].expand_as(lp)
    r = (lp - old).exp().detach()
    held = ((a > 0) & (r > 1.15)) | ((a < 0) & (r < 0.9)) | ((a < 0) & (r > 2.0))
    assert held[mask].any() and (~held[mask]).any()  # the seed exercises both cases
    assert (lp.grad[mask & held] == 0).all()
    assert (lp.grad[mask & ~held] != 0).all()
    assert (lp.grad[~mask] == 0).all()
    # unclipped tokens: d(-A r)/d log p / num_tokens
    free = mask & ~held
    assert_close(lp.grad[free], (-a * r)[free] / mask.sum())
    expected_frac = ((a > 0) & (r > 1.15) | (a < 0) & (r < 0.9))[mask].double().mean()
    assert m["clip_frac"].item() == pytest.approx(expected_frac.item())


# ---------------------------------------------------------------- off-policy correction (TIS)

PROBS_PROX = [0.5, 0.2, 0.3, 0.9]
PROBS_BEHAV = [0.5, 0.05, 0.6, 0.3]  # pi_prox / pi_behav = 1, 4, 0.5, 3


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=F64)


def test_truncated_is_weights_by_hand():
    # min(pi_prox / pi_behav, 2) = 1, 2, 0.5, 2; the fifth token is padding with garbage: 1
    prox = torch.cat([log_probs(*PROBS_PROX), torch.tensor([[math.nan]], dtype=F64)], dim=1)
    behav = torch.cat([log_probs(*PROBS_BEHAV), torch.tensor([[-math.inf]], dtype=F64)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w = truncated_is_weights(leaf(prox), behav, mask, cap=2.0)
    assert_close(w, torch.tensor([[1.0, 2.0, 0.5, 2.0, 1.0]], dtype=F64))
    assert w[0, 0].item() == 1.0  # exactly 1 where the two policies agree
    assert w[0, 1].item() == w[0, 3].item() == 2.0  # exactly the cap where truncated
    assert not w.requires_grad  # data, not a path for the gradient
    # cap 1: only tokens the engine over-weighted relative to the learner are down-weighted
    w1 = truncated_is_weights(prox, behav, mask, cap=1.0)
    assert_close(w1, torch.tensor([[1.0, 1.0, 0.5, 1.0, 1.0]], dtype=F64))


def test_truncated_is_weights_keep_a_nan_on_a_response_token_visible():
    prox, behav = log_probs(0.5, 0.5), torch.tensor([[math.nan, -math.inf]], dtype=F64)
    w = truncated_is_weights(prox, behav, torch.ones(1, 2), cap=2.0)
    assert math.isnan(w[0, 0].item()) and w[0, 1].item() == 2.0


def test_decoupled_loss_by_hand():
    # A = +1, clip [0.8, 1.2], r = pi_theta / pi_prox, w = min(pi_prox / pi_behav, 2):
    #   r = 1.1, w = 1                -> -1.1
    #   r = 1.5, w = 2 (4 truncated)  -> -2 * 1.2 = -2.4 (clipped)
    #   r = 0.5, w = 0.5              -> -0.5 * 0.5 = -0.25
    #   r = 1.0, w = 2 (3 truncated)  -> -2 * 1.0 = -2.0
    # token-mean = -(1.1 + 2.4 + 0.25 + 2.0) / 4 = -1.4375
    prox = log_probs(*PROBS_PROX)
    logprobs = leaf(prox + log_ratios(1.1, 1.5, 0.5, 1.0))
    loss, m = policy_loss(
        logprobs,
        prox,
        torch.tensor([1.0], dtype=F64),
        torch.ones(1, 4),
        behaviour_logprobs=log_probs(*PROBS_BEHAV),
        behaviour_is_cap=2.0,
    )
    assert loss.item() == pytest.approx(-1.4375)
    assert m["pg_loss"].item() == pytest.approx(-1.4375)
    assert m["is_weight_mean"].item() == pytest.approx((1 + 2 + 0.5 + 2) / 4)
    assert m["is_truncated_frac"].item() == 0.5
    # the clip sees r alone
    assert m["clip_frac"].item() == 0.25
    assert m["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    # d(-w A r)/d log p = -w A r, / 4 tokens; the clipped token gets exactly 0
    assert_close(logprobs.grad, torch.tensor([[-1.1 / 4, 0.0, -0.25 / 4, -2.0 / 4]], dtype=F64))


def test_decoupled_loss_weights_a_dual_clipped_token():
    # A = -1, r = 4 held by the dual clip at -A * 3 = 3, then weighted by w = 0.5 -> 1.5
    loss, m = policy_loss(
        log_ratios(4.0),
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([-1.0], dtype=F64),
        torch.ones(1, 1),
        dual_clip_c=3.0,
        behaviour_logprobs=torch.full((1, 1), math.log(2.0), dtype=F64),
        behaviour_is_cap=2.0,
    )
    assert loss.item() == pytest.approx(1.5)
    assert m["dual_clip_frac"].item() == 1.0 and m["is_weight_mean"].item() == 0.5


def random_behaviour(old, seed, scale=0.8):
    """Rollout log-probs around pi_prox: weights from ~0.1 to ~10, some over a cap of 2."""
    g = torch.Generator().manual_seed(100 + seed)
    return old + torch.randn(old.shape, generator=g, dtype=old.dtype) * scale


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dual_clip_c", [None, 2.0])
def test_decoupled_gradient_is_the_weight_times_the_clipped_gradient(seed, dual_clip_c):
    lp, old, adv, mask, _ = random_batch(seed, B=8, L=9)
    behav = random_behaviour(old, seed)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=dual_clip_c)
    lp = leaf(lp)
    (plain,) = torch.autograd.grad(policy_loss(lp, old, adv, mask, **kwargs)[0], lp)
    loss, m = policy_loss(
        lp, old, adv, mask, behaviour_logprobs=behav, behaviour_is_cap=2.0, **kwargs
    )
    (corrected,) = torch.autograd.grad(loss, lp)
    ratio = (old - behav).exp()
    w = ratio.clamp(max=2.0)
    truncated = ratio[mask] > 2.0
    assert truncated.any() and not truncated.all()  # the seed exercises both cases
    assert_close(corrected[mask], (w * plain)[mask])
    assert (corrected[~mask] == 0).all()
    assert m["is_weight_mean"].item() == pytest.approx(w[mask].mean().item())
    assert m["is_truncated_frac"].item() == pytest.approx(truncated.double().mean().item())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_decoupled_loss_matches_loop_reference(seed, mode):
    lp, old, adv, mask, ref = random_batch(seed, per_token_adv=seed == 1)
    behav = random_behaviour(old, seed)
    loss, _ = policy_loss(
        lp,
        old,
        adv,
        mask,
        ref_logprobs=ref,
        kl_coef=0.05,
        clip_eps_high=0.28,
        dual_clip_c=3.0,
        loss_agg=mode,
        norm_len=10,
        behaviour_logprobs=behav,
        behaviour_is_cap=2.0,
    )
    lists = [t.tolist() for t in (lp, old, adv, mask, ref)]
    expected = loop_policy_loss(
        *lists, 0.05, "k3", 0.2, 0.28, 3.0, mode, 10, behav=behav.tolist(), cap=2.0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_correction_off_or_between_agreeing_policies_is_the_plain_loss_bit_for_bit():
    lp, old, adv, mask, ref = random_batch(3, dtype=torch.float32)
    lp = leaf(lp)
    common = dict(ref_logprobs=ref, kl_coef=0.05, dual_clip_c=3.0)
    plain, m_plain = policy_loss(lp, old, adv, mask, **common)
    off, m_off = policy_loss(
        lp, old, adv, mask, behaviour_logprobs=None, behaviour_is_cap=None, **common
    )
    behav = torch.where(mask, old, torch.nan)  # pi_behav == pi_prox, garbage in the padding
    agreeing, m_agreeing = policy_loss(
        lp, old, adv, mask, behaviour_logprobs=behav, behaviour_is_cap=2.0, **common
    )
    grads = [torch.autograd.grad(loss, lp)[0] for loss in (plain, off, agreeing)]
    assert torch.equal(plain, off) and torch.equal(plain, agreeing)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert m_off.keys() == m_plain.keys()
    assert m_agreeing.keys() - m_plain.keys() == {"is_weight_mean", "is_truncated_frac"}
    assert all(torch.equal(m_plain[k], m_agreeing[k]) for k in m_plain)
    assert m_agreeing["is_weight_mean"].item() == 1.0
    assert m_agreeing["is_truncated_frac"].item() == 0.0


def test_correction_ignores_garbage_in_padding():
    lp, old, adv, mask, _ = random_batch(4)
    behav = random_behaviour(old, 4)
    lp = leaf(lp)
    garbage = behav.clone()
    pad = (~mask).nonzero()
    for k, (i, t) in enumerate(pad.tolist()):
        garbage[i, t] = (math.nan, math.inf, -math.inf, 1e30)[k % 4]
    losses, grads = [], []
    for b in (behav, garbage):
        loss, _ = policy_loss(lp, old, adv, mask, behaviour_logprobs=b, behaviour_is_cap=2.0)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, lp)[0])
    assert len(pad) >= 4 and torch.isfinite(losses[1]) and torch.isfinite(grads[1]).all()
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


def test_a_nan_behaviour_logprob_on_a_response_token_makes_the_loss_nan():
    # Bad rollout data must not pass silently: the learner skips a step whose loss is NaN.
    loss, _ = policy_loss(
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.ones(1),
        torch.ones(1, 2),
        behaviour_logprobs=torch.tensor([[0.0, math.nan]]),
        behaviour_is_cap=2.0,
    )
    assert math.isnan(loss.item())


def test_logprob_mismatch_by_hand():
    # |learner - rollout| on response tokens: 0.25, 1.0, 0.0 | 0.5; padding holds garbage
    learner = torch.tensor([[-1.0, -2.0, -0.5, math.nan], [-3.0, 0.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.25, -1.0, -0.5, -math.inf], [-2.5, 9.0, math.inf, math.nan]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    m = logprob_mismatch(leaf(learner), rollout, mask)
    assert m.keys() == {"logprob_diff_mean", "logprob_diff_max"}
    assert m["logprob_diff_mean"].item() == pytest.approx(1.75 / 4)
    assert m["logprob_diff_max"].item() == 1.0
    for value in m.values():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad
    empty = logprob_mismatch(learner, rollout, torch.zeros(2, 4))
    assert empty["logprob_diff_mean"].item() == 0.0 and empty["logprob_diff_max"].item() == 0.0
    assert (
        logprob_mismatch(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3))[
            "logprob_diff_max"
        ].item()
        == 0.0
    )


# ---------------------------------------------------------------- aggregation


def test_aggregate_by_hand_with_an_empty_sequence_and_garbage_padding():
    values = torch.tensor(
        [[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), 0.0, 0.0], [float("nan")] * 4]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == 2.5  # (1 + 2 + 3 + 4) / 4
    assert aggregate(values, mask, "seq-mean-token-mean").item() == 3.0  # (2 + 4) / 2
    # (6 / 4 + 4 / 4) / 2 = 1.25
    assert aggregate(values, mask, "seq-mean-token-sum-norm", norm_len=4).item() == 1.25
    # explicit normalisers replace the local counts
    assert aggregate(values, mask, "token-mean", num_tokens=8).item() == 1.25
    assert aggregate(values, mask, "seq-mean-token-mean", num_seqs=torch.tensor(4)).item() == 1.5
    assert loss_normalisers(mask) == (4, 2)


@pytest.mark.parametrize("mode", MODES)
def test_all_empty_batch_gives_zero_loss_and_zero_gradient(mode):
    lp = leaf(torch.randn(2, 3))
    loss, m = policy_loss(
        lp,
        torch.full((2, 3), -float("inf")),
        torch.ones(2),
        torch.zeros(2, 3),
        ref_logprobs=torch.zeros(2, 3),
        kl_coef=0.1,
        loss_agg=mode,
        norm_len=3,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(2, 3))
    for name, value in m.items():
        assert torch.isfinite(value), name
    assert m["ratio_min"].item() == m["ratio_max"].item() == 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[3, 5], [1, 1, 2, 4], [8]])
def test_micro_batches_with_global_normalisers_sum_to_the_full_batch(mode, splits):
    lp, old, adv, mask, ref = random_batch(7, B=8, L=6)
    kwargs = dict(
        ref_logprobs=ref,
        kl_coef=0.1,
        dual_clip_c=3.0,
        clip_eps_high=0.28,
        loss_agg=mode,
        norm_len=6,
    )
    full_lp = leaf(lp)
    full_loss, _ = policy_loss(full_lp, old, adv, mask, **kwargs)
    full_loss.backward()

    num_tokens, num_seqs = loss_normalisers(mask)  # the learner all-reduces these over ranks
    micro_lp = leaf(lp)
    total = torch.zeros((), dtype=F64)
    start = 0
    for size in splits:
        rows = slice(start, start + size)
        start += size
        kw = dict(kwargs, ref_logprobs=ref[rows])
        loss, _ = policy_loss(
            micro_lp[rows],
            old[rows],
            adv[rows],
            mask[rows],
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            **kw,
        )
        loss.backward()  # gradients accumulate as over DeepSpeed micro-steps
        total += loss.detach()
    assert_close(total, full_loss.detach(), rtol=1e-12)
    assert_close(micro_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)


def test_micro_batches_with_local_normalisers_do_not_sum_to_the_full_batch():
    # The reason global normalisers exist: a mean of micro-batch token means over-weights the
    # tokens of short micro-batches.
    values = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    full = aggregate(values, mask, "token-mean")  # 7 / 4
    local = (
        aggregate(values[:1], mask[:1], "token-mean")
        + aggregate(values[1:], mask[1:], "token-mean")
    ) / 2
    assert full.item() == 1.75 and local.item() == 2.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="mean"), "unknown loss aggregation"),
        (dict(mode="seq-mean-token-sum-norm"), "positive norm_len"),
        (dict(mode="token-mean", num_tokens=0), "num_tokens must be positive"),
    ],
)
def test_aggregate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), **kwargs)


# ---------------------------------------------------------------- numerics


def test_extreme_log_ratios_stay_finite():
    # |log r| of 1000 would overflow exp() in any dtype; the clamp keeps loss and gradient finite
    lp = leaf(torch.tensor([[1000.0, -1000.0, 0.0], [1000.0, -1000.0, 50.0]]))
    old = torch.zeros(2, 3)
    for dual in (None, 3.0):
        loss, m = policy_loss(
            lp,
            old,
            torch.tensor([1.0, -1.0]),
            torch.ones(2, 3),
            ref_logprobs=old,
            kl_coef=0.1,
            dual_clip_c=dual,
        )
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v) for v in m.values())


def test_half_precision_inputs_are_computed_in_float32():
    lp, old, adv, mask, ref = random_batch(5, dtype=torch.float32)
    loss32, _ = policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss16, m = policy_loss(
        lp.bfloat16(), old.bfloat16(), adv, mask, ref_logprobs=ref.bfloat16(), kl_coef=0.1
    )
    assert loss16.dtype == torch.float32 and m["loss"].dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.05)


def test_metrics_are_detached_0d_float32_tensors():
    lp, old, adv, mask, ref = random_batch(6)
    _, m = policy_loss(leaf(lp), old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert set(m) >= {
        "loss",
        "pg_loss",
        "kl_loss",
        "clip_frac",
        "clip_frac_high",
        "clip_frac_low",
        "dual_clip_frac",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "approx_kl",
        "ref_kl",
        "num_tokens",
    }
    for name, value in m.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, name
    assert m["num_tokens"].item() == mask.sum().item()
    assert m["approx_kl"].item() >= 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(advantages=torch.zeros(3)), "advantages must be"),
        (dict(mask=torch.ones(2, 3)), "mask has shape"),
        (dict(logprobs=torch.zeros(2, 4, 1)), "logprobs must be"),
        (dict(clip_eps_low=1.0), "clip_eps_low"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"),
        (dict(dual_clip_c=1.0), "dual_clip_c"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(behaviour_logprobs=torch.zeros(2, 4)), "pass both or neither"),
        (dict(behaviour_is_cap=2.0), "pass both or neither"),
        (dict(behaviour_logprobs=torch.zeros(2, 3), behaviour_is_cap=2.0), "behaviour_logprobs"),
        (dict(behaviour_logprobs=torch.zeros(2, 4), behaviour_is_cap=0.5), "must be >= 1"),
        (dict(behaviour_logprobs=torch.zeros(2, 4), behaviour_is_cap=math.nan), "must be >= 1"),
    ],
)
def test_policy_loss_rejects_bad_arguments(kwargs, message):
    args = dict(
        logprobs=torch.zeros(2, 4),
        old_logprobs=torch.zeros(2, 4),
        advantages=torch.zeros(2),
        mask=torch.ones(2, 4),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss(**args)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # p = 0.5, ref = 0.25: x = log ref - log p = -ln 2
    #   k1 = ln 2 = 0.693147; k2 = (ln 2)^2 / 2 = 0.240227; k3 = 0.5 + ln 2 - 1 = 0.193147
    # p = 0.25, ref = 0.5: x = ln 2
    #   k1 = -0.693147;       k2 = 0.240227;                k3 = 2 - ln 2 - 1 = 0.306853
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=F64)
    assert kl_estimate(lp, ref, "k1").tolist()[0] == pytest.approx([0.693147, -0.693147], abs=1e-6)
    assert kl_estimate(lp, ref, "k2").tolist()[0] == pytest.approx([0.240227, 0.240227], abs=1e-6)
    assert kl_estimate(lp, ref, "k3").tolist()[0] == pytest.approx([0.193147, 0.306853], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_match_loop_and_k3_is_nonnegative(seed):
    g = torch.Generator().manual_seed(seed)
    lp, ref = -torch.rand(4, 5, generator=g) * 4, -torch.rand(4, 5, generator=g) * 4
    k3 = kl_estimate(lp, ref, "k3")
    assert (k3 >= 0).all()
    for i in range(4):
        for t in range(5):
            x = ref[i, t].item() - lp[i, t].item()
            assert kl_estimate(lp, ref, "k1")[i, t].item() == pytest.approx(-x, abs=1e-6)
            assert kl_estimate(lp, ref, "k2")[i, t].item() == pytest.approx(x * x / 2, abs=1e-6)
            assert k3[i, t].item() == pytest.approx(min(math.exp(x) - x - 1, 10.0), abs=1e-5)


def test_k3_is_clamped_and_finite_at_extremes():
    lp = torch.tensor([[-1000.0, 0.0, 0.0, -1e-8]])
    ref = torch.tensor([[0.0, -1000.0, 0.0, 0.0]])
    k3 = kl_estimate(lp, ref, "k3")
    assert k3.tolist()[0] == [10.0, 10.0, 0.0, pytest.approx(0.0, abs=1e-7)]
    assert (k3 >= 0).all()


def test_kl_estimate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 3))
