"""Turn prompts and completions into model inputs, identically on the rollout and learner sides.

Both sides render a `Prompt` through the processor's chat template and the processor itself, so the
prompt token ids a rollout worker generated from are the ones the learner scores (the learner checks
this). Completions are scored on a "completion grid": row b holds sample b's completion tokens,
left-aligned and padded, so log-probs, masks and advantages all have shape [B, C].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gmai_rl.models.loading import is_vision_language, tokenizer_of
from gmai_rl.types import Prompt, TrainSample


def chat_text(processor: Any, prompt: Prompt) -> str:
    """The prompt rendered by the chat template, ending with the assistant's generation header."""
    return processor.apply_chat_template(
        prompt.messages, add_generation_prompt=True, tokenize=False
    )


def load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def encode_prompts(processor: Any, prompts: Sequence[Prompt], padding_side: str = "left") -> Any:
    """Batch-encode prompts: input_ids, attention_mask and, for images, the vision inputs.

    Left padding suits generation (every row's next token is at the end).
    """
    texts = [chat_text(processor, p) for p in prompts]
    tokenizer = tokenizer_of(processor)
    tokenizer.padding_side = padding_side
    image_paths = [path for p in prompts for path in p.images]
    if not is_vision_language(processor):
        if image_paths:
            raise ValueError("a text-only model was given prompts with images")
        return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    images = load_images(image_paths) if image_paths else None
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@dataclass
class EncodedPrompt:
    """One prompt's own inputs, unpadded: token ids plus its share of the vision inputs."""

    input_ids: list[int]
    mm_token_type_ids: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def encode_prompt(processor: Any, prompt: Prompt) -> EncodedPrompt:
    enc = encode_prompts(processor, [prompt])
    ids = enc["input_ids"][0].tolist()
    mm = enc.get("mm_token_type_ids")
    return EncodedPrompt(
        input_ids=ids,
        mm_token_type_ids=mm[0].tolist() if mm is not None else None,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
    )


@dataclass
class PolicyBatch:
    """Right-padded prompt+completion sequences and the completion grid that indexes them.

    Shapes: B samples, L = longest prompt+completion, C = longest completion.
    """

    model_inputs: dict[str, torch.Tensor]
    """input_ids [B, L], attention_mask [B, L] and, for images, pixel_values, image_grid_thw,
    mm_token_type_ids [B, L]."""
    completion_ids: torch.Tensor
    """[B, C] completion tokens, padded with 0."""
    completion_mask: torch.Tensor
    """[B, C] 1.0 on real completion tokens."""
    logit_index: torch.Tensor
    """[B, C] position in the sequence whose logits predict completion token (b, c)."""
    row_of: torch.Tensor | None = None
    """[B] the input row holding each sample (`pack_policy_batch`: all in row 0); None: row b."""

    def to(self, device: torch.device | str) -> PolicyBatch:
        """The same batch with every tensor on `device`."""
        return PolicyBatch(
            {k: v.to(device) for k, v in self.model_inputs.items()},
            self.completion_ids.to(device),
            self.completion_mask.to(device),
            self.logit_index.to(device),
            self.row_of.to(device) if self.row_of is not None else None,
        )


