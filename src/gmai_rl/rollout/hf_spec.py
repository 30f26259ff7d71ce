"""The HF transformers engine's spec (the engine: rollout/hf.py).

One `generate` per call on one device, the model in the rollout worker's process: no options, no
window, no sleep mode, weights loaded by the worker itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmai_rl.rollout.options import Backend
from gmai_rl.rollout.sizing import EnginePlan, bytes_text, dtype_bytes, kv_bytes_per_token
from gmai_rl.rollout.spec import EngineInputs, EngineSpec, RolloutRun

if TYPE_CHECKING:
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.rollout.base import RolloutEngine


def make(model: ModelOptions, device: str, seed: int) -> RolloutEngine:
    """The engine on `device`. No seed to pass: it samples from torch's generator, which the
    rollout worker seeded."""
    from gmai_rl.rollout.hf import HFEngine

    return HFEngine(model, device=device)


def validate(run: RolloutRun) -> list[str]:
    gpus = run.cluster.gpus_per_rollout_worker
    # A fractional or negative count is the config's own error ("must be a whole number").
    if gpus == int(gpus) and gpus > 1:
        return [
            f"cluster.gpus_per_rollout_worker={gpus:g}: the HF engine runs on one GPU; use "
            "rollout=vllm for tensor parallelism, or more rollout workers"
        ]
    return []


def plan(inputs: EngineInputs) -> EnginePlan:
    """Weights, plus the KV cache and the processed scores of the largest generate call
    (rollout.max_batch_prompts x n sequences at the longest sequence), all in the model dtype
    except the fp32 scores."""
    r, m = inputs.run.rollout, inputs.model
    dtype = inputs.run.model.dtype
    nbytes = dtype_bytes(dtype)
    weights = float(nbytes * m.params)
    per_token = kv_bytes_per_token(m.layers, m.kv_heads, m.head_dim, nbytes)
    sequences = r.max_batch_prompts * r.samples_per_prompt
    kv = float(sequences * inputs.longest * per_token)
    scores = float(sequences * r.max_new_tokens * m.vocab * 4)
    reserved = weights + kv + scores
    per = "per GPU" if inputs.on_gpu else "per worker (CPU)"
    lines = (
        f"rollout    HF generate, {dtype}: weights {bytes_text(weights)} {per}; "
        f"{sequences} sequences per call (rollout.max_batch_prompts x n)",
        f"           KV cache {bytes_text(kv)} at the longest sequence "
        f"({inputs.longest} tokens, {bytes_text(per_token)} per token) + the "
        f"scores kept for log-probs {bytes_text(scores)} = {bytes_text(reserved)}",
    )
    g = inputs.gpu_memory
    problems: tuple[str, ...] = ()
    if inputs.on_gpu and g is not None and reserved > g:
        problems = (
            f"the HF engine takes {bytes_text(reserved)} of its GPU (weights "
            f"{bytes_text(weights)}, KV cache {bytes_text(kv)}, scores "
            f"{bytes_text(scores)}), more than {bytes_text(g)}: use rollout=vllm, or lower "
            "rollout.max_batch_prompts or rollout.max_new_tokens",
        )
    return EnginePlan(weights, per_token, kv, scores, reserved, 0.0, lines=lines, problems=problems)


HF = EngineSpec(name=Backend.hf, label="HF", make=make, plan=plan, validate=validate)
