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
