"""LoRA learners: only the adapters train, the KL reference is the base, checkpoints resume exactly,
and the exported adapter loads with PEFT and scores as the learner did.

Two DeepSpeed ranks (Ray actors, gloo) on the tiny Qwen2.5-VL with `model.lora` on, under ZeRO-2
and ZeRO-3; one pair of rank processes serves the module (tests/learner_ranks.py).
"""

import dataclasses
import hashlib
import os

import pytest
import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.data import load_mcq_jsonl
from gmai_rl.feed import sft_samples
from gmai_rl.learner.batching import plan_rank_batches
from gmai_rl.learner.options import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.learner.rank_metrics import combine_rank_metrics
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.lora import LoraOptions
from gmai_rl.models.tokens import vision_token_ids

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")
pytest.importorskip("torchvision")  # the tiny Qwen2.5-VL's processor

LORA = LoraOptions(enabled=True, rank=4, alpha=8)
OPTIM = OptimOptions(lr=2e-2, total_steps=10)


@pytest.fixture(scope="module")
def samples(synthetic_dir, tiny_model_dir):
    items = load_mcq_jsonl(synthetic_dir / "sft.jsonl")[:8]
    tokenizer = tokenizer_of(load_processor(ModelOptions(tiny_model_dir)))
    out = sft_samples(items, tokenizer, None)
    for i, s in enumerate(out):
        s.completion_ids = s.completion_ids[: 6 + 2 * i]
        s.advantage = [1.0, -0.5, 0.25, -2.0][i % 4]
    return out


def on_all(ranks, method, *args):
    return ray.get([getattr(r, method).remote(*args) for r in ranks])


def train(ranks, samples):
    plans = plan_rank_batches(samples, world_size=len(ranks), num_minibatches=1)
    return combine_rank_metrics(
        ray.get([r.train_rl.remote(p) for r, p in zip(ranks, plans, strict=True)])
    )


def sft(ranks, samples):
    """One SFT step over the samples, split between the ranks."""
    half = len(samples) // 2
    tokens = sum(len(s.completion_ids) for s in samples)
    shares = (samples[:half], samples[half:])
    ray.get([r.train_sft.remote(share, tokens) for r, share in zip(ranks, shares, strict=True)])


def checksum(tensors) -> str:
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@torch.no_grad()
def logprobs_of(model, processor, samples) -> list[list[float]]:
    """Completion log-probs under a plain transformers (or PEFT) model, one full forward."""
    batch = build_policy_batch(processor, samples, tokenizer_of(processor).pad_token_id)
    logits = completion_logits(
        model(**batch.model_inputs, use_cache=False).logits, batch.logit_index
    )
    logits[..., vision_token_ids(tokenizer_of(processor))] = float("-inf")
    rows = token_logprobs(logits, batch.completion_ids)
    return [row[: len(s.completion_ids)].tolist() for s, row in zip(samples, rows, strict=True)]


def assert_close(actual, expected, atol=2e-5):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(e), atol=atol, rtol=0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_only_the_adapters_train_and_the_kl_reference_is_the_policy_rl_started_from(
    learners, tiny_model_dir, samples, zero_stage
):
    model = ModelOptions(tiny_model_dir, lora=LORA)
    # Two mini-batches: the second's old log-probs are scored first, a forward without a
    # backward; after that and an SFT step ZeRO-3 may hold the adapters gathered, and the
    # reference swap must reach the forward anyway (writing into the partitions did not).
    opts = LearnerOptions(zero_stage=zero_stage, micro_batch_size=2, num_minibatches=2)
    ranks = learners(model, opts, LossOptions(kl_coef=0.1))
    base = ModelOptions(tiny_model_dir)
    base_logprobs = logprobs_of(load_model(base).eval(), load_processor(base), samples)
    # Fresh adapters: the reference is the base model itself.
    for got in on_all(ranks, "reference_logprobs", samples):
        assert_close(got, base_logprobs)
    before = on_all(ranks, "named_parameters")[0]

    sft(ranks, samples)  # a cold start, then RL anchored where it starts
    on_all(ranks, "start_stage", OPTIM, True)
    at_start = on_all(ranks, "score", samples)[0]
    assert max_gap(at_start, base_logprobs) > 1e-4  # the cold start moved the adapters
    first, second = train(ranks, samples), train(ranks, samples)
    after = on_all(ranks, "named_parameters")[0]

    base_before = [(n, t) for n, t in before if not is_adapter(n)]
    base_after = [(n, t) for n, t in after if not is_adapter(n)]
    adapters = sum(t.numel() for n, t in after if is_adapter(n))
    assert 0 < adapters < sum(t.numel() for _, t in base_after) / 10
    assert checksum(base_after) == checksum(base_before)  # the base never moves
    lora_b = [(n, t) for n, t in after if ".lora_B." in n]
    assert lora_b and all(float(t.abs().max()) > 0 for _, t in lora_b)  # started at 0

    # The KL grows as RL moves the adapters away from the reference, which stays put.
    assert first["ref_kl"] < second["ref_kl"] and second["ref_kl"] > 1e-5
    for got in on_all(ranks, "reference_logprobs", samples):
        assert_close(got, at_start)
    assert max_gap(on_all(ranks, "score", samples)[0], at_start) > 1e-4


