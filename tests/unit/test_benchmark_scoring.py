"""The benchmark scorer decides every number we publish, so each adversarial answer asserts the
exact outcome: right or wrong, what was read, and why. A loose rule ("contains the letter",
"contains no") shows up here as a hedge or a non-answer that scores. The rules are written out in
the docstring of gmai_rl.benchmarks.scoring; the summary's shape in gmai_rl.benchmarks.results.
"""

from __future__ import annotations

import pytest

from gmai_rl.benchmarks.items import MODALITY, BenchItem, Kind
from gmai_rl.benchmarks.results import flat_metrics, summarize
from gmai_rl.benchmarks.scoring import Score, load_judge, score, wilson_interval

BRAIN = {"A": "Meningioma", "B": "Glioma", "C": "Lymphoma", "D": "Metastasis"}
MCQ = BenchItem("toy", "mcq", "Which tumour is shown?", Kind.MCQ, "B", options=BRAIN)
# A and C share a text: "Glioma" names two options.
TWINS = BenchItem(
    "toy", "twins", "q", Kind.MCQ, "B", options={"A": "Glioma", "B": "Abscess", "C": "glioma."}
)


def closed(gold: str) -> BenchItem:
    return BenchItem("toy", f"closed-{gold}", "q", Kind.CLOSED, gold)


def open_item(gold: str) -> BenchItem:
    return BenchItem("toy", f"open-{gold}", "q", Kind.OPEN, gold)


NO, ZH_NO, ZH_YES = closed("No"), closed("否"), closed("是")
LEFT_LUNG, CT = closed("Left Lung"), closed("CT")

