"""Build the chat prompts a vision-language model is asked to continue, and SFT targets.

Messages follow the Qwen-VL chat-template convention that `processor.apply_chat_template` and
`qwen_vl_utils.process_vision_info` read: a user message whose content is a list with one
`{"type": "image", "image": <path>}` part per image, first, then one `{"type": "text", ...}` part.
Text-only questions get plain string content, which every chat template accepts.

The answer format asked for here (reasoning in <think>...</think>, then only the option letter in
<answer>...</answer>) is the format `gmai_rl.reward` scores; change them together.
"""

from __future__ import annotations

from gmai_rl.types import MCQItem, Message, Prompt

DEFAULT_SYSTEM_PROMPT = (
    "You are a medical imaging expert answering a multiple-choice question about the given "
    "image(s). First think through the question step by step inside <think> and </think>. "
    "Then give only the letter of the single correct option inside <answer> and </answer>, "
    "for example: <think>...</think><answer>B</answer>"
)
"""Asks for step-by-step reasoning inside <think>...</think>, then only the option letter inside
<answer>...</answer>, as GMAI-VL-R1 trains its models to answer."""


def format_question(item: MCQItem) -> str:
    """The question, then its options one per line as "A. text"."""
    option_lines = [f"{letter}. {text}" for letter, text in item.options.items()]
    return "\n".join([item.question, *option_lines])


def build_messages(
    item: MCQItem, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[Message]:
    """Chat messages for `item`: an optional system message, then the user's question."""
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(user_message(format_question(item), item.images))
    return messages


def user_message(text: str, images: tuple[str, ...] = ()) -> Message:
    """The user's turn: one image part per image, first, then the text (plain string content
    without images)."""
    if not images:
        return {"role": "user", "content": text}
    parts = [*({"type": "image", "image": path} for path in images), {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def build_prompt(item: MCQItem, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> Prompt:
    """The `Prompt` a rollout engine continues for `item`."""
    return Prompt(id=item.id, messages=build_messages(item, system_prompt), images=item.images)


def sft_target(item: MCQItem) -> str:
    """The completion an SFT step teaches: "<think>{reasoning}</think><answer>{letter}</answer>"."""
    if item.reasoning is None:
        raise ValueError(
            f"item {item.id!r} has no reference reasoning; only SFT records "
            "(e.g. GMAI-Reasoning10K reasoning_mcq_sft) have an SFT target"
        )
    return f"<think>{item.reasoning}</think><answer>{item.answer}</answer>"
