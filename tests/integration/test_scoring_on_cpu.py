"""The learner's completion scoring (`models.scoring`) equals the full-forward reference, in values
and gradients, and its vocabulary-sized memory depends on the chunk, not on the prompt."""

import dataclasses

import pytest
import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.data import load_mcq_jsonl
from gmai_rl.feed import sft_samples
from gmai_rl.models.inputs import PolicyBatch, build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.scoring import completion_scores, packed_for
from gmai_rl.models.tokens import vision_token_ids
from support import autograd_memory

pytestmark = pytest.mark.integration


def reference_logprobs(model, batch, temperature, suppressed):
    """[B, C]: logits at every position, the completion rows selected, masked, log-softmaxed."""
    logits = completion_logits(
        model(**batch.model_inputs, use_cache=False).logits, batch.logit_index
    )  # [B, C, V]
    if suppressed:
        logits[..., suppressed] = float("-inf")
    logprobs = token_logprobs(logits, batch.completion_ids, temperature)
    # Not `* mask`: a padded cell's token 0 may be suppressed, and -inf * 0 is nan.
    return torch.where(batch.completion_mask.bool(), logprobs, 0.0)


def grads_of(model, logprobs, weights):
    model.zero_grad()
    (logprobs * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_scores_and_gradients(model, batch, temperature, suppressed, chunk_size):
    weights = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(0))
    ours, entropy = completion_scores(
        model, batch, temperature, suppressed, chunk_size, with_entropy=True
    )
    our_grads = grads_of(model, ours, weights)
    expected = reference_logprobs(model, batch, temperature, suppressed)
    expected_grads = grads_of(model, expected, weights)

    mask = batch.completion_mask.bool()
    assert torch.allclose(ours, expected, atol=1e-5) and (ours[~mask] == 0).all()
    assert (entropy[mask] > 0).all() and (entropy[~mask] == 0).all()
    assert our_grads.keys() == expected_grads.keys()
    for name, grad in our_grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-6, rtol=1e-4), name


def test_vision_language_model_scores_and_gradients_match_the_full_forward(
    tiny_model_dir, synthetic_dir
):
    options = ModelOptions(tiny_model_dir)
    processor, model = load_processor(options), load_model(options)
    tokenizer = tokenizer_of(processor)
    samples = sft_samples(load_mcq_jsonl(synthetic_dir / "sft.jsonl")[:4], tokenizer, None)
    for i, s in enumerate(samples):  # ragged completions: padded cells in the grid
        s.completion_ids = s.completion_ids[: 4 + 3 * i]
    batch = build_policy_batch(processor, samples, tokenizer.pad_token_id)
    assert "pixel_values" in batch.model_inputs and model.config.tie_word_embeddings
    assert_same_scores_and_gradients(model, batch, 0.7, vision_token_ids(tokenizer), chunk_size=5)


