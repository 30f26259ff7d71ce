"""Prompts in the Qwen-VL chat shape, and SFT targets."""

from __future__ import annotations

import pytest

from gmai_rl.data import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    build_prompt,
    format_question,
    sft_target,
)
from gmai_rl.types import MCQItem, Prompt

ITEM = MCQItem(
    id="q1",
    question="Which lesion is shown?",
    options={"A": "Cyst", "B": "Abscess"},
    answer="B",
    images=("/data/a.png", "/data/b.png"),
    reasoning="Rim enhancement with central fluid.",
)
TEXT_ONLY = MCQItem(id="q2", question="Which drug?", options={"A": "x", "B": "y"}, answer="A")


def test_system_prompt_asks_for_think_then_answer_letter() -> None:
    prompt = DEFAULT_SYSTEM_PROMPT
    assert "<think>" in prompt and "</think>" in prompt
    assert "<answer>" in prompt and "</answer>" in prompt
    assert prompt.index("<think>") < prompt.index("<answer>")
    assert "letter" in prompt


def test_format_question_lists_options_one_per_line() -> None:
    assert format_question(ITEM) == "Which lesion is shown?\nA. Cyst\nB. Abscess"


def test_messages_put_images_first_then_text() -> None:
    system, user = build_messages(ITEM)
    assert system == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert user == {
        "role": "user",
        "content": [
            {"type": "image", "image": "/data/a.png"},
            {"type": "image", "image": "/data/b.png"},
            {"type": "text", "text": "Which lesion is shown?\nA. Cyst\nB. Abscess"},
        ],
    }


def test_text_only_question_gets_plain_content() -> None:
    (_, user) = build_messages(TEXT_ONLY)
    assert user == {"role": "user", "content": "Which drug?\nA. x\nB. y"}


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_no_system_prompt_means_no_system_message(system_prompt: str | None) -> None:
    messages = build_messages(ITEM, system_prompt=system_prompt)
    assert [message["role"] for message in messages] == ["user"]


def test_custom_system_prompt() -> None:
    assert build_messages(TEXT_ONLY, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_build_prompt() -> None:
    prompt = build_prompt(ITEM, system_prompt="S")
    assert prompt == Prompt(id="q1", messages=build_messages(ITEM, "S"), images=ITEM.images)


def test_sft_target() -> None:
    assert sft_target(ITEM) == (
        "<think>Rim enhancement with central fluid.</think><answer>B</answer>"
    )


def test_sft_target_needs_reasoning() -> None:
    with pytest.raises(ValueError, match="'q2' has no reference reasoning"):
        sft_target(TEXT_ONLY)
