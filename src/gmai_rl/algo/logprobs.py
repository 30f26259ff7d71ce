"""Token log-probabilities and entropies from logits, without materialising [B, L, V] copies.

Vision-language models in this project have vocabularies of ~150k tokens (Qwen2.5-VL: 151,936),
so one fp32 copy of the logits of 8k response tokens is ~5 GB. The obvious
`logits.float().log_softmax(-1).gather(...)` builds two such copies and autograd keeps one alive
until backward. Here the vocabulary-sized work runs on chunks of `chunk_size` rows at a time
(peak extra memory ~ a few x chunk_size x V x 4 bytes), and `token_logprobs` has its own backward
that keeps only the logits (already alive) and one float per token, recomputing the softmax in
chunks.

Alignment is the caller's: `logits[b, t]` must be the distribution that `tokens[b, t]` was
sampled from, i.e. for a causal LM pass `logits[:, :-1]` and `input_ids[:, 1:]` (then slice the
response part).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_SIZE = 512


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for every position.

    The temperature must be the rollout's sampling temperature: the tokens were drawn from
    softmax(logits / T), so the ratio pi / pi_old in the loss and the KL are only right when the
    learner scores them under the same T. (Top-p / top-k truncation is not modelled: the learner
    scores the full, untruncated distribution, as OpenRLHF and veRL do.)

    Args:
        logits: `[B, L, V]` unnormalised scores, any float dtype; may be a non-contiguous view
            such as `model_logits[:, :-1]`.
        tokens: `[B, L]` integer token ids in [0, V).
        temperature: > 0; logits are divided by it before the softmax.
        chunk_size: positions processed at once; bounds the extra memory (module docstring).

    Returns:
        `[B, L]` log-probabilities, float32 for bf16/fp16/fp32 logits (float64 for float64).
        Differentiable with respect to `logits` (a chunked, memory-light backward).
    """
    _check_logits(logits, temperature, chunk_size)
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must be logits.shape[:2] = {tuple(logits.shape[:2])}"
        )
    out: torch.Tensor = _TokenLogprobs.apply(logits, tokens.long(), temperature, chunk_size)
    return out


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    H = -sum_v p_v log p_v with log p = z - logsumexp(z), computed chunk by chunk. Meant for
    logging under `torch.no_grad()`; it is differentiable, but then autograd keeps every chunk's
    intermediates, so an entropy bonus would not get the memory bound.

    Args:
        logits: `[B, L, V]` unnormalised scores, any float dtype (entries may be -inf).
        temperature: > 0, the sampling temperature, as in `token_logprobs`.
        chunk_size: positions processed at once.

    Returns:
        `[B, L]` entropies in nats, float32 for bf16/fp16/fp32 logits (float64 for float64).
    """
    _check_logits(logits, temperature, chunk_size)
    B, L, _ = logits.shape
    entropy = logits.new_empty((B, L), dtype=_acc_dtype(logits))  # [B, L]
    for b, rows in _chunks(B, L, chunk_size):
        logp = torch.log_softmax(_scaled(logits[b, rows], temperature), dim=-1)  # [C, V]
        plogp = torch.where(torch.isneginf(logp), 0.0, logp.exp() * logp)  # [C, V] 0 log 0 = 0
        entropy[b, rows] = -plogp.sum(dim=-1)  # [C]
    return entropy


class _TokenLogprobs(torch.autograd.Function):
    """out = z[token] - logsumexp(z), z = logits / T; d out / d logits = (onehot - softmax(z)) / T."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_size: int
    ) -> torch.Tensor:
        B, L, _ = logits.shape
        out = logits.new_empty((B, L), dtype=_acc_dtype(logits))  # [B, L]
        lse = torch.empty_like(out)  # [B, L]
        for b, rows in _chunks(B, L, chunk_size):
            z = _scaled(logits[b, rows], temperature)  # [C, V]
            lse[b, rows] = torch.logsumexp(z, dim=-1)  # [C]
            out[b, rows] = z.gather(-1, tokens[b, rows, None]).squeeze(-1) - lse[b, rows]  # [C]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, tokens, lse = ctx.saved_tensors
        B, L, _ = logits.shape
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # [B, L, V]
        for b, rows in _chunks(B, L, ctx.chunk_size):
            z = _scaled(logits[b, rows], ctx.temperature)  # [C, V]
            g = grad_out[b, rows, None].to(z.dtype)  # [C, 1]
            grad_z = -g * (z - lse[b, rows, None]).exp()  # [C, V]  -g * softmax(z)
            grad_z.scatter_add_(-1, tokens[b, rows, None], g)  # [C, V]  + g * onehot(token)
            grad[b, rows] = grad_z / ctx.temperature  # [C, V]
        return grad, None, None, None


def _chunks(B: int, L: int, chunk_size: int) -> Iterator[tuple[int, slice]]:
    """(row, slice of positions) blocks covering [B, L]; indexing by them never copies logits,
    even when `logits` is a strided view such as `model_logits[:, :-1]`."""
    for b in range(B):
        for start in range(0, L, chunk_size):
            yield b, slice(start, min(start + chunk_size, L))


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.to(_acc_dtype(logits))
    return z if temperature == 1.0 else z / temperature


def _check_logits(logits: torch.Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
