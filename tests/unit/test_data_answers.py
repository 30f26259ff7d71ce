"""Reading gold answers and reference reasoning from the datasets' answer fields."""

from __future__ import annotations

import pytest

from gmai_rl.data.answers import (
    AnswerError,
    AnswerNotInOptions,
    resolve_answer_letter,
    split_response,
)

OPTIONS = {"A": "Normal brain", "B": "Glioma", "C": "Meningioma", "D": "Pituitary tumor"}


@pytest.mark.parametrize(
    "answer",
    [
        "B",
        " B\n",
        "B.",
        "(B)",
        "B)",
        "b",
        "B. Glioma",
        "(B) glioma",
        "Glioma",
        "glioma.",
        "$B$",
        "\\boxed{B}",
        "$\\boxed{B}$",
        "\\text{B}",
        "<answer>B</answer>",
        "**B**",
        "Answer: B",
        "The answer is B.",
        "Option B",
    ],
)
def test_answer_shapes_that_name_option_b(answer: str) -> None:
    assert resolve_answer_letter(answer, OPTIONS) == "B"


def test_letter_outside_the_options() -> None:
    with pytest.raises(AnswerNotInOptions, match="not one of the options A-D"):
        resolve_answer_letter("E", OPTIONS)


def test_letter_whose_text_contradicts_the_option() -> None:
    with pytest.raises(AnswerNotInOptions, match="whose text is 'Glioma'"):
        resolve_answer_letter("B. Meningioma", OPTIONS)


@pytest.mark.parametrize("answer", ["", "a benign lesion", "Answers vary", "B or C", "K9"])
def test_unreadable_answers(answer: str) -> None:
    with pytest.raises(AnswerError):
        resolve_answer_letter(answer, OPTIONS)


def test_option_text_that_looks_like_another_letter() -> None:
    options = {"A": "A. fumigatus", "B": "C. albicans", "C": "E. coli"}
    assert resolve_answer_letter("C. albicans", options) == "B"


@pytest.mark.parametrize(
    ("response", "reasoning", "answer"),
    [
        ("B", None, "B"),
        ("B. Glioma", None, "B. Glioma"),
        ("<answer>B</answer>", None, "B"),
        ("<think>Mass effect.</think>\n<answer>B</answer>", "Mass effect.", "B"),
        (
            "Mass effect with enhancement. <answer> B </answer>",
            "Mass effect with enhancement.",
            "B",
        ),
        ("<think>Mass effect.</think> B", "Mass effect.", "B"),
        ("Step one. Step two. Therefore, the answer is B.", "Step one. Step two.", "B"),
        ("Looks benign.\nFinal answer: (A)", "Looks benign.", "A"),
        ("Hence it is \\boxed{C}.", None, "C"),
        ("It is a benign lesion.", None, "It is a benign lesion."),
    ],
)
def test_split_response(response: str, reasoning: str | None, answer: str) -> None:
    assert split_response(response) == (reasoning, answer)


def test_split_response_uses_the_last_answer_block() -> None:
    response = "<think>Not <answer>A</answer> but rather...</think><answer>C</answer>"
    assert split_response(response)[1] == "C"


def test_lowercase_article_is_not_read_as_a_stated_letter() -> None:
    assert split_response("I think the answer is a glioma.") == (
        None,
        "I think the answer is a glioma.",
    )


@pytest.mark.parametrize(
    "response",
    [
        "<think>Hmm.</think><answer>A</answer><answer>B</answer>",
        "It is a glioma. <answer>B</answer> or rather <answer>C</answer>",
    ],
)
def test_a_response_with_two_different_final_answers_is_refused(response: str) -> None:
    with pytest.raises(AnswerError, match="several answers"):
        split_response(response)


def test_a_repeated_final_answer_is_one_answer() -> None:
    assert split_response("<think>R</think><answer>B</answer> <answer>B</answer>")[1] == "B"
