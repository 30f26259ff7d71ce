"""Held-out summaries: what `eval.json` reports about a policy's first answers."""

from gmai_rl.evaluate import answered_letter, summarize
from gmai_rl.types import Completion, Group, MCQItem, Prompt

OPTIONS = {"A": "X-ray", "B": "CT", "C": "MRI", "D": "Ultrasound"}


def item(i: int, answer: str, modality: str) -> MCQItem:
    return MCQItem(f"q{i}", "Which modality?", OPTIONS, answer, modality=modality)


def group(i: int, *texts: str, finish: str = "stop") -> Group:
    completions = [Completion([1], text, finish_reason=finish) for text in texts]
    return Group(Prompt(f"q{i}", []), [0], completions, policy_version=7)


def test_scores_first_completions_by_modality_with_letters_and_examples():
    items = [item(0, "A", "x_ray"), item(1, "B", "ct"), item(2, "B", "ct"), item(3, "C", "mri")]
    loop = "<think>The shows beside beside beside"
    groups = [
        group(0, "<think>bright spine</think><answer>A</answer>", "<answer>B</answer>"),
        group(1, "<think>a rim</think><answer>B</answer>"),
        group(2, "<think>a rim</think><answer>A</answer>"),
        group(3, loop, finish="length"),
    ]
    summary = summarize(groups, items)
    assert summary["accuracy"] == 0.5 and summary["n"] == 4
    assert summary["format_rate"] == 0.75 and summary["truncated_rate"] == 0.25
    assert summary["policy_version"] == 7
    assert summary["accuracy_by_modality"] == {"ct": 0.5, "mri": 0.0, "x_ray": 1.0}
    assert summary["answer_letters"] == {"A": 2, "B": 1, "none": 1}
    assert list(summary["examples"]) == ["ct", "mri", "x_ray"]
    assert summary["examples"]["ct"] == {
        "id": "q1",
        "answer": "B",
        "completion": "<think>a rim</think><answer>B</answer>",
    }
    assert summary["examples"]["mri"]["completion"] == loop


def test_a_letter_outside_the_answer_block_is_not_an_answer():
    q = item(0, "A", "x_ray")
    assert answered_letter("<think>A</think><answer>C</answer>", q) == "C"
    assert answered_letter("<think>it is A</think>", q) is None
