"""What a rollout engine takes, in bytes: the records and arithmetic of an engine's pre-flight plan.

Each engine's spec (`rollout.engines`) turns an `EngineInputs` (`rollout.spec`) into an
`EnginePlan` with these helpers; the pre-flight plan (`gmai_rl.plan`) adds the learners and the
placement around it. Pure: nothing here imports torch or a model.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
MIB = 2**20

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype by its config name (float32, bfloat16, float16)."""
    if str(name) not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[str(name)]


def kv_bytes_per_token(
    layers: int, kv_heads: int, head_dim: int, nbytes: int, tensor_parallel: int = 1
) -> int:
    """KV-cache bytes one token takes on each GPU of an engine: K and V of every layer.
    Tensor parallelism splits the KV heads (each GPU keeps at least one)."""
    return 2 * layers * max(kv_heads // tensor_parallel, 1) * head_dim * nbytes


def kv_budget(gpu_bytes: float, utilization: float, weights: float, overhead: float) -> float:
    """vLLM's KV cache on one GPU: its share of the GPU less its weights and own overhead."""
    return utilization * gpu_bytes - weights - overhead


def bytes_text(n: float) -> str:
    if n == 0:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True)
class ModelShape:
    """The model's sizes an engine's memory depends on (the plan reads them from its config)."""

    params: int
    """Parameters, tied ones once."""
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class EnginePlan:
    """One rollout engine in the pre-flight plan: its memory, per GPU of the engine or in host
    memory on CPU, and what the plan prints and checks about it."""

    weights: float
    """Its weights on each GPU (weights / tensor_parallel_size); on CPU all of them."""
    kv_per_token: int
    """KV-cache bytes one token takes on each GPU."""
    kv_cache: float | None
    """vLLM: the KV cache on each GPU (None: GPU memory unknown). HF: the cache of the largest
    generate call (rollout.max_batch_prompts x n sequences) at the longest sequence."""
    scores: float
    """HF: the processed scores `generate` keeps for the log-probs, [sequences, new tokens,
    vocab] in fp32; 0 for vLLM."""
    reserved: float
    """All it takes on each GPU (vLLM: gpu_memory_utilization x the GPU), or on CPU."""
    asleep_on_host: float
    """Host memory its weights move to while it sleeps (vLLM sleep level 1 on GPU)."""
    kv_tokens: int | None = None
    """Tokens a KV cache allocated up front holds (vLLM); None: the engine has no such pool
    (HF grows its cache per call) or its size is unknown."""
    lines: tuple[str, ...] = ()
    """The plan's "rollout" rows: what the engine holds and how it was worked out."""
    problems: tuple[str, ...] = ()
    """Why the engine cannot fit its GPU, each with its numbers and the keys to change."""
    notes: tuple[str, ...] = ()
    """What the estimate assumed or left out."""
