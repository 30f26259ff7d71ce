"""token_logprobs and entropy_from_logits: hand values, a per-position loop reference, the custom
backward against autograd and finite differences, temperature, chunking and strided views.
linear_token_logprobs (from hidden states): values and gradients against the naive full-logits form
and finite differences, and what it keeps and allocates."""

import math

import pytest
import torch

from gmai_rl.algo import entropy_from_logits, linear_token_logprobs, token_logprobs
from support import autograd_memory

F64 = torch.float64


def assert_close(actual, expected, atol=1e-10, rtol=1e-8):
    # torch.allclose, not torch.testing.assert_close: the latter imports torch.distributed (~2 s).
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected.to(actual.dtype), atol=atol, rtol=rtol), (
        actual,
        expected,
    )


def loop_logprobs(logits, tokens, temperature):
    out = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        row = []
        for scores, token in zip(row_logits, row_tokens, strict=True):
            z = [s / temperature for s in scores]
            m = max(z)
            row.append(z[token] - (m + math.log(sum(math.exp(v - m) for v in z))))
        out.append(row)
    return out


def loop_entropy(logits, temperature):
    out = []
    for row_logits in logits:
        row = []
        for scores in row_logits:
            e = [math.exp(s / temperature) for s in scores]
            p = [v / sum(e) for v in e]
            row.append(-sum(q * math.log(q) for q in p if q > 0))
        out.append(row)
    return out


def test_by_hand():
    # logits (0, ln 3): p = (1/4, 3/4). log p_1 = ln 0.75 = -0.287682, log p_0 = ln 0.25 = -1.386294
    # at T = 2: z = (0, ln 3 / 2), p_1 = sqrt 3 / (1 + sqrt 3) = 0.633975, ln = -0.455746
    # entropy at T = 1: 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]], dtype=F64)
    tokens = torch.tensor([[1, 0]])
    assert token_logprobs(logits, tokens).tolist()[0] == pytest.approx(
        [-0.287682, -1.386294], abs=1e-6
    )
    assert token_logprobs(logits, tokens, temperature=2.0)[0, 0].item() == pytest.approx(
        -0.455746, abs=1e-6
    )
    assert entropy_from_logits(logits)[0, 0].item() == pytest.approx(0.562335, abs=1e-6)
    assert entropy_from_logits(torch.zeros(1, 1, 8))[0, 0].item() == pytest.approx(math.log(8))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, 1), (0.7, 3), (1.3, 512)])
def test_matches_loop_reference(seed, temperature, chunk_size):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 11, generator=g, dtype=F64) * 3
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    assert_close(
        token_logprobs(logits, tokens, temperature, chunk_size),
        torch.tensor(loop_logprobs(logits.tolist(), tokens.tolist(), temperature), dtype=F64),
    )
    assert_close(
        entropy_from_logits(logits, temperature, chunk_size),
        torch.tensor(loop_entropy(logits.tolist(), temperature), dtype=F64),
    )


def test_backward_matches_finite_differences():
    # Central differences by hand (torch.autograd.gradcheck works too but imports ~2 s of torch).
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g, dtype=F64)

    def f(x):
        return (token_logprobs(x, tokens, 0.8, chunk_size=2) * weights).sum()

    x = logits.clone().requires_grad_(True)
    f(x).backward()
    numeric = torch.zeros_like(logits)
    h = 1e-6
    for index in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)).tolist():
        step = torch.zeros_like(logits)
        step[tuple(index)] = h
        numeric[tuple(index)] = (f(logits + step) - f(logits - step)) / (2 * h)
    assert_close(x.grad, numeric, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_backward_matches_autograd_of_log_softmax_on_a_strided_view(temperature):
    # The learner passes model_logits[:, :-1] (non-contiguous); the gradient must land in place.
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 6, 9, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 9, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g, dtype=F64)

    (token_logprobs(full[:, :-1], tokens, temperature, chunk_size=2) * weights).sum().backward()
    ours = full.grad.clone()
    full.grad = None
    reference = torch.log_softmax(full[:, :-1] / temperature, dim=-1).gather(-1, tokens[..., None])
    (reference.squeeze(-1) * weights).sum().backward()
    assert_close(ours, full.grad)
    assert (ours[:, -1] == 0).all()


