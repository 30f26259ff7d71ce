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

`head_token_logprobs` goes one step further and starts from hidden states: it applies the LM head
itself, chunk by chunk, so that no [N, V] logits tensor exists at all, in forward or in backward
(each chunk's logits are recomputed in backward). This is what the learner uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

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


def head_token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / temperature)[token] per row, never holding more than one chunk
    of logits.

    Equal to `log_softmax(masked(hidden @ W.T + b) / temperature)[token]` with `head` a linear
    layer (W [V, H], b [V]) and `masked` setting the `suppressed` vocabulary entries to -inf.
    Rows are processed `chunk_size` at a time. With autograd recording, each chunk runs under
    non-reentrant activation checkpointing: between forward and backward autograd keeps only the
    chunk's inputs (`hidden` rows, already alive) and its [n] output, and backward recomputes the
    chunk's logits, one chunk at a time. So the vocabulary-sized memory is a few x chunk_size x V
    floats whatever N is, against N x V for the logits (and their gradient) of the naive form.

    `head` is called, not read: pass the model's LM head module itself, so that whatever manages
    its parameters sees each use, in forward and in the backward recomputation (DeepSpeed ZeRO-3
    gathers a partitioned weight in the module's hooks; see the learner).

    Args:
        hidden: `[N, H]` hidden states, the row that predicts each token; any float dtype.
        head: maps `[n, H]` -> `[n, V]` logits (deterministic: it is called again in backward).
        tokens: `[N]` integer token ids in [0, V).
        temperature: > 0; logits are divided by it before the softmax (the sampling temperature).
        suppressed: vocabulary ids outside the policy's support, set to -inf before the softmax
            (their log-probability is -inf; they get no gradient).
        chunk_size: rows per chunk; bounds the vocabulary-sized memory.
        with_entropy: also return the entropy of each row's distribution (no gradient).

    Returns:
        `([N] log-probs, [N] entropies in nats or None)`, float32 (float64 for float64 logits).
        The log-probs are differentiable with respect to `hidden` and `head`'s parameters.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if tokens.shape != hidden.shape[:1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must be [N] = ({hidden.shape[0]},)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = torch.tensor(sorted(set(suppressed)), dtype=torch.long, device=hidden.device)
    tokens = tokens.long()
    entropy = (
        torch.empty(hidden.shape[0], dtype=_acc_dtype(hidden), device=hidden.device)
        if with_entropy
        else None
    )
    record = torch.is_grad_enabled()
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        # A one-shot sink: the chunk writes its entropy on the first call only, not again when
        # backward re-runs it to recompute the logits.
        sink = [entropy[rows]] if entropy is not None else []
        args = (head, hidden[rows], tokens[rows], temperature, ids, sink)
        if record:
            pieces.append(checkpoint(_head_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_head_chunk(*args))
    logprobs = torch.cat(pieces) if pieces else hidden.new_empty(0, dtype=_acc_dtype(hidden))
    return logprobs, entropy


def _head_chunk(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    suppressed: torch.Tensor,
    entropy_sink: list[torch.Tensor],
) -> torch.Tensor:
    """[n] log-probs of one chunk of rows; writes their entropies into the sink's tensor, if any."""
    logits = head(hidden)  # [n, V]
    if suppressed.numel():
        # In place: the head's backward does not need its output, and this saves a [n, V] copy.
        logits.index_fill_(-1, suppressed, float("-inf"))
    if entropy_sink:
        with torch.no_grad():
            entropy_sink.pop().copy_(
                entropy_from_logits(logits.detach()[None], temperature, len(tokens))[0]
            )
    # token_logprobs keeps only its input (these logits) for backward; under the caller's
    # checkpoint that is dropped too, and recomputed with the chunk in backward.
    return token_logprobs(logits[None], tokens[None], temperature, chunk_size=len(tokens))[0]


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
