"""Score completions under a causal LM without vocabulary-sized logits for every position.

An HF model's `forward` applies the LM head at every position: [B, L, V] logits, image and prompt
tokens included, of which the learner needs only the C completion positions per row. With
Qwen2.5-VL (V = 151,936, ~1.3k image and prompt tokens + ~1k completion tokens per sample) that is
0.7 GB of bf16 logits per sample, which the selection then kept alive for backward. Here the
backbone runs once ([B, L, H] hidden states), the rows that predict real completion tokens are
gathered ([N, H]), and `algo.linear_token_logprobs` applies the LM head to them chunk by chunk,
recomputing each chunk in backward: the vocabulary-sized memory is a few x chunk_size x V floats
whatever B, L and C are.

`models.inputs.completion_logits` (the full forward, then a gather) stays as the reference that
tests compare this path and the rollout engines against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from gmai_rl.algo import linear_token_logprobs
from gmai_rl.algo.logprobs import DEFAULT_CHUNK_SIZE
from gmai_rl.models.inputs import PolicyBatch, pack_policy_batch

# Config fields by which some architectures transform the LM head's output inside `forward`
# (Gemma-2 soft-capping, Cohere's and Granite's scaling); applying the head alone would miss it.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def completion_scores(
    model: Any,
    batch: PolicyBatch,
    temperature: float = 1.0,
    suppressed: Sequence[int] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of a batch's completion tokens under `model`.

    Equal to `token_logprobs(completion_logits(model(**inputs).logits, logit_index), ...)` with the
    `suppressed` ids masked to -inf, on the real completion tokens.

    Args:
        model: an HF causal LM or image-text-to-text model whose `forward` is
            `lm_head(base_model(...).last_hidden_state)` (Qwen2, Qwen2.5-VL, Llama...). Its
            `base_model` and LM head (`get_output_embeddings()`, an `nn.Linear`) are called as
            modules, once each, so parameter hooks (DeepSpeed ZeRO-3) see every use.
        batch: tensors on the model's device.
        temperature: the sampling temperature the completions were drawn at.
        suppressed: vocabulary ids outside the policy's support (-inf before the softmax).
        chunk_size: completion tokens per chunk of the LM head.
        with_entropy: also return the per-token entropy (no gradient).

    Returns:
        `([B, C] log-probs, [B, C] entropies or None)`, float32 (float64 for a float64 model),
        0 where `batch.completion_mask` is 0. The log-probs carry the graph when grad is enabled.
    """
    backbone, head = model.base_model, model.get_output_embeddings()
    if backbone is model or not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no separate backbone (base_model) and linear LM head "
            "(get_output_embeddings()); the learner scores completions from the two"
        )
    config = model.config.get_text_config()
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(
            f"{type(model).__name__} transforms its logits after the LM head ({transforms}); "
            "the learner's chunked head does not model that"
        )
    hidden = backbone(**batch.model_inputs, use_cache=False).last_hidden_state  # [B, L, H]
    mask = batch.completion_mask.bool()  # [B, C]
    b, c = mask.nonzero(as_tuple=True)  # [N] each
    row = batch.row_of[b] if batch.row_of is not None else b  # [N]
    rows = hidden[row, batch.logit_index[b, c]]  # [N, H]
    tokens = batch.completion_ids[b, c]  # [N]

    def fused_head(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return linear_token_logprobs(
            rows, head.weight, head.bias, tokens, temperature, suppressed, chunk_size, with_entropy
        )

    # The fused head runs as the head module's forward, one call whatever the number of chunks:
    # hooks on the module see one use of its parameters in forward and one in backward, as with
    # the plain head (why it matters under ZeRO-3: `Learner._completion_scores`).
    with forward_replaced(head, fused_head):
        logprobs, entropy = head(rows)  # [N], [N] or None
    grid = logprobs.new_zeros(mask.shape).index_put((b, c), logprobs)  # [B, C]
    if entropy is None:
        return grid, None
    return grid, entropy.new_zeros(mask.shape).index_put((b, c), entropy)


def packed_for(model: Any, batch: PolicyBatch) -> PolicyBatch:
    """`pack_policy_batch` of a padded batch for `model`: a Qwen2-VL-family model (it has
    `get_rope_index`) takes M-RoPE positions, computed here from the padded batch as the model
    would inside its forward when the batch has images."""
    inputs = batch.model_inputs
    get_rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
    positions = None
    if get_rope_index is not None and "image_grid_thw" in inputs:
        positions, _ = get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
    return pack_policy_batch(batch, positions, multimodal=get_rope_index is not None)


@contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Within the block, the next call of `module` runs `forward` in place of its own.

    The call still goes through `module.__call__`, so every hook registered on the module runs
    around `forward` as around the original: DeepSpeed ZeRO-3's parameter gather and release, the
    backward hooks it puts on the outputs, an engine's bookkeeping when `module` is what an engine
    wraps (the same forward redirection as Lightning's and TRL's). The module's own forward is back
    before `forward` runs, so nested calls and later ones are ordinary.
    """

    def once(*args: Any, **kwargs: Any) -> Any:
        module.__dict__.pop("forward", None)
        return forward(*args, **kwargs)

    module.forward = once
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)
