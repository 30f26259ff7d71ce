"""The reward worker: default MCQ rule, user functions by dotted path, validation of results."""

import logging
import math

import pytest

from gmai_rl.reward.worker import (
    LOGGED_FAILURES,
    RewardWorker,
    check_breakdown,
    resolve_reward_fn,
)
from gmai_rl.types import REWARD_FAILED, MCQItem

ITEM = MCQItem("q1", "Where is the lesion?", {"A": "Left", "B": "Right"}, "B")


def length_reward(completion: str, item: MCQItem) -> dict[str, float]:
    return {"total": float(len(completion)), "answer_is_b": float(item.answer == "B")}


def test_default_rule_is_the_mcq_reward():
    worker = RewardWorker(format_weight=0.5)
    good, wrong = (
        "<think>bright on the right</think><answer>B</answer>",
        "<think>x</think><answer>A</answer>",
    )
    assert worker.score([(good, ITEM), (wrong, ITEM)]) == [
        {"format": 1.0, "accuracy": 1.0, "total": 1.5},
        {"format": 1.0, "accuracy": 0.0, "total": 0.5},
    ]


@pytest.mark.parametrize("path", [f"{__name__}:length_reward", f"{__name__}.length_reward"])
def test_user_reward_by_dotted_path(path):
    worker = RewardWorker(reward_fn=path)
    assert worker.score([("abc", ITEM)]) == [{"total": 3.0, "answer_is_b": 1.0}]


@pytest.mark.parametrize(
    "path", ["nope", "no_such_module:fn", f"{__name__}:missing", f"{__name__}:ITEM"]
)
def test_bad_reward_paths_are_named(path):
    with pytest.raises(ValueError, match="reward function"):
        resolve_reward_fn(path)


@pytest.mark.parametrize("bad", [None, {"accuracy": 1.0}, {"total": "1"}, {"total": math.nan}])
def test_bad_breakdowns_are_rejected(bad):
    with pytest.raises(ValueError, match="my_fn"):
        check_breakdown(bad, "my_fn")


# ------------------------------------------------------------------ faults in a user's reward


def picky_reward(completion: str, item: MCQItem) -> dict[str, float]:
    """Raises on "boom", returns NaN on "nan", scores the rest by length."""
    if completion == "boom":
        raise KeyError("no such finding")
    return {"total": math.nan if completion == "nan" else float(len(completion))}


def test_a_reward_that_fails_on_some_completions_scores_them_zero_and_marks_them(caplog):
    worker = RewardWorker(reward_fn=f"{__name__}:picky_reward")
    with caplog.at_level(logging.WARNING, "gmai_rl.reward.worker"):
        got = worker.score([("ab", ITEM), ("boom", ITEM), ("nan", ITEM), ("abc", ITEM)])
    assert got == [
        {"total": 2.0},
        {"total": 0.0, REWARD_FAILED: 1.0},
        {"total": 0.0, REWARD_FAILED: 1.0},
        {"total": 3.0},
    ]
    first, second = caplog.records
    assert "failed on item q1" in first.getMessage() and "KeyError" in first.exc_text
    assert "non-finite" in second.exc_text


def test_only_the_first_failures_are_logged_and_every_one_is_counted(caplog):
    worker = RewardWorker(reward_fn=f"{__name__}:picky_reward")
    with caplog.at_level(logging.WARNING, "gmai_rl.reward.worker"):
        got = worker.score([("boom", ITEM)] * (LOGGED_FAILURES + 4))
    assert all(r[REWARD_FAILED] == 1.0 for r in got)
    assert worker.failures == LOGGED_FAILURES + 4
    assert len(caplog.records) == LOGGED_FAILURES
    assert "further failures are counted, not logged" in caplog.records[-1].getMessage()


# ------------------------------------------------------------------ overlong shaping

THOUGHT = "<think>bright on the right</think><answer>B</answer>"
CUT = "<think>the lesion is bright on the right, which suggests"  # cut at the budget


def test_a_truncated_completion_without_an_answer_is_scored_normally():
    worker = RewardWorker(format_weight=0.5)
    assert (
        worker.score([(CUT, ITEM), (CUT, ITEM, 48)])
        == [{"format": 0.0, "accuracy": 0.0, "total": 0.0}] * 2
    )


def test_shaping_off_leaves_every_breakdown_exactly_the_functions():
    off = RewardWorker(format_weight=0.5, max_new_tokens=48, overlong_buffer=0)
    plain = RewardWorker(format_weight=0.5)
    pairs = [(THOUGHT, ITEM), (CUT, ITEM), ("<answer>B</answer>", ITEM)]
    with_lengths = [(text, item, n) for (text, item), n in zip(pairs, [48, 48, 3], strict=True)]
    assert off.score(with_lengths) == plain.score(pairs)
    assert all("overlong" not in r for r in off.score(with_lengths))


def test_shaping_adds_the_length_penalty_into_the_total_and_records_it():
    worker = RewardWorker(format_weight=0.5, max_new_tokens=48, overlong_buffer=8)
    got = worker.score([(THOUGHT, ITEM, 40), (THOUGHT, ITEM, 44), (CUT, ITEM, 48)])
    assert got == [
        {"format": 1.0, "accuracy": 1.0, "total": 1.5, "overlong": 0.0},
        {"format": 1.0, "accuracy": 1.0, "total": 1.0, "overlong": -0.5},
        {"format": 0.0, "accuracy": 0.0, "total": -1.0, "overlong": -1.0},
    ]
    scaled = RewardWorker(max_new_tokens=48, overlong_buffer=8, overlong_penalty=0.25)
    assert scaled.score([(CUT, ITEM, 48)])[0]["total"] == -0.25


def test_a_failed_completion_keeps_its_failed_breakdown_under_shaping():
    worker = RewardWorker(f"{__name__}:picky_reward", max_new_tokens=8, overlong_buffer=4)
    assert worker.score([("boom", ITEM, 8), ("ab", ITEM, 8)]) == [
        {"total": 0.0, REWARD_FAILED: 1.0},
        {"total": 1.0, "overlong": -1.0},
    ]


def test_shaping_needs_the_token_counts_and_valid_arguments():
    with pytest.raises(ValueError, match="token count"):
        RewardWorker(max_new_tokens=48, overlong_buffer=8).score([(THOUGHT, ITEM)])
    with pytest.raises(ValueError, match="buffer=48 must be >= 0 and < max_tokens=48"):
        RewardWorker(max_new_tokens=48, overlong_buffer=48)