def text_model(vocab_size, tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def random_batch(vocab_size, prompt_lens, completion_lens, seed=0):
    """Right-padded prompt + completion rows, as `build_policy_batch` lays them out."""
    g = torch.Generator().manual_seed(seed)
    B, C = len(prompt_lens), max(completion_lens)
    L = max(p + c for p, c in zip(prompt_lens, completion_lens, strict=True))
    input_ids = torch.zeros(B, L, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    completion_ids = torch.zeros(B, C, dtype=torch.long)
    completion_mask = torch.zeros(B, C)
    logit_index = torch.zeros(B, C, dtype=torch.long)
    for b, (P, n) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        ids = torch.randint(10, vocab_size, (P + n,), generator=g)
        input_ids[b, : P + n], attention_mask[b, : P + n] = ids, 1
        completion_ids[b, :n], completion_mask[b, :n] = ids[P:], 1.0
        logit_index[b] = torch.arange(P - 1, P - 1 + C).clamp(max=L - 1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    return PolicyBatch(inputs, completion_ids, completion_mask, logit_index)


@pytest.mark.parametrize("tie", [True, False])
def test_text_model_scores_and_gradients_match_the_full_forward(tie):
    model = text_model(vocab_size=300, tie=tie)
    batch = random_batch(300, prompt_lens=[7, 12, 3], completion_lens=[5, 2, 9])
    assert_same_scores_and_gradients(model, batch, 1.3, [0, 1, 2], chunk_size=4)


def test_vocabulary_memory_depends_on_the_chunk_not_on_the_prompt():
    """Measured by shape (`support.autograd_memory`), so exact and repeatable: the vocabulary has
    50,000 entries, a size no other dimension here has. The reference (full forward) allocates
    [B, L, V] logits and keeps [B, C, V] for backward, both growing with the prompt; the learner's
    path keeps no tensor with a vocabulary dimension and its largest tensor, in forward or
    backward, is one fp32 chunk of logits [64, V] (the tied embedding's [V, 32] gradient is
    smaller), the same for a prompt twice as long and for twice as many completion tokens."""
    V, chunk, B = 50_000, 64, 2
    model = text_model(V)
    exclude = list(model.parameters())

    def measure(prompt, completion):
        batch = random_batch(V, [prompt] * B, [completion, completion - 3])

        def ours():
            completion_scores(model, batch, 0.8, [0, 1], chunk)[0].sum().backward()

        def reference():
            reference_logprobs(model, batch, 0.8, [0, 1]).sum().backward()

        return autograd_memory(ours, exclude), autograd_memory(reference, exclude)

    runs = {(P, C): measure(P, C) for P, C in [(64, 48), (128, 48), (64, 96)]}
    for (P, C), (ours, reference) in runs.items():
        L = P + C
        assert reference.largest >= B * L * V * 4  # the measurement sees vocabulary tensors
        assert reference.saved_with_dim(V) >= B * (C - 3) * V * 4
        assert ours.saved_with_dim(V) == 0
        assert ours.largest == chunk * V * 4, ours.largest_shape
    assert runs[64, 48][1].largest < runs[128, 48][1].largest  # the reference grows, ours not


def test_a_model_that_transforms_its_logits_is_refused():
    model = text_model(50)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        completion_scores(model, random_batch(50, [4], [3]))


def test_the_head_module_is_called_once_whatever_the_number_of_chunks():
    """Hooks on the head (DeepSpeed ZeRO-3 gathers its weight in them) must see one call in
    forward and one backward through its output: a per-chunk count would differ between ranks
    with different numbers of tokens."""
    model = text_model(vocab_size=300)
    head = model.get_output_embeddings()
    calls, backwards = [], []

    def on_output(module, args, output):
        calls.append(args[0].shape[0])
        output[0].register_hook(lambda grad: backwards.append(grad.shape[0]))

    head.register_forward_hook(on_output)
    batch = random_batch(300, prompt_lens=[7, 12, 3], completion_lens=[5, 2, 9])
    logprobs, _ = completion_scores(model, batch, chunk_size=2)  # 16 tokens, 8 chunks
    logprobs.sum().backward()
    assert calls == [16] and backwards == [16]
    assert head.forward.__func__ is torch.nn.Linear.forward  # the module's own forward is back


def assert_packed_equals_padded(model, batch):
    """Scores and gradients of the packed batch equal the padded batch's, up to rounding."""
    weights = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(0))
    padded, _ = completion_scores(model, batch, 0.9)
    padded_grads = grads_of(model, padded, weights)
    packed_batch = packed_for(model, batch)
    assert packed_batch.model_inputs["input_ids"].shape == (
        1,
        int(batch.model_inputs["attention_mask"].sum()),
    )  # one row, no padding
    assert "attention_mask" not in packed_batch.model_inputs
    packed, _ = completion_scores(model, packed_batch, 0.9)
    packed_grads = grads_of(model, packed, weights)
    assert torch.allclose(packed, padded, atol=1e-5)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-6, rtol=1e-4), name
    return packed_batch


def test_packed_text_batch_scores_and_gradients_equal_the_padded_batch():
    model = text_model(vocab_size=300)
    batch = random_batch(300, prompt_lens=[7, 12, 3], completion_lens=[5, 2, 9])
    packed_batch = assert_packed_equals_padded(model, batch)
    # The control: positions that do not restart let every sample attend to the ones before it.
    joined = dict(packed_batch.model_inputs)
    joined["position_ids"] = torch.arange(joined["input_ids"].shape[1]).unsqueeze(0)
    leaked, _ = completion_scores(model, dataclasses.replace(packed_batch, model_inputs=joined))
    first = batch.completion_mask[0].bool()
    assert torch.allclose(leaked[0][first], completion_scores(model, batch)[0][0][first])
    assert not torch.allclose(leaked[1:], completion_scores(model, batch)[0][1:], atol=1e-3)


def test_packed_vision_language_batch_equals_the_padded_batch(tiny_model_dir, synthetic_dir):
    options = ModelOptions(tiny_model_dir)
    processor, model = load_processor(options), load_model(options)
    tokenizer = tokenizer_of(processor)
    samples = sft_samples(load_mcq_jsonl(synthetic_dir / "sft.jsonl")[:4], tokenizer, None)
    for i, s in enumerate(samples):  # ragged completions: padding to remove
        s.completion_ids = s.completion_ids[: 4 + 3 * i]
    batch = build_policy_batch(processor, samples, tokenizer.pad_token_id)
    packed_batch = assert_packed_equals_padded(model, batch)
    positions = packed_batch.model_inputs["position_ids"]
    assert positions.shape[:2] == (4, 1)  # text positions for the mask, then M-RoPE's three rows
    assert not torch.equal(positions[1], positions[2])  # the image's height/width positions
