"""Option parsing is where a silent mistake costs most: a question whose options are mis-split
still trains, on the wrong labels. These cases are adversarial on purpose."""

from __future__ import annotations

import pytest

from gmai_rl.data.options import (
    OptionParseError,
    options_from_value,
    split_question_options,
    strip_image_placeholders,
)

FOUR = {"A": "Normal brain", "B": "Glioma", "C": "Meningioma", "D": "Pituitary tumor"}


@pytest.mark.parametrize(
    "marker",
    ["{}. ", "{}) ", "({}) ", "{}: ", "{}．", "（{}）"],
    ids=["dot", "paren-close", "parens", "colon", "fullwidth-dot", "fullwidth-parens"],
)
def test_one_option_per_line_in_every_marker_style(marker: str) -> None:
    lines = [marker.format(letter) + text for letter, text in FOUR.items()]
    text = "What is the most likely finding in this brain MRI?\n" + "\n".join(lines)
    assert split_question_options(text) == (
        "What is the most likely finding in this brain MRI?",
        FOUR,
    )


@pytest.mark.parametrize(
    "text",
    [
        "Is the nodule benign or malignant? Options: (A) Benign (B) Malignant",
        "Is the nodule benign or malignant? Options: A. Benign B. Malignant",
        "Is the nodule benign or malignant? Choices: A) Benign B) Malignant",
        "Is the nodule benign or malignant? (A) Benign (B) Malignant",
        "Is the nodule benign or malignant?\nOptions:\nA. Benign\nB. Malignant",
        "Is the nodule benign or malignant? Options: A. Benign\nB. Malignant",
        "Is the nodule benign or malignant?\n\nA. Benign\n\nB. Malignant\n",
    ],
)
def test_inline_and_anchored_options(text: str) -> None:
    assert split_question_options(text) == (
        "Is the nodule benign or malignant?",
        {"A": "Benign", "B": "Malignant"},
    )


def test_question_sentence_containing_a_dot_marker_is_not_an_option() -> None:
    text = "Vitamin A. Which deficiency causes night blindness? A. Retinol B. Niacin C. Biotin"
    question, options = split_question_options(text)
    assert question == "Vitamin A. Which deficiency causes night blindness?"
    assert options == {"A": "Retinol", "B": "Niacin", "C": "Biotin"}


def test_anchor_decides_where_inline_options_start() -> None:
    text = "Vitamin A. Which one prevents night blindness? Options: A. Vitamin A B. Vitamin C"
    question, options = split_question_options(text)
    assert question == "Vitamin A. Which one prevents night blindness?"
    assert options == {"A": "Vitamin A", "B": "Vitamin C"}


def test_option_text_that_starts_like_a_marker() -> None:
    question, options = split_question_options("Which organism? A. A. fumigatus B. C. albicans")
    assert question == "Which organism?"
    assert options == {"A": "A. fumigatus", "B": "C. albicans"}


def test_option_text_ending_like_a_marker() -> None:
    _, options = split_question_options("Which vitamin? A. Vitamin A. B. Vitamin B.")
    assert options == {"A": "Vitamin A.", "B": "Vitamin B."}


def test_lowercase_parenthesised_letter_is_option_text() -> None:
    _, options = split_question_options("Which type? (A) Type (b) lesion (B) Other")
    assert options == {"A": "Type (b) lesion", "B": "Other"}


def test_lowercase_letters_never_start_options() -> None:
    assert split_question_options("Which? a. Benign b. Malignant")[1] == {}


def test_markers_inside_the_question_do_not_shadow_the_option_lines() -> None:
    text = "Is it (A) benign or (B) malignant?\nA. Benign\nB. Malignant"
    assert split_question_options(text) == (
        "Is it (A) benign or (B) malignant?",
        {"A": "Benign", "B": "Malignant"},
    )


def test_letters_out_of_order_on_lines_are_an_error() -> None:
    with pytest.raises(OptionParseError, match="consecutively"):
        split_question_options("Which?\nA. x\nC. y\nB. z")


def test_skipped_letter_after_a_valid_block_is_an_error() -> None:
    with pytest.raises(OptionParseError, match="option D after option B"):
        split_question_options("Which?\nA. x\nB. y\nD. z")