def build_policy_batch(
    processor: Any,
    samples: Sequence[TrainSample],
    pad_token_id: int,
    encoded: dict[str, EncodedPrompt] | None = None,
) -> PolicyBatch:
    """Collate samples for a forward pass that scores their completion tokens.

    Each distinct prompt is encoded once (a GRPO group shares one) and kept in `encoded`, by
    prompt id: a caller that collates several micro-batches of one rollout batch passes the same
    dict to each, so a prompt's image goes through the processor once per batch, not once per
    micro-batch and pass (on the demo that was a third of the learner's step). Where a sample
    carries the prompt ids the rollout generated from, the encoding must equal them: a mismatch
    means the two sides' processors differ. SFT samples carry none and take the encoding as it is.
    """
    encoded = {} if encoded is None else encoded
    for s in samples:
        enc = encoded.get(s.prompt.id)
        if enc is None:
            enc = encoded[s.prompt.id] = encode_prompt(processor, s.prompt)
        if s.prompt_ids and enc.input_ids != list(s.prompt_ids):
            raise ValueError(
                f"prompt {s.prompt.id!r}: the learner's encoding ({len(enc.input_ids)} tokens) "
                f"differs from the rollout's ({len(s.prompt_ids)} tokens); "
                "rollout and learner must use the same processor settings"
            )
    prompt_ids = [encoded[s.prompt.id].input_ids for s in samples]

    seq_len = max(len(p) + len(s.completion_ids) for p, s in zip(prompt_ids, samples, strict=True))
    comp_len = max(1, max(len(s.completion_ids) for s in samples))
    B = len(samples)
    input_ids = torch.full((B, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, seq_len), dtype=torch.long)
    completion_ids = torch.zeros((B, comp_len), dtype=torch.long)
    completion_mask = torch.zeros((B, comp_len))
    logit_index = torch.zeros((B, comp_len), dtype=torch.long)
    vision = any(encoded[s.prompt.id].pixel_values is not None for s in samples)
    mm_token_type_ids = torch.zeros((B, seq_len), dtype=torch.long)
    pixel_values, grids = [], []

    for b, s in enumerate(samples):
        enc = encoded[s.prompt.id]
        P, C = len(prompt_ids[b]), len(s.completion_ids)
        input_ids[b, : P + C] = torch.tensor(prompt_ids[b] + list(s.completion_ids))
        attention_mask[b, : P + C] = 1
        completion_ids[b, :C] = torch.tensor(s.completion_ids, dtype=torch.long)
        completion_mask[b, :C] = 1.0
        # Logits at position t predict token t+1: completion token c sits at P + c.
        logit_index[b] = torch.arange(P - 1, P - 1 + comp_len).clamp(max=seq_len - 1)
        if enc.mm_token_type_ids is not None:
            mm_token_type_ids[b, :P] = torch.tensor(enc.mm_token_type_ids)
        if enc.pixel_values is not None:
            pixel_values.append(enc.pixel_values)
            grids.append(enc.image_grid_thw)

    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_vision_language(processor):
        model_inputs["mm_token_type_ids"] = mm_token_type_ids
    if vision:
        model_inputs["pixel_values"] = torch.cat(pixel_values)
        model_inputs["image_grid_thw"] = torch.cat(grids)
    return PolicyBatch(model_inputs, completion_ids, completion_mask, logit_index)


def pack_policy_batch(
    batch: PolicyBatch, vision_positions: torch.Tensor | None = None, multimodal: bool = False
) -> PolicyBatch:
    """The batch's samples back to back in one row, without padding (sequence packing).

    Padding costs a forward and backward of every pad token. Packed, the row holds only real
    tokens, and position ids that restart at 0 for each sample tell transformers (>= 5.x,
    `masking_utils.find_packed_sequence_indices`, with no attention mask) to keep each sample's
    attention to itself: with flash-attention 2 as variable-length attention (no wasted work),
    with SDPA or eager as a block-diagonal mask over the whole row (dense: its cost grows with
    the row's length squared, so on CPU packing only pays where padding outweighs that).

    Args:
        batch: from `build_policy_batch` (right-padded, with an attention mask).
        vision_positions: `[3, B, L]` M-RoPE positions of the padded batch, from the model's
            `get_rope_index` (`models.scoring.packed_for`); None: no images in the batch.
        multimodal: the model is of the Qwen2-VL family, which takes `[4, 1, T]` position ids
            (text positions for the mask, then its three M-RoPE rows); else `[1, T]`.

    Returns:
        A batch of one input row of T = real tokens; `row_of` is 0 for every sample and
        `logit_index` points into the row. Scores equal the padded batch's up to rounding.
    """
    inputs = batch.model_inputs
    real = inputs["attention_mask"].bool()  # [B, L]
    lengths = real.sum(1)  # [B]
    starts = torch.cumsum(lengths, 0) - lengths  # [B]
    total = int(lengths.sum())
    text_positions = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)  # [1, T]
    packed: dict[str, torch.Tensor] = {"input_ids": inputs["input_ids"][real].unsqueeze(0)}
    if "mm_token_type_ids" in inputs:
        packed["mm_token_type_ids"] = inputs["mm_token_type_ids"][real].unsqueeze(0)
    for key in ("pixel_values", "image_grid_thw"):
        if key in inputs:
            packed[key] = inputs[key]
    if multimodal:
        rope = (
            vision_positions[:, real].unsqueeze(1)  # [3, 1, T]
            if vision_positions is not None
            else text_positions.unsqueeze(0).expand(3, 1, -1)
        )
        packed["position_ids"] = torch.cat([text_positions.unsqueeze(0), rope])  # [4, 1, T]
    else:
        packed["position_ids"] = text_positions
    logit_index = (batch.logit_index + starts[:, None]).clamp(max=total - 1)  # [B, C]
    row_of = torch.zeros(len(lengths), dtype=torch.long)
    return PolicyBatch(packed, batch.completion_ids, batch.completion_mask, logit_index, row_of)


def completion_logits(logits: torch.Tensor, logit_index: torch.Tensor) -> torch.Tensor:
    """Select the logits that predict each completion token: [B, L, V] -> [B, C, V].

    The reference path (full forward, then select): tests compare the learner's chunked scoring
    (`models.scoring.completion_scores`) and the rollout engines against it.
    """
    index = logit_index.unsqueeze(-1).expand(-1, -1, logits.size(-1))  # [B, C, V]
    return logits.gather(1, index)