def test_bf16_logits_give_float32_logprobs_and_bf16_gradients():
    g = torch.Generator().manual_seed(2)
    logits32 = torch.randn(2, 3, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    logits16 = logits32.bfloat16().requires_grad_(True)
    out = token_logprobs(logits16, tokens)
    assert out.dtype == torch.float32
    assert_close(out, token_logprobs(logits16.detach().float(), tokens), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert logits16.grad.dtype == torch.bfloat16 and logits16.grad.shape == logits16.shape
    assert entropy_from_logits(logits16.detach()).dtype == torch.float32


def test_masked_vocabulary_entries_do_not_produce_nan():
    logits = torch.tensor([[[0.0, 0.0, -float("inf")]]])
    assert entropy_from_logits(logits)[0, 0].item() == pytest.approx(math.log(2))
    assert token_logprobs(logits, torch.tensor([[0]]))[0, 0].item() == pytest.approx(-math.log(2))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(torch.zeros(2, 3, 4), chunk_size=0)


# -------------------------------------------------------------------- linear_token_logprobs


def naive_linear_logprobs(hidden, weight, bias, tokens, temperature, suppressed):
    """log_softmax(masked(hidden @ W.T + b) / T)[token], all [N, V] logits at once (upcast)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.double() if logits.dtype == F64 else logits.float()
    if suppressed:
        logits = logits.index_fill(-1, torch.tensor(suppressed), float("-inf"))
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def linear_head(hidden_size, vocab, seed, dtype=F64, bias=True):
    """(weight [V, H], bias [V] or None) of a random head, peaked distributions, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 2).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_(True) if bias else None
    return weight, b


def grads(*tensors):
    out = [t.grad.clone() if t is not None else None for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, 1), (0.7, 4), (1.3, 100)])
