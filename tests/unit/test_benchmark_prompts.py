"""The prompts a benchmark question is asked with: in the trained style, multiple choice exactly
as in training; in the harness style, VLMEvalKit's MCQ text and LLaVA-1.5's short-answer text."""

from gmai_rl.benchmarks.items import BenchItem, Kind
from gmai_rl.benchmarks.prompts import (
    SHORT_ANSWER_SYSTEM_PROMPT,
    PromptStyle,
    bench_prompt,
    harness_text,
)
from gmai_rl.data.prompts import build_prompt

MCQ = BenchItem(
    "gmai-mmbench",
    "7",
    "Which organ is shown?",
    Kind.MCQ,
    "B",
    options={"A": "Liver", "B": "Lung"},
    images=("/data/x.png",),
    hint="A chest CT.",
)
YES_NO = BenchItem("vqa-rad", "3", "Is there a fracture?", Kind.CLOSED, "no", images=("/d/y.png",))


def test_a_multiple_choice_question_is_asked_as_in_training():
    prompt = bench_prompt(MCQ, PromptStyle.TRAINED, "SYSTEM")
    assert prompt == build_prompt(MCQ.as_mcq(), "SYSTEM")
    assert prompt.id == "gmai-mmbench/7" and prompt.images == ("/data/x.png",)
    text = prompt.messages[-1]["content"][-1]["text"]
    assert text == "A chest CT.\nWhich organ is shown?\nA. Liver\nB. Lung"


def test_other_questions_keep_the_reasoning_format_with_a_short_answer():
    prompt = bench_prompt(YES_NO, PromptStyle.TRAINED, "SYSTEM")
    assert prompt.messages[0] == {"role": "system", "content": SHORT_ANSWER_SYSTEM_PROMPT}
    image, text = prompt.messages[1]["content"]
    assert image == {"type": "image", "image": "/d/y.png"}
    assert text == {"type": "text", "text": "Is there a fracture?"}


def test_the_harness_style_is_vlmevalkits_mcq_and_llavas_short_answer_prompt():
    assert harness_text(MCQ) == (
        "Hint: A chest CT.\nQuestion: Which organ is shown?\nOptions:\nA. Liver\nB. Lung\n"
        "Please select the correct answer from the options above. \n"
    )
    assert harness_text(YES_NO) == (
        "Is there a fracture?\nAnswer the question using a single word or phrase."
    )
    prompt = bench_prompt(MCQ, PromptStyle.HARNESS)
    assert [m["role"] for m in prompt.messages] == ["user"]  # no system prompt


def test_benchmarks_are_asked_without_a_system_prompt_when_the_run_has_none():
    from gmai_rl.evaluate import evaluate_benchmarks
    from gmai_rl.types import Completion, Group

    asked = []

    def generate(prompts):
        asked.extend(prompts)
        return [Group(p, [1], [Completion([1], "<answer>B</answer>")], 0) for p in prompts]

    summary = evaluate_benchmarks(generate, [MCQ], PromptStyle.TRAINED, None)
    assert [m["role"] for m in asked[0].messages] == ["user"]
    assert summary["gmai-mmbench"]["accuracy"] == 1.0
