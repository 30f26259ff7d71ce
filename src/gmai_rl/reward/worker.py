"""The reward worker: scores completions against their items, as a Ray actor or in process.

The default rule is `mcq_reward` (format + accuracy). A user reward is any function
`fn(completion: str, item: MCQItem) -> dict[str, float]` named by a dotted path in the config
("my_pkg.rewards:score" or "my_pkg.rewards.score"); its dict must hold a float "total", and any other
float it holds (e.g. "accuracy", "format") is logged. This module imports no Ray: the trainer wraps
the class with `ray.remote` where it places the actors.

A reward function that raises on a completion, or returns something unusable for it, does not end
the step: that completion scores {"total": 0.0, "reward_failed": 1.0} (`REWARD_FAILED`), the step
counts it (`reward_failures` in metrics.jsonl) and each worker logs the first few tracebacks with
the item's id and source. A step where every completion failed is stopped by the driver: that is a
broken reward function, not a fault of one sample.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence

from gmai_rl.reward.mcq import mcq_reward
from gmai_rl.types import MCQItem, failed_reward

log = logging.getLogger(__name__)

LOGGED_FAILURES = 3
"""Tracebacks each reward worker logs; later failures are counted, not logged."""

RewardFn = Callable[[str, MCQItem], dict[str, float]]


def resolve_reward_fn(path: str) -> RewardFn:
    """Import `module:attr` or `module.attr` and return the callable it names."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward function {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def mcq_rule(format_weight: float) -> RewardFn:
    def score(completion: str, item: MCQItem) -> dict[str, float]:
        return mcq_reward(completion, item.answer, item.options, format_weight).as_dict()

    return score


def check_breakdown(breakdown: object, source: str) -> dict[str, float]:
    """A reward's result must be a dict of finite floats with a "total"."""
    if not isinstance(breakdown, dict) or "total" not in breakdown:
        raise ValueError(f"reward {source} must return a dict with a 'total', got {breakdown!r}")
    out = {}
    for key, value in breakdown.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(
                f"reward {source} returned a non-finite or non-numeric {key}={value!r}"
            )
        out[str(key)] = float(value)
    return out


class RewardWorker:
    def __init__(self, reward_fn: str | None = None, format_weight: float = 0.5) -> None:
        self.source = reward_fn or "mcq_reward"
        self.fn = resolve_reward_fn(reward_fn) if reward_fn else mcq_rule(format_weight)
        self.failures = 0

    def ping(self) -> str:
        return self.source

    def score(self, pairs: Sequence[tuple[str, MCQItem]]) -> list[dict[str, float]]:
        """One breakdown per (completion text, item) pair, in order."""
        return [self._score_one(text, item) for text, item in pairs]

    def _score_one(self, text: str, item: MCQItem) -> dict[str, float]:
        try:
            return check_breakdown(self.fn(text, item), self.source)
        except Exception:
            self.failures += 1
            if self.failures <= LOGGED_FAILURES:
                log.warning(
                    "reward %s failed on item %s (%s): scored 0 and counted in reward_failures%s",
                    self.source,
                    item.id,
                    item.source,
                    "; further failures are counted, not logged"
                    if self.failures == LOGGED_FAILURES
                    else "",
                    exc_info=True,
                )
            return failed_reward()