def max_gap(a, b) -> float:
    return max(abs(x - y) for p, e in zip(a, b, strict=True) for x, y in zip(p, e, strict=True))


def test_the_exported_adapter_loads_with_peft_and_as_a_model_path(
    learners, tiny_model_dir, samples, tmp_path
):
    from peft import PeftModel

    model = ModelOptions(tiny_model_dir, lora=dataclasses.replace(LORA, export_merged=True))
    ranks = learners(model, LearnerOptions(zero_stage=3, micro_batch_size=4))
    on_all(ranks, "start_stage", OPTIM, True)
    train(ranks, samples)
    learned = on_all(ranks, "score", samples)[0]
    final = tmp_path / "final"
    on_all(ranks, "save_pretrained", str(final))

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final))
    assert not (final / "model.safetensors").exists()  # the adapter alone, not the base
    base = ModelOptions(tiny_model_dir)
    processor = load_processor(base)
    with_peft = PeftModel.from_pretrained(load_model(base), str(final)).eval()
    assert_close(logprobs_of(with_peft, processor, samples), learned)
    # gmai-rl eval's path: the folder as model.path (its base loaded, the adapter merged in).
    as_path = ModelOptions(str(final))
    assert_close(logprobs_of(load_model(as_path).eval(), load_processor(as_path), samples), learned)
    merged = ModelOptions(str(final / "merged"))
    assert (final / "merged" / "config.json").exists()
    assert_close(logprobs_of(load_model(merged).eval(), load_processor(merged), samples), learned)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_resumed_lora_learner_trains_on_as_one_that_never_stopped(
    learners, tiny_model_dir, samples, tmp_path, zero_stage
):
    model = ModelOptions(tiny_model_dir, lora=LORA)
    opts = LearnerOptions(zero_stage=zero_stage, micro_batch_size=4)
    loss = LossOptions(kl_coef=0.1)
    ranks = learners(model, opts, loss)
    on_all(ranks, "start_stage", OPTIM, True)
    train(ranks, samples)
    on_all(ranks, "start_stage", OPTIM, True)  # the reference: the adapters as trained so far
    train(ranks, samples)
    on_all(ranks, "save_state", str(tmp_path))
    uninterrupted = [train(ranks, samples) for _ in range(2)]
    weights = on_all(ranks, "named_parameters")[0]

    policy = tmp_path / "learner" / "policy"
    saved = sum(f.stat().st_size for f in policy.rglob("*") if f.is_file())
    base_bytes = sum(t.numel() * t.element_size() for n, t in weights if not is_adapter(n))
    assert saved < base_bytes  # adapters and their optimizer state, not the base

    ranks = learners(model, opts, loss)  # new learners, as after a restart
    on_all(ranks, "load_state", str(tmp_path))
    resumed = [train(ranks, samples) for _ in range(2)]
    assert checksum(on_all(ranks, "named_parameters")[0]) == checksum(weights)
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["ref_kl"] == b["ref_kl"] and a["loss"] == b["loss"]
