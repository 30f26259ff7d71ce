"""Data parallelism and micro-batching do not change the gradient.

Two DeepSpeed ZeRO ranks (Ray actors, gloo), each taking its shard of a batch in micro-batches
with globally normalised losses, must report the same global gradient norm as one plain-torch
backward pass over the whole batch, and take the same optimizer step on every rank.
"""

import pytest
import torch

from gmai_rl.algo import policy_loss, token_logprobs
from gmai_rl.data import load_mcq_jsonl
from gmai_rl.feed import sft_samples
from gmai_rl.learner.batching import plan_rank_batches
from gmai_rl.learner.options import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.learner.rank_metrics import combine_rank_metrics
from gmai_rl.learner.worker import Learner
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.sync.group import find_free_port

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def samples(tiny_model_dir, synthetic_dir):
    tokenizer = tokenizer_of(load_processor(ModelOptions(tiny_model_dir)))
    items = load_mcq_jsonl(synthetic_dir / "sft.jsonl")[:12]
    out = sft_samples(items, tokenizer, None)
    for i, s in enumerate(out):  # varied completion lengths and advantages of both signs
        s.completion_ids = s.completion_ids[: 5 + 2 * i]
        s.advantage = [1.0, -0.5, 0.25, -2.0][i % 4]
    return out


def reference_grad_norm(model_dir, samples) -> float:
    """One backward pass over the whole batch in plain torch (no DeepSpeed, no sharding)."""
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
    return float(
        torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}
    )
    yield
    ray.shutdown()


def start_ranks(model_dir, opts, loss=None, world=2):
    port = find_free_port()
    return [
        ray.remote(Learner)
        .options(num_cpus=1)
        .remote(
            ModelOptions(model_dir),
            opts,
            loss or LossOptions(kl_coef=0.0),
            rank,
            world,
            "127.0.0.1",
            port,
        )
        for rank in range(world)
    ]


def train(ranks, samples):
    plans = plan_rank_batches(samples, world_size=len(ranks), num_minibatches=1)
    return combine_rank_metrics(
        ray.get([r.train_rl.remote(p) for r, p in zip(ranks, plans, strict=True)])
    )


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_with_micro_batches_match_one_full_batch(
    local_ray, tiny_model_dir, samples, zero_stage
):
    expected = reference_grad_norm(tiny_model_dir, samples)
    # Chunks of 4 completion tokens: the LM head runs (and is recomputed in backward) several
    # times per micro-batch, each time on a weight ZeRO-3 must gather.
    opts = LearnerOptions(
        zero_stage=zero_stage, micro_batch_size=2, num_minibatches=1, logprob_chunk_size=4
    )
    ranks = start_ranks(tiny_model_dir, opts)
    try:
        metrics = train(ranks, samples)  # 3 micro-batches per rank
        assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
        weights = ray.get([r.named_parameters.remote() for r in ranks])
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*weights, strict=True))
    finally:
        for r in ranks:
            ray.kill(r)


def test_kl_grows_as_the_policy_moves_and_resets_with_the_reference(
    local_ray, tiny_model_dir, samples
):
    ranks = start_ranks(
        tiny_model_dir, LearnerOptions(micro_batch_size=4), LossOptions(kl_coef=0.1)
    )
    try:
        ray.get([r.start_stage.remote(OptimOptions(lr=1e-2, total_steps=10)) for r in ranks])
        first = train(ranks, samples)
        second = train(ranks, samples)
        assert first["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
        assert second["ref_kl"] > 1e-4 and second["kl_loss"] > 0
        assert second["loss"] == pytest.approx(
            second["pg_loss"] + 0.1 * second["kl_loss"], rel=1e-4
        )
        # A new stage re-anchors the reference at the current policy (the RL start after SFT).
        ray.get([r.start_stage.remote(OptimOptions(lr=1e-2, total_steps=10), True) for r in ranks])
        assert train(ranks, samples)["ref_kl"] == pytest.approx(0.0, abs=1e-6)
    finally:
        for r in ranks:
            ray.kill(r)
