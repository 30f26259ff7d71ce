"""A learner rank on one CUDA device, as a GPU node runs it (bf16, ZeRO-2, NCCL), without Ray.

1. One RL step in bf16 trains: finite loss and gradient norm, parameters move, and the learner's
   log-probs of its own batch (completion-only chunked LM head, `Learner.score`) agree with a
   plain fp32 HF forward of the same weights to bf16 accuracy.
2. The HF rollout engine on the same device samples from the learner's policy: its log-probs of
   the tokens it sampled equal the learner's for the same completions.
"""

import pytest
import torch

from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.learner.batching import plan_rank_batches
from gmai_rl.learner.options import LearnerOptions, LossOptions
from gmai_rl.learner.worker import Learner
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import Dtype, ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.rollout.hf import HFEngine
from gmai_rl.sync.group import find_free_port
from gmai_rl.types import SamplingParams, TrainSample

# Skip before the module's fixtures would start a CUDA learner (conftest's autouse skip runs
# after module-scoped fixtures).
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BF16_ATOL = 0.1  # log-probs of a bf16 forward against fp32: a few ulps of bf16 at |logp| ~ 5


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    rank = Learner(
        ModelOptions(tiny_model_dir, dtype=Dtype.bfloat16),
        LearnerOptions(zero_stage=2, bf16=True, micro_batch_size=4, num_minibatches=1),
        LossOptions(kl_coef=0.0),
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=find_free_port(),
        use_gpu=True,
    )
    assert rank.device.type == "cuda"
    return rank


@pytest.fixture(scope="module")
def groups(tiny_model_dir, synthetic_dir):
    engine = HFEngine(ModelOptions(tiny_model_dir), device="cuda")
    items = load_mcq_jsonl(synthetic_dir / "eval.jsonl")[:4]
    return engine, engine.generate(
        [build_prompt(i) for i in items], 4, SamplingParams(1.0, 1.0, 16, seed=0)
    )


def samples_of(groups, advantages=None):
    out = []
    for g in groups:
        for k, c in enumerate(g.completions):
            adv = 0.0 if advantages is None else advantages[k % len(advantages)]
            out.append(TrainSample(g.prompt, g.prompt_ids, c.token_ids, adv, c.logprobs))
    return out


def hf_logprobs(model_dir, samples, dtype=torch.float32):
    """The reference: a full HF forward, all logits, on the GPU in `dtype`."""
    processor = load_processor(ModelOptions(model_dir))
    model = load_model(ModelOptions(model_dir)).to("cuda", dtype).eval()
    batch = build_policy_batch(processor, samples, tokenizer_of(processor).pad_token_id)
    inputs = {k: v.cuda() for k, v in batch.model_inputs.items()}
    with torch.no_grad():
        logits = completion_logits(model(**inputs).logits.float(), batch.logit_index.cuda())
    logits[..., vision_token_ids(tokenizer_of(processor))] = float("-inf")
    logp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.cuda()[..., None])[..., 0]
    return [logp[i, : len(s.completion_ids)].cpu() for i, s in enumerate(samples)]


def test_the_learner_scores_like_hf_and_a_bf16_step_trains(learner, groups, tiny_model_dir):
    _, generated = groups
    samples = samples_of(generated)
    expected = hf_logprobs(tiny_model_dir, samples)
    got = learner.score(samples)
    for row, ref in zip(got, expected, strict=True):
        assert (torch.tensor(row) - ref).abs().max() < BF16_ATOL

    before = dict(learner.named_parameters())
    train = samples_of(generated, advantages=[1.0, -1.0, 0.5, -0.5])
    (plan,) = plan_rank_batches(train, world_size=1, num_minibatches=1)
    metrics = learner.train_rl(plan)
    assert torch.isfinite(torch.tensor([metrics["loss"], metrics["grad_norm"]])).all()
    after = dict(learner.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) > len(before) // 2


def test_the_rollout_engine_samples_from_the_learners_policy(groups, tiny_model_dir):
    engine, generated = groups
    samples = samples_of(generated)
    expected = hf_logprobs(tiny_model_dir, samples)
    for sample, ref in zip(samples, expected, strict=True):
        got = torch.tensor(sample.rollout_logprobs)
        assert (got - ref).abs().max() < 5e-3  # fp32 both; cached vs full forward, TF32 convs
    assert engine.device.type == "cuda"