def test_options_not_starting_at_a_are_an_error() -> None:
    with pytest.raises(OptionParseError):
        split_question_options("Which?\nB. x\nC. y")


def test_letters_out_of_order_inline_give_no_options() -> None:
    assert split_question_options("Which? A. x C. y B. z")[1] == {}


def test_more_than_ten_options_are_an_error() -> None:
    lines = [f"{letter}. option {letter}" for letter in "ABCDEFGHIJK"]
    with pytest.raises(OptionParseError, match="option K after option J"):
        split_question_options("Which?\n" + "\n".join(lines))


def test_ten_options_are_fine() -> None:
    lines = [f"{letter}. option {letter}" for letter in "ABCDEFGHIJ"]
    _, options = split_question_options("Which?\n" + "\n".join(lines))
    assert list(options) == list("ABCDEFGHIJ")


def test_a_single_option_is_not_an_option_list() -> None:
    assert split_question_options("Which?\nA. Only one") == ("Which?\nA. Only one", {})


def test_text_without_options() -> None:
    assert split_question_options("  Describe the image.  ") == ("Describe the image.", {})


def test_trailing_instruction_line_is_dropped() -> None:
    text = (
        "Which finding?\nA. Cyst\nB. Abscess\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert split_question_options(text) == ("Which finding?", {"A": "Cyst", "B": "Abscess"})


def test_instruction_glued_to_the_last_option_is_dropped() -> None:
    text = "Which finding?\nA. Cyst\nB. Abscess Answer with the option's letter directly."
    assert split_question_options(text)[1] == {"A": "Cyst", "B": "Abscess"}


def test_instruction_after_inline_options_is_dropped() -> None:
    text = "Which finding? Options: (A) Cyst (B) Abscess. Please answer with a letter."
    assert split_question_options(text)[1] == {"A": "Cyst", "B": "Abscess"}


def test_option_text_that_reads_like_an_instruction_is_kept() -> None:
    _, options = split_question_options("What next?\nA. Please answer the phone\nB. Wait")
    assert options == {"A": "Please answer the phone", "B": "Wait"}


def test_bare_answer_cue_after_options_is_dropped() -> None:
    assert split_question_options("Which?\nA. x\nB. y\nAnswer:")[0] == "Which?"


def test_other_text_after_the_options_stays_in_the_question() -> None:
    text = "Consider the lesion.\nA) Cyst\nB) Abscess\nWhich of the above fits best?"
    assert split_question_options(text) == (
        "Consider the lesion.\nWhich of the above fits best?",
        {"A": "Cyst", "B": "Abscess"},
    )


def test_two_option_lists_are_an_error_not_a_guess() -> None:
    text = "Lesion sizes:\nA: 5 mm\nB: 9 mm\nWhich grows? (A) The first (B) The second"
    with pytest.raises(OptionParseError, match="two option lists"):
        split_question_options(text)


def test_image_placeholders_are_removed() -> None:
    assert strip_image_placeholders("<image>\n<image_2>\nWhat is shown?") == "What is shown?"


def test_explicit_options_as_list_and_dict() -> None:
    assert options_from_value(["Cyst", "Abscess"]) == {"A": "Cyst", "B": "Abscess"}
    assert options_from_value({"B": "Abscess", "a": "Cyst"}) == {"A": "Cyst", "B": "Abscess"}
    assert options_from_value(["A. Cyst", "(B) Abscess"]) == {"A": "Cyst", "B": "Abscess"}
    assert options_from_value([1, 2.5]) == {"A": "1", "B": "2.5"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["only one"], "1 options"),
        ([f"o{i}" for i in range(11)], "11 options"),
        ({"A": "x", "C": "y"}, "not consecutive"),
        ({"A": "x", "K": "y"}, "not a letter"),
        (["x", ""], "option B is empty"),
        (["x", None], "not text"),
        ("A. x B. y", "must be a dict or a list"),
    ],
)
def test_invalid_explicit_options(value: object, message: str) -> None:
    with pytest.raises(OptionParseError, match=message):
        options_from_value(value)
