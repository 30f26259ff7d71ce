"""The prompt budget: the longest prompt (images, system prompt, chat template, question) and
sequence, measured on the run's questions when they are at hand, else assumed, against the
rollout engine's window (from its spec).

Token counts are estimated without the tokenizer: an image's tokens from Qwen-VL's patch grid,
a text's from its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gmai_rl.config import TrainConfig
from gmai_rl.data import format_question
from gmai_rl.plan.model import ModelFacts
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.types import MCQItem

QUESTION_TOKENS = 512
"""Allowance for a question and its options when the data is not at hand (`gmai-rl plan` without
the dataset): an assumption, medical MCQs being typically a few hundred tokens. A run measures
its data instead."""

TEMPLATE_TOKENS = 16
"""The chat template's own tokens around the system, user and assistant turns."""

CHARS_PER_TOKEN = 3
"""Characters per token when estimating a text without its tokenizer (English BPE averages ~4:
3 errs long)."""


def image_tokens(max_pixels: int, patch_size: int, merge_size: int) -> int:
    """Most visual tokens one image becomes in Qwen-VL: it is resized to at most max_pixels in
    cells of (patch x merge) pixels squared, one token per cell."""
    return max_pixels // (patch_size * merge_size) ** 2


def text_tokens(text: str | None) -> int:
    """A text's tokens estimated from its length (no tokenizer needed)."""
    return math.ceil(len(text or "") / CHARS_PER_TOKEN)


def prompt_tokens(
    images: int, tokens_per_image: int, system_prompt: str | None, question: int = QUESTION_TOKENS
) -> int:
    """A prompt's tokens at most: each image's tokens and its two markers, the system prompt,
    the chat template and the question with its options."""
    return images * (tokens_per_image + 2) + text_tokens(system_prompt) + TEMPLATE_TOKENS + question


MAX_NAMED = 5
"""Items named in a problem; the rest are counted."""


def name_some(items: Sequence[MCQItem], describe: Callable[[MCQItem], str]) -> str:
    """The first MAX_NAMED items described, and how many more there are."""
    named = ", ".join(describe(item) for item in items[:MAX_NAMED])
    return named + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def over_image_limit(cfg: TrainConfig, m: ModelFacts, items: Sequence[MCQItem]) -> list[str]:
    """Items with more images than the rollout engine takes in one prompt (a vision-language
    model only: a text model's prompts carry no image), each named by its source."""
    spec = engine_spec(cfg.rollout.backend)
    limit = spec.images_per_prompt(cfg)
    if limit is None or not m.patch_size:
        return []
    over = [item for item in items if len(item.images) > limit]
    if not over:
        return []
    named = name_some(over, lambda i: f"{i.source or i.id} ({len(i.images)} images)")
    return [
        f"{len(over)} item(s) have more images than {spec.images_key}={limit}, which the "
        f"{spec.label} engine refuses in a prompt (the whole generate call fails): {named}; "
        f"raise {spec.images_key} or drop those items"
    ]


def mixed_images_under_zero3(
    cfg: TrainConfig, m: ModelFacts, trained: Sequence[MCQItem]
) -> list[str]:
    """Text-only items beside items with images, trained by a vision-language model under
    ZeRO-3: the vision tower runs only on a micro-batch with images, and ZeRO-3 gathers its
    partitioned parameters on every rank at once, so a rank whose micro-batch has no image
    skips gathers the others wait in: the job hangs. Refused, naming the text-only items."""
    if cfg.learner.zero_stage != 3 or not m.patch_size:
        return []
    text_only = [item for item in trained if not item.images]
    if not text_only or len(text_only) == len(trained):
        return []
    named = name_some(text_only, lambda i: i.source or i.id)
    return [
        f"learner.zero_stage=3 with a vision-language model: {len(text_only)} trained item(s) "
        f"have no image while the others have (a rank whose micro-batch has no image skips "
        "the vision tower's ZeRO-3 gathers that the other ranks wait in: the job would hang): "
        f"{named}; drop the text-only items or use learner.zero_stage=2"
    ]


@dataclass(frozen=True)
class PromptBudget:
    image_tokens: int | None
    """Tokens of one image at max_pixels; None for a text model or an unknown bound."""
    images: int
    """Images per prompt: the most in the data, else rollout.vllm.images_per_prompt."""
    system: int
    """The system prompt's tokens (estimated from its length)."""
    question: int
    """The longest question with its options in the data, else the QUESTION_TOKENS allowance."""
    measured: bool
    """Whether `question` and `images` were measured on the data."""
    prompt: int
    """The longest prompt: images, system prompt, chat template and question."""
    longest: int
    """prompt + rollout.max_new_tokens."""
    window: int | None
    """The engine's fixed window (vLLM: rollout.vllm.max_model_len); None: none (HF)."""


def prompt_budget(
    cfg: TrainConfig, m: ModelFacts, items: Sequence[MCQItem] | None = None
) -> PromptBudget:
    """The longest prompt and sequence: measured on `items` when given, else assumed."""
    tokens = None
    if m.patch_size and m.merge_size and m.max_pixels:
        tokens = image_tokens(m.max_pixels, m.patch_size, m.merge_size)
    if items:
        question = max(text_tokens(format_question(item)) for item in items)
        images = max(len(item.images) for item in items)
    else:
        question, images = QUESTION_TOKENS, cfg.rollout.vllm.images_per_prompt
    images = images if tokens is not None else 0
    prompt = prompt_tokens(images, tokens or 0, cfg.data.system_prompt, question)
    return PromptBudget(
        image_tokens=tokens,
        images=images,
        system=text_tokens(cfg.data.system_prompt),
        question=question,
        measured=bool(items),
        prompt=prompt,
        longest=prompt + cfg.rollout.max_new_tokens,
        window=engine_spec(cfg.rollout.backend).window(cfg),
    )
