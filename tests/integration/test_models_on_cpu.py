"""The tiny offline model, the HF rollout engine and the learner's scoring inputs agree.

The key property: the log-probs a rollout worker reports for its samples equal the learner's
recomputation from the same prompt + completion, so PPO ratios start at exactly 1.
"""

import pytest
import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.models import inputs
from gmai_rl.models.inputs import build_policy_batch, completion_logits, encode_prompts
from gmai_rl.models.loading import ModelOptions
from gmai_rl.rollout.hf import HFEngine, split_completion
from gmai_rl.types import Prompt, SamplingParams, TrainSample

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.manual_seed(0)
    return HFEngine(ModelOptions(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(synthetic_dir):
    items = load_mcq_jsonl(synthetic_dir / "train.jsonl")[:3]
    text_only = Prompt("text", [{"role": "user", "content": "Which side? A. Left B. Right"}])
    return [build_prompt(item, "Think, then answer.") for item in items] + [text_only]


def test_tiny_model_shapes(engine):
    config = engine.model.config
    assert config.vision_config.patch_size == 14 and config.vision_config.spatial_merge_size == 2
    assert sum(p.numel() for p in engine.model.parameters()) < 2_000_000


def test_a_56px_image_is_four_visual_tokens(engine, prompts):
    enc = encode_prompts(engine.processor, prompts[:1])
    assert int((enc["input_ids"] == engine.model.config.image_token_id).sum()) == 4


def test_groups_have_n_completions_with_logprobs_and_the_version(engine, prompts):
    engine.policy_version = 7
    groups = engine.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=12, seed=1))
    assert [g.prompt.id for g in groups] == [p.id for p in prompts]
    for g in groups:
        assert g.policy_version == 7 and len(g.completions) == 3
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            assert not set(c.token_ids) & set(engine.suppressed)  # no vision tokens sampled
    engine.policy_version = 0


def test_seeded_generation_repeats(engine, prompts):
    sampling = SamplingParams(max_new_tokens=8, seed=3)
    first = engine.generate(prompts[:2], 2, sampling)
    second = engine.generate(prompts[:2], 2, sampling)
    assert [c.token_ids for g in first for c in g.completions] == [
        c.token_ids for g in second for c in g.completions
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_the_learners_recomputation(engine, prompts, temperature):
    groups = engine.generate(
        prompts, 4, SamplingParams(temperature=temperature, max_new_tokens=16, seed=0)
    )
    samples = [
        TrainSample(g.prompt, g.prompt_ids, c.token_ids, 0.0, c.logprobs)
        for g in groups
        for c in g.completions
    ]
    batch = build_policy_batch(engine.processor, samples, engine.pad_id)
    with torch.no_grad():
        logits = completion_logits(engine.model(**batch.model_inputs).logits, batch.logit_index)
        logits[..., engine.suppressed] = float("-inf")
        learner = token_logprobs(logits, batch.completion_ids, temperature)
    rollout = torch.zeros_like(learner)
    for i, s in enumerate(samples):
        rollout[i, : len(s.rollout_logprobs)] = torch.tensor(s.rollout_logprobs)
    assert ((learner - rollout) * batch.completion_mask).abs().max() < 1e-4


def test_learner_rejects_a_prompt_encoded_differently(engine, prompts):
    sample = TrainSample(prompts[0], [1, 2, 3], [5, 6])
    with pytest.raises(ValueError, match="same processor settings"):
        build_policy_batch(engine.processor, [sample], engine.pad_id)


def test_micro_batches_sharing_encodings_collate_as_alone_and_encode_each_prompt_once(
    engine, prompts, monkeypatch
):
    """A rollout batch cut into micro-batches, collated with one `encoded` dict: every batch
    equals the one collated on its own, each prompt goes through the processor once, and a
    micro-batch of the text-only prompt gets no vision inputs from an image prompt before it."""
    samples = [TrainSample(p, [], [5 + i, 6, 7][: 1 + i % 3]) for i, p in enumerate(prompts * 2)]
    micros = [samples[0:3], samples[3:4], samples[4:8], samples[7:8]]  # [7:8] is text-only
    alone = [build_policy_batch(engine.processor, m, engine.pad_id) for m in micros]

    calls = []
    real = inputs.encode_prompt
    monkeypatch.setattr(
        inputs, "encode_prompt", lambda proc, p: calls.append(p.id) or real(proc, p)
    )
    encoded = {}
    shared = [build_policy_batch(engine.processor, m, engine.pad_id, encoded) for m in micros]

    assert sorted(calls) == sorted(p.id for p in prompts)
    for one, other in zip(alone, shared, strict=True):
        assert one.model_inputs.keys() == other.model_inputs.keys()
        for key, value in one.model_inputs.items():
            assert torch.equal(value, other.model_inputs[key]), key
        assert torch.equal(one.logit_index, other.logit_index)
    assert "pixel_values" not in shared[3].model_inputs


def test_a_shared_encoding_still_checks_every_sample_against_its_rollout_ids(engine, prompts):
    encoded = {}
    ids = encode_prompts(engine.processor, prompts[:1])["input_ids"][0].tolist()
    build_policy_batch(
        engine.processor, [TrainSample(prompts[0], ids, [5])], engine.pad_id, encoded
    )
    stale = TrainSample(prompts[0], ids[:-1], [5])
    with pytest.raises(ValueError, match="same processor settings"):
        build_policy_batch(engine.processor, [stale], engine.pad_id, encoded)


def test_loading_weights_changes_generation_inputs(engine):
    name, param = next(iter(engine.named_weights()))
    old, new = param.clone(), torch.full_like(param, 0.5)
    assert engine.load_weights([(name, new)]) == 1
    assert torch.equal(dict(engine.named_weights())[name], new)
    engine.load_weights([(name, old)])
    with pytest.raises(KeyError, match="not a parameter"):
        engine.load_weights([("no.such.weight", new)])


def test_split_completion_keeps_the_stop_token():
    assert split_completion([5, 6, 9, 7], [9]) == ([5, 6, 9], "stop")
    assert split_completion([5, 6], [9]) == ([5, 6], "length")