# (id, item, completion, correct, extracted, reason)
CASES = [
    # Multiple choice: what reads as one option.
    ("letter", MCQ, "B", True, "B", "letter"),
    ("letter-dressed", MCQ, "(B)", True, "B", "letter"),
    ("letter-period", MCQ, "B.", True, "B", "letter"),
    ("letter-and-text", MCQ, "B. Glioma", True, "B", "letter"),
    ("lowercase-letter", MCQ, "b", True, "B", "letter"),
    ("lowercase-statement", MCQ, "the answer is b", True, "B", "statement"),
    ("option-text", MCQ, "Glioma", True, "B", "option_text"),
    ("option-text-case-period", MCQ, "glioma.", True, "B", "option_text"),
    ("article-then-text", MCQ, "A glioma", True, "B", "option_text"),
    ("boxed", MCQ, "\\boxed{B}", True, "B", "boxed"),
    ("boxed-text-nested", MCQ, "Final answer: \\boxed{\\text{B}}", True, "B", "boxed"),
    ("markdown-statement", MCQ, "**Answer**: (B) Glioma", True, "B", "statement"),
    ("chinese-statement", MCQ, "答案是B", True, "B", "statement"),
    ("block", MCQ, "<think>A or C?</think><answer>B</answer>", True, "B", "letter"),
    ("repeated-same-block", MCQ, "<answer>B</answer> <answer> B </answer>", True, "B", "letter"),
    # Outside <answer>: harness-style replies.
    ("outside-block", MCQ, "It enhances avidly. The answer is B.", True, "B", "statement"),
    ("after-think", MCQ, "<think>A or C?</think>\nThe answer is B", True, "B", "statement"),
    ("after-think-bare", MCQ, "<think>Not A.</think>\nB", True, "B", "letter"),
    ("last-statement-wins", MCQ, "The answer is A. Wait, the answer is B.", True, "B", "statement"),
    # The article "A" is not option A; a later statement decides.
    ("article-sentence", MCQ, "A mass is seen in the left lobe.", False, None, "no_answer"),
    ("article-then-statement", MCQ, "A mass is seen. The answer is C", False, "C", "statement"),
    ("statement-article", MCQ, "The answer is a mass lesion.", False, None, "no_answer"),
    # Hedges and non-answers: no answer, never a guess.
    ("several-letters-or", MCQ, "A or B", False, None, "several_letters"),
    ("several-letters-and", MCQ, "A and C", False, None, "several_letters"),
    ("last-statement-hedges", MCQ, "The answer is A. No, the answer is A or B.", False, None,
     "several_letters"),
    # Only statements are read after one: a hedge in prose after it goes unseen (documented).
    ("prose-after-statement", MCQ, "The answer is B. Maybe C.", True, "B", "statement"),
    ("statement-hedges", MCQ, "The answer is B or C.", False, None, "several_letters"),
    ("empty", MCQ, "", False, None, "empty"),
    ("empty-block", MCQ, "<answer> </answer>", False, None, "empty"),
    ("echo-inline", MCQ, "A. Meningioma B. Glioma C. Lymphoma D. Metastasis", False, None,
     "echoed_options"),
    ("echo-lines", MCQ, "(A) Meningioma\n(B) Glioma\n(C) Lymphoma\n(D) Metastasis", False, None,
     "echoed_options"),
    ("letter-text-disagree", MCQ, "<answer>B. Lymphoma</answer>", False, None, "no_answer"),
    ("two-blocks", MCQ, "<answer>B</answer> or <answer>C</answer>", False, None,
     "several_answer_blocks"),
    ("unclosed-think", MCQ, "<think>The answer is B", False, None, "unclosed_think"),
    ("unclosed-block", MCQ, "<answer>B", False, None, "unclosed_answer_block"),
    ("not-an-option", MCQ, "E", False, None, "no_answer"),
    ("letter-in-prose", MCQ, "B is correct", False, None, "no_answer"),
    ("letter-in-pronoun-prose", MCQ, "I think it is B", False, None, "no_answer"),
    ("text-of-two-options", TWINS, "Glioma", False, None, "no_answer"),
    # Closed yes/no: whole words only.
    ("no", NO, "no", True, "no", "yes_no"),
    ("No.", NO, "No.", True, "no", "yes_no"),
    ("no-there-is-no", NO, "No, there is no fracture.", True, "no", "yes_no"),
    ("no-upper", NO, "NO", True, "no", "yes_no"),
    ("no-markdown", NO, "**No**", True, "no", "yes_no"),
    ("no-statement", NO, "The answer is no.", True, "no", "yes_no"),
    ("normal-is-not-no", NO, "Normal.", False, None, "no_answer"),
    ("not-is-not-no", NO, "It is not fractured", False, None, "no_answer"),
    ("yesterday-is-not-yes", NO, "Seen yesterday", False, None, "no_answer"),
    ("yes", NO, "Yes", False, "yes", "yes_no"),
    ("yes-and-no", NO, "Yes, there is no fracture", False, None, "yes_and_no"),
    ("think-ignored", NO, "<think>no</think>Yes", False, "yes", "yes_no"),
    ("yes-no-empty", NO, "", False, None, "empty"),
    ("chinese-for-english-gold", NO, "否", True, "no", "yes_no"),
    # Closed Chinese yes/no: the whole answer, since 是 is inside most sentences.
    ("zh-no", ZH_NO, "否", True, "no", "yes_no"),
    ("zh-no-punctuation", ZH_NO, "否。", True, "no", "yes_no"),
    ("zh-not-is", ZH_NO, "不是", True, "no", "yes_no"),
    ("zh-yes-wrong", ZH_NO, "是", False, "yes", "yes_no"),
    ("zh-sentence-holding-shi", ZH_NO, "这是肝脏", False, None, "no_answer"),
    ("zh-sentence-yes-and-no", ZH_NO, "是的，没有骨折", False, None, "no_answer"),
    ("english-for-chinese-gold", ZH_NO, "No", True, "no", "yes_no"),
    ("zh-yes", ZH_YES, "是的", True, "yes", "yes_no"),
    # Closed short answers: normalised exact match.
    ("short-article-case", LEFT_LUNG, "The left lung", True, "The left lung", "exact"),
    ("short-period", LEFT_LUNG, "left lung.", True, "left lung.", "exact"),
    ("short-statement", LEFT_LUNG, "Answer: The left lung.", True, "The left lung", "exact"),
    ("short-other", LEFT_LUNG, "Right lung", False, "Right lung", "inexact"),
    ("short-longer", LEFT_LUNG, "The left lung is affected", False, "The left lung is affected",
     "inexact"),
    ("short-ct", CT, "CT", True, "CT", "exact"),
    ("short-ct-scan", CT, "CT scan", False, "CT scan", "inexact"),
    ("short-mri", CT, "MRI", False, "MRI", "inexact"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("item", "completion", "correct", "extracted", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_score(
    item: BenchItem, completion: str, correct: bool, extracted: str | None, reason: str
) -> None:
    result = score(item, completion)
    assert (result.correct, result.extracted, result.reason) == (correct, extracted, reason)
    assert (result.f1, result.recall, result.exact, result.scored_by) == (None, None, None, "rules")


# Token F1 and recall by hand, over normalised tokens (articles and punctuation dropped):
# "left lung is consolidated" vs "left lung": overlap 2, P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3.
# "upper lobe of left lung" vs "right upper lobe": overlap 2, P = 2/5, R = 2/3, F1 = 0.5.
OPEN_CASES = [
    ("sentence-holding-gold", "left lung", "The left lung is consolidated.", False, 2 / 3, 1.0),
    ("exact", "left lung", "Left lung.", True, 1.0, 1.0),
    ("partial", "right upper lobe", "upper lobe of the left lung", False, 0.5, 2 / 3),
    ("repeated-token", "left lung", "lung lung", False, 0.5, 0.5),
    ("chinese-per-character", "左肺", "左肺下叶", False, 2 / 3, 1.0),
    ("statement", "left lung", "<think>x</think>The answer is: left lung.", True, 1.0, 1.0),
    ("no-answer", "left lung", "<answer>left</answer><answer>right</answer>", False, 0.0, 0.0),
    ("empty", "left lung", "", False, 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("gold", "completion", "exact", "f1", "recall"),
    [case[1:] for case in OPEN_CASES],
    ids=[case[0] for case in OPEN_CASES],
)
def test_open_scores(gold: str, completion: str, exact: bool, f1: float, recall: float) -> None:
    result = score(open_item(gold), completion)
    assert result.exact is exact
    assert result.correct is exact
    assert result.f1 == pytest.approx(f1)
    assert result.recall == pytest.approx(recall)
    assert result.scored_by == "rules"


def always_right(item: BenchItem, answer_text: str) -> bool:
    return True


def half_sure(item: BenchItem, answer_text: str) -> float:
    return 0.5 if "lung" in answer_text else 0.2


def out_of_range(item: BenchItem, answer_text: str) -> float:
    return 2.0


def broken(item: BenchItem, answer_text: str) -> bool:
    raise KeyError("no API key")


def test_judge_scores_open_questions_only() -> None:
    judge = load_judge(f"{__name__}:always_right")
    assert judge is not None
    opened = score(open_item("left lung"), "Right lung.", judge)
    assert (opened.correct, opened.exact, opened.reason) == (True, False, "judge")
    assert opened.scored_by == f"judge:{__name__}:always_right"
    assert opened.f1 == pytest.approx(0.5)  # the rules' numbers are kept beside the verdict
    # No answer: the judge is not asked.
    nothing = score(open_item("left lung"), "<think>still thinking", judge)
    assert (nothing.correct, nothing.reason) == (False, "unclosed_think")
    assert nothing.scored_by == f"judge:{__name__}:always_right"
    # MCQ and closed questions stay with the rules.
    assert score(MCQ, "A", judge).correct is False
    assert score(NO, "Yes", judge).scored_by == "rules"


def test_judge_numbers_and_failures() -> None:
    dotted = load_judge(f"{__name__}.half_sure")
    assert score(open_item("x"), "left lung", dotted).correct is True
    assert score(open_item("x"), "liver", dotted).correct is False
    with pytest.raises(ValueError, match=r"returned 2\.0"):
        score(open_item("x"), "liver", load_judge(f"{__name__}:out_of_range"))
    with pytest.raises(RuntimeError, match="toy/open-x"):
        score(open_item("x"), "liver", load_judge(f"{__name__}:broken"))


def test_load_judge() -> None:
    assert load_judge(None) is None
    assert load_judge("") is None
    with pytest.raises(ValueError, match=r"judge 'judges\.py'"):
        load_judge("judges.py")
    with pytest.raises(ValueError, match=r"judge 'os\.path:no_such_judge'"):
        load_judge("os.path:no_such_judge")


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (8, 10, (0.4902, 0.9433)),
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (1, 2, (0.0945, 0.9055)),
        (0, 0, (0.0, 1.0)),
    ],
)
def test_wilson_interval(k: int, n: int, expected: tuple[float, float]) -> None:
    assert wilson_interval(k, n) == pytest.approx(expected, abs=5e-5)


def test_wilson_interval_bounds_are_exact_and_checked() -> None:
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
    for k, n in [(3, 2), (-1, 2)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def _item(id: str, kind: Kind, answer: str, **fields: str) -> BenchItem:
    options = BRAIN if kind is Kind.MCQ else {}
    return BenchItem("vqa-rad", id, "q", kind, answer, options=options, fields=fields)


def test_summarize_and_flat_metrics() -> None:
    scored = [
        (item, score(item, completion))
        for item, completion in [
            (_item("1", Kind.MCQ, "B", modality="CT"), "B"),  # right
            (_item("2", Kind.MCQ, "A", modality="CT"), "B"),  # wrong
            (_item("3", Kind.MCQ, "C", modality="MRI"), "A or C"),  # no answer
            (_item("4", Kind.CLOSED, "no", modality="CT"), "No."),  # right
            (_item("5", Kind.CLOSED, "yes"), "yes"),  # right, no modality
            (_item("6", Kind.OPEN, "left lung", modality="X-Ray"), "left lung"),  # em, f1 1
            (_item("7", Kind.OPEN, "left lung"), "The left lung is consolidated"),  # f1 2/3
        ]
    ]
    other = BenchItem("slake", "1", "q", Kind.CLOSED, "yes")
    summary = summarize([*scored, (other, score(other, "no"))])

    assert list(summary) == ["slake", "vqa-rad"]
    rad = summary["vqa-rad"]
    # Graded: 5 questions (3 MCQ, 2 closed), 3 right.
    assert (rad["n"], rad["n_graded"], rad["accuracy"]) == (7, 5, pytest.approx(3 / 5))
    assert rad["ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    assert rad["no_answer_rate"] == pytest.approx(1 / 7)
    assert rad["by_kind"]["mcq"]["accuracy"] == pytest.approx(1 / 3)
    assert rad["by_kind"]["closed"] == {"n": 2, "accuracy": 1.0, "ci95": [pytest.approx(0.3424, abs=5e-5), 1.0]}  # fmt: skip
    assert rad["open"] == {
        "n": 2,
        "exact_match": 0.5,
        "f1": pytest.approx((1 + 2 / 3) / 2),
        "recall": 1.0,
        "no_answer_rate": 0.0,
        "scored_by": "rules",
        "comparable_to_judge_scores": False,
    }
    # Item 5 has no modality, and X-Ray is only an open question's: neither is in the table.
    assert rad["by"] == {
        MODALITY: {
            "CT": {"n": 3, "accuracy": pytest.approx(2 / 3), "ci95": pytest.approx(list(wilson_interval(2, 3)))},
            "MRI": {"n": 1, "accuracy": 0.0, "ci95": pytest.approx(list(wilson_interval(0, 1)))},
        }
    }  # fmt: skip
    assert rad["answer_letters"] == {"B": 2, "none": 1}
    assert summary["slake"]["accuracy"] == 0.0
    assert summary["slake"]["open"] is None

    flat = flat_metrics({"vqa-rad": rad})
    assert flat == {
        "bench/vqa-rad/n": 7.0,
        "bench/vqa-rad/n_graded": 5.0,
        "bench/vqa-rad/accuracy": pytest.approx(0.6),
        "bench/vqa-rad/ci95_low": pytest.approx(rad["ci95"][0]),
        "bench/vqa-rad/ci95_high": pytest.approx(rad["ci95"][1]),
        "bench/vqa-rad/no_answer_rate": pytest.approx(1 / 7),
        "bench/vqa-rad/mcq/accuracy": pytest.approx(1 / 3),
        "bench/vqa-rad/mcq/n": 3.0,
        "bench/vqa-rad/closed/accuracy": 1.0,
        "bench/vqa-rad/closed/n": 2.0,
        "bench/vqa-rad/open/n": 2.0,
        "bench/vqa-rad/open/exact_match": 0.5,
        "bench/vqa-rad/open/f1": pytest.approx(5 / 6),
        "bench/vqa-rad/open/recall": 1.0,
        "bench/vqa-rad/open/no_answer_rate": 0.0,
        "bench/vqa-rad/modality/ct": pytest.approx(2 / 3),
        "bench/vqa-rad/modality/ct/n": 3.0,
        "bench/vqa-rad/modality/mri": 0.0,
        "bench/vqa-rad/modality/mri/n": 1.0,
        "bench/vqa-rad/answer_letters/b": 2.0,
        "bench/vqa-rad/answer_letters/none": 1.0,
    }


def test_summarize_with_a_judge() -> None:
    judge = load_judge(f"{__name__}:half_sure")
    items = [_item("1", Kind.OPEN, "left lung"), _item("2", Kind.OPEN, "liver")]
    scored = [
        (item, score(item, text, judge))
        for item, text in zip(items, ["lung", "spleen"], strict=True)
    ]
    rad = summarize(scored)["vqa-rad"]
    assert (rad["n_graded"], rad["accuracy"], rad["by_kind"], rad["by"]) == (0, None, {}, {})
    assert rad["open"]["scored_by"] == f"judge:{__name__}:half_sure"
    assert rad["open"]["accuracy"] == 0.5
    assert rad["open"]["exact_match"] == 0.0
    assert flat_metrics({"vqa-rad": rad})["bench/vqa-rad/open/accuracy"] == 0.5
    assert "bench/vqa-rad/accuracy" not in flat_metrics({"vqa-rad": rad})


def test_summarize_refuses_double_scoring_and_mixed_scorers() -> None:
    item = _item("1", Kind.OPEN, "left lung")
    with pytest.raises(ValueError, match="vqa-rad/1 is scored twice"):
        summarize([(item, score(item, "x")), (item, score(item, "y"))])
    judged = _item("2", Kind.OPEN, "liver")
    mixed = [
        (item, score(item, "x")),
        (judged, score(judged, "y", load_judge(f"{__name__}:always_right"))),
    ]
    with pytest.raises(ValueError, match="several scorers"):
        summarize(mixed)


def test_flat_metrics_refuses_colliding_keys() -> None:
    items = [_item("1", Kind.MCQ, "B", modality="CT"), _item("2", Kind.MCQ, "B", modality="ct")]
    summary = summarize([(item, score(item, "B")) for item in items])
    with pytest.raises(ValueError, match="bench/vqa-rad/modality/ct"):
        flat_metrics(summary)


def test_score_is_a_plain_record() -> None:
    assert Score(True, "B", None, None, "letter") == score(MCQ, "B")