def test_linear_logprobs_and_gradients_match_the_naive_form(temperature, chunk_size, bias):
    g = torch.Generator().manual_seed(3)
    N, H, V, suppressed = 10, 6, 17, [2, 11]
    weight, b = linear_head(H, V, seed=0, bias=bias)
    hidden = torch.randn(N, H, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[torch.isin(tokens, torch.tensor(suppressed))] = 0  # the rollout never samples them
    weights = torch.randn(N, generator=g, dtype=F64)  # a loss with a different weight per token

    logprobs, entropy = linear_token_logprobs(
        hidden, weight, b, tokens, temperature, suppressed, chunk_size, with_entropy=True
    )
    (logprobs * weights).sum().backward()
    ours = grads(hidden, weight, b)
    expected = naive_linear_logprobs(hidden, weight, b, tokens, temperature, suppressed)
    (expected * weights).sum().backward()
    assert_close(logprobs, expected.detach())
    for got, want in zip(ours, grads(hidden, weight, b), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close(got, want)
    assert (ours[1][suppressed] == 0).all()  # masked entries are outside the support

    masked = torch.nn.functional.linear(hidden, weight, b).detach()
    masked = masked.index_fill(-1, torch.tensor(suppressed), float("-inf"))
    assert_close(entropy, entropy_from_logits(masked[None], temperature)[0])
    assert not entropy.requires_grad


def test_linear_logprobs_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(6)
    weight, b = linear_head(3, 7, seed=1)
    hidden = torch.randn(5, 3, generator=g, dtype=F64)
    tokens = torch.randint(1, 7, (5,), generator=g)
    weights = torch.randn(5, generator=g, dtype=F64)

    def f(w):
        return (linear_token_logprobs(hidden, w, b, tokens, 0.8, [0], 2)[0] * weights).sum()

    w = weight.detach().clone().requires_grad_(True)
    f(w).backward()
    numeric = torch.zeros_like(w)
    h = 1e-6
    for i, j in torch.cartesian_prod(torch.arange(7), torch.arange(3)).tolist():
        step = torch.zeros_like(w)
        step[i, j] = h
        numeric[i, j] = (f(w.detach() + step) - f(w.detach() - step)) / (2 * h)
    assert_close(w.grad, numeric, atol=1e-8, rtol=1e-6)


def test_linear_logprobs_without_a_graph_equal_those_with_one():
    g = torch.Generator().manual_seed(4)
    weight, b = linear_head(5, 23, seed=1, dtype=torch.float32)
    hidden = torch.randn(9, 5, generator=g)
    tokens = torch.randint(0, 23, (9,), generator=g)
    with torch.no_grad():
        frozen, frozen_entropy = linear_token_logprobs(hidden, weight, b, tokens, 0.9, [3], 4, True)
    recorded, entropy = linear_token_logprobs(hidden, weight, b, tokens, 0.9, [3], 4, True)
    assert frozen.grad_fn is None and recorded.grad_fn is not None
    assert torch.equal(frozen, recorded.detach()) and torch.equal(frozen_entropy, entropy)
    assert linear_token_logprobs(hidden, weight, b, tokens)[1] is None


def test_linear_logprobs_of_a_bf16_head_are_float32_with_bf16_gradients():
    g = torch.Generator().manual_seed(5)
    weight, _ = linear_head(4, 13, seed=2, dtype=torch.bfloat16, bias=False)
    hidden = torch.randn(6, 4, generator=g).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, 13, (6,), generator=g)
    logprobs, _ = linear_token_logprobs(hidden, weight, None, tokens, chunk_size=4)
    assert logprobs.dtype == torch.float32
    expected = naive_linear_logprobs(hidden, weight, None, tokens, 1.0, [])  # bf16 logits, upcast
    assert_close(logprobs, expected, atol=1e-6, rtol=1e-6)
    logprobs.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    # Against fp32 arithmetic on the same bf16 values (two chunks: the fp32 sum over chunks).
    hidden32 = hidden.detach().float().requires_grad_(True)
    weight32 = weight.detach().float().requires_grad_(True)
    naive_linear_logprobs(hidden32, weight32, None, tokens, 1.0, []).sum().backward()
    assert_close(hidden.grad.float(), hidden32.grad, atol=2e-2, rtol=1e-2)
    assert_close(weight.grad.float(), weight32.grad, atol=2e-2, rtol=1e-2)


def test_linear_logprobs_keep_no_vocabulary_sized_tensor_and_allocate_one_chunk_at_a_time():
    """Counted by shape (`support.autograd_memory`): the naive form keeps its [N, V] log-softmax
    for backward and allocates [N, V] tensors, so its numbers grow with N; here nothing with a
    vocabulary dimension is kept (besides the weight itself) and the largest tensor is one fp32
    chunk of logits, [32, V], whatever N. V is 50,000, unlike any other size here, and chunk > H
    (the weight's [V, H] gradient is smaller than a chunk)."""
    V, H, chunk = 50_000, 8, 32
    weight, b = linear_head(H, V, seed=0, dtype=torch.float32)
    results = {}
    for N in (128, 256):
        hidden = torch.randn(N, H, requires_grad=True)
        tokens = torch.randint(3, V, (N,))

        def ours(hidden=hidden, tokens=tokens):
            linear_token_logprobs(hidden, weight, b, tokens, 0.7, [1, 2], chunk)[0].sum().backward()

        def naive(hidden=hidden, tokens=tokens):
            naive_linear_logprobs(hidden, weight, b, tokens, 0.7, [1, 2]).sum().backward()

        exclude = [hidden, weight, b]
        results[N] = (autograd_memory(ours, exclude), autograd_memory(naive, exclude))

    for N, (ours, naive) in results.items():
        assert naive.saved_with_dim(V) >= N * V * 4 and naive.largest >= N * V * 4  # it sees them
        assert ours.saved_with_dim(V) == 0
        assert ours.largest == chunk * V * 4 and ours.largest_shape == (chunk, V)
    assert results[128][0].largest == results[256][0].largest


def test_linear_logprobs_reject_bad_arguments():
    weight, tokens = torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        linear_token_logprobs(torch.zeros(2, 4, 3), weight, None, tokens)
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        linear_token_logprobs(torch.zeros(4, 2), weight, None, tokens)
    with pytest.raises(ValueError, match="tokens"):
        linear_token_logprobs(torch.zeros(4, 3), weight, None, tokens[:3])
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(torch.zeros(4, 3), weight, None, tokens, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(torch.zeros(4, 3), weight, None, tokens, 1.0, (), 0)
