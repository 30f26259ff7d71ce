"""The prompts a benchmark question is asked with: the format the policy was trained with (the
default), or the harnesses' own, so a researcher can reproduce either kind of number.

`trained`: multiple choice exactly as in training (`data.prompts.build_prompt`: the run's system
prompt, the question, "A. text" option lines; `<think>`/`<answer>` with the letter); closed and
open questions with the same reasoning format, the answer a word or short phrase in `<answer>`.

`harness`: no system prompt. Multiple choice as VLMEvalKit's image MCQ datasets build it
(`vlmeval/dataset/image_mcq.py`: "Hint: ...", "Question: ...", "Options:", "A. text" lines, "Please
select the correct answer from the options above."); closed and open questions as LLaVA-1.5's
short-answer VQA prompt (the question, then "Answer the question using a single word or phrase.").
The scorer reads both (`benchmarks.scoring`, section 1).
"""

from __future__ import annotations

from gmai_rl.benchmarks.items import BenchItem, Kind
from gmai_rl.data.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt, user_message
from gmai_rl.types import Message, Prompt, StrChoice


class PromptStyle(StrChoice):
    TRAINED = "trained"
    HARNESS = "harness"


SHORT_ANSWER_SYSTEM_PROMPT = (
    "You are a medical imaging expert answering a question about the given image(s). First "
    "think through the question step by step inside <think> and </think>. Then give only the "
    "final answer, a single word or short phrase, inside <answer> and </answer>, for example: "
    "<think>...</think><answer>yes</answer>"
)
"""The training prompt's format for questions without options."""

HARNESS_MCQ_SUFFIX = "Please select the correct answer from the options above. \n"
HARNESS_SHORT_ANSWER = "Answer the question using a single word or phrase."


def prompt_key(item: BenchItem) -> str:
    """The prompt's id: unique across benchmarks."""
    return f"{item.benchmark}/{item.id}"


def bench_prompt(
    item: BenchItem,
    style: PromptStyle = PromptStyle.TRAINED,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> Prompt:
    """The prompt for `item` in `style`; `system_prompt` is the run's MCQ system prompt
    (`data.system_prompt`), used for multiple choice in the trained style."""
    if style is PromptStyle.TRAINED and item.kind is Kind.MCQ:
        return build_prompt(item.as_mcq(), system_prompt)
    if style is PromptStyle.TRAINED:
        system: str | None = SHORT_ANSWER_SYSTEM_PROMPT
        text = item.asked
    else:
        system, text = None, harness_text(item)
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append(user_message(text, item.images))
    return Prompt(id=prompt_key(item), messages=messages, images=item.images)


def harness_text(item: BenchItem) -> str:
    """The question as VLMEvalKit (MCQ) or LLaVA-1.5 (short answers) words it."""
    if item.kind is not Kind.MCQ:
        return f"{item.question}\n{HARNESS_SHORT_ANSWER}"
    text = f"Hint: {item.hint}\n" if item.hint else ""
    text += f"Question: {item.question}\nOptions:\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in item.options.items())
    return text + HARNESS_MCQ_SUFFIX
