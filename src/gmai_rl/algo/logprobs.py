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

`linear_token_logprobs` goes one step further and starts from hidden states: it applies the LM
head itself, chunk by chunk, so that no [N, V] logits tensor exists at all, in forward or in
backward (each chunk's logits are recomputed in backward). This is what the learner uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(masked(hidden @ weight.T + bias) / temperature)[token] per row, one chunk of
    logits at a time, in forward and in backward.

    The LM head fused with the log-softmax and the token pick, as Liger-Kernel's fused linear
    cross-entropy does for a scalar loss; here the output is per token (a PPO loss needs each
    token's log-prob), so the gradient cannot be formed in forward. Backward recomputes each
    chunk's logits from the saved hidden rows and one float per row (the log-sum-exp), so autograd
    keeps [N, H] + [N] between forward and backward instead of [N, V], and the largest tensor
    either pass makes is one chunk of fp32 logits, [chunk_size, V], whatever N is (besides the
    weight's own [V, H] gradient, which any head's backward makes).

    Under DeepSpeed ZeRO-3 the weight is a partitioned parameter: call this as the LM head
    module's forward (`models.scoring`), so that the module's hooks gather it for the forward and
    again for the backward.

    Args:
        hidden: `[N, H]` the hidden state that predicts each token; the weight's dtype.
        weight: `[V, H]` the LM head's weight.
        bias: `[V]` or None.
        tokens: `[N]` integer token ids in [0, V), none of them in `suppressed`.
        temperature: > 0; logits are divided by it before the softmax (the sampling temperature).
        suppressed: vocabulary ids outside the policy's support: -inf before the softmax, so they
            take no probability mass and get no gradient.
        chunk_size: rows per chunk; bounds the vocabulary-sized memory.
        with_entropy: also return each row's entropy (no gradient).

    Returns:
        `([N] log-probs, [N] entropies in nats or None)`, float32 (float64 for float64 inputs).
        The log-probs are differentiable with respect to `hidden`, `weight` and `bias`; the
        weight's and bias's gradients are summed over chunks in that precision, then cast to
        their dtype (for a bf16 head, backward holds the fp32 sum and one chunk's bf16 product:
        6 x V x H bytes).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if tokens.shape != hidden.shape[:1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must be [N] = ({hidden.shape[0]},)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = torch.tensor(sorted(set(suppressed)), dtype=torch.long, device=hidden.device)
    logprobs, entropy = _LinearTokenLogprobs.apply(
        hidden, weight, bias, tokens.long(), temperature, ids, chunk_size, with_entropy
    )
    return logprobs, entropy if with_entropy else None


class _LinearTokenLogprobs(torch.autograd.Function):
    """out = z[token] - logsumexp(z), z = masked(h W^T + b) / T. With g = d loss / d out:
    d loss / d z = g (onehot(token) - softmax(z)), then / T through the scaling, then the linear
    layer's usual products: d h = dz W, d W = dz^T h, d b = sum dz (masked columns: softmax 0)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tokens: torch.Tensor,
        temperature: float,
        suppressed: torch.Tensor,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        N = hidden.shape[0]
        logprobs = hidden.new_empty(N, dtype=_acc_dtype(hidden))  # [N]
        lse = torch.empty_like(logprobs)  # [N]
        entropy = torch.empty_like(logprobs) if with_entropy else logprobs.new_empty(0)  # [N]
        for rows in _row_chunks(N, chunk_size):
            z = _head_scores(hidden[rows], weight, bias, temperature, suppressed)  # [n, V]
            lse[rows] = torch.logsumexp(z, dim=-1)  # [n]
            logprobs[rows] = z.gather(-1, tokens[rows, None]).squeeze(-1) - lse[rows]  # [n]
            if with_entropy:
                # H = -sum p (z - lse) = lse - sum p z; masked entries have p = 0: count 0, not
                # 0 x -inf.
                p = (z - lse[rows, None]).exp_()  # [n, V]
                z.nan_to_num_(neginf=0.0)
                entropy[rows] = lse[rows] - torch.linalg.vecdot(p, z)  # [n]
        ctx.save_for_backward(hidden, weight, bias, tokens, suppressed, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, tokens, suppressed, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        grad_weight = weight.new_zeros(weight.shape, dtype=acc) if need_weight else None  # [V, H]
        grad_bias = weight.new_zeros(weight.shape[0], dtype=acc) if need_bias else None  # [V]
        for rows in _row_chunks(hidden.shape[0], ctx.chunk_size):
            z = _head_scores(hidden[rows], weight, bias, ctx.temperature, suppressed)  # [n, V]
            g = grad_logprobs[rows, None].to(acc)  # [n, 1]
            grad_z = z.sub_(lse[rows, None]).exp_().mul_(-g)  # [n, V]  -g softmax(z), in place
            grad_z.scatter_add_(-1, tokens[rows, None], g)  # [n, V]  + g onehot(token)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)  # [n, V]  d loss / d logits
            gz = grad_z.to(weight.dtype)  # [n, V] in the head's dtype, for its two products
            if grad_hidden is not None:
                grad_hidden[rows] = gz @ weight  # [n, H]
            if grad_weight is not None and weight.dtype == acc:
                grad_weight.addmm_(gz.T, hidden[rows])  # [V, H]
            elif grad_weight is not None:
                # Each chunk's product in the head's dtype (tensor cores, rounded once, as the
                # plain head's one product is), their sum in fp32 (no rounding per chunk).
                grad_weight += gz.T @ hidden[rows]  # [V, H]
            if grad_bias is not None:
                grad_bias += grad_z.sum(dim=0)  # [V]
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            *([None] * 5),
        )


def _head_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    suppressed: torch.Tensor,
) -> torch.Tensor:
    """[n, V] fp32 (fp64) logits of a chunk, masked and scaled: a fresh tensor, safe to modify."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [n, V], the head's dtype
    z = logits.to(_acc_dtype(logits))  # a copy for bf16/fp16; the fresh product itself for fp32
    if suppressed.numel():
        z.index_fill_(-1, suppressed, float("-inf"))
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _row_chunks(N: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, N, chunk_size):
        yield slice(start, min(start + chunk_size, N))


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
