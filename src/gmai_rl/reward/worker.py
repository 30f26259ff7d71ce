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

Overlong shaping (`reward.overlong_buffer` > 0, `gmai_rl.reward.overlong`): each completion that
scored gets DAPO's soft length penalty added into its "total" and recorded as "overlong" (a
function's own "overlong" key is overwritten); a failed completion keeps its failed breakdown.
It needs each completion's generated token count, the third element of what `score` takes. Off,
every breakdown is exactly the function's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from gmai_rl.reward.mcq import mcq_reward
from gmai_rl.reward.overlong import OVERLONG, soft_overlong_penalty
from gmai_rl.reward.plugins import load_plugin, plugin_path_parts
from gmai_rl.types import MCQItem, failed_reward

log = logging.getLogger(__name__)

LOGGED_FAILURES = 3
"""Tracebacks each reward worker logs; later failures are counted, not logged."""

RewardFn = Callable[[str, MCQItem], dict[str, float]]

ToScore = tuple[str, MCQItem] | tuple[str, MCQItem, int]
"""(completion text, item) or (completion text, item, generated token count)."""


def reward_path_parts(path: str) -> tuple[str, str]:
    """(module, attribute) of `reward.fn`; ValueError, before any import, for what is not a
    dotted path of identifiers or names a builtin (`reward.plugins.plugin_path_parts`)."""
    return plugin_path_parts(path, "reward function")


def resolve_reward_fn(path: str) -> RewardFn:
    """Import `module:attr` or `module.attr` and return the callable it names."""
    return load_plugin(path, "reward function")


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
    def __init__(
        self,
        reward_fn: str | None = None,
        format_weight: float = 0.5,
        max_new_tokens: int = 0,
        overlong_buffer: int = 0,
        overlong_penalty: float = 1.0,
    ) -> None:
        """`max_new_tokens`, `overlong_buffer`, `overlong_penalty`: the generation budget and
        the shaping's buffer and factor (`soft_overlong_penalty`); buffer 0 turns it off."""
        self.source = "mcq_reward" if reward_fn is None else reward_fn
        self.fn = mcq_rule(format_weight) if reward_fn is None else resolve_reward_fn(reward_fn)
        self.failures = 0
        self.max_new_tokens = max_new_tokens
        self.overlong_buffer = overlong_buffer
        self.overlong_penalty = overlong_penalty
        if overlong_buffer:  # bad arguments stop the worker's start, not a step
            soft_overlong_penalty(0, max_new_tokens, overlong_buffer, overlong_penalty)

    def ping(self) -> str:
        return self.source

    def score(self, pairs: Sequence[ToScore]) -> list[dict[str, float]]:
        """One breakdown per (completion text, item[, generated token count]), in order; the
        count is required when overlong shaping is on."""
        return [self._score_one(*pair) for pair in pairs]

    def _score_one(self, text: str, item: MCQItem, length: int | None = None) -> dict[str, float]:
        try:
            breakdown = check_breakdown(self.fn(text, item), self.source)
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
        if not self.overlong_buffer:
            return breakdown
        if length is None:
            raise ValueError(
                "overlong shaping (reward.overlong_buffer) needs each completion's generated "
                "token count: score([(text, item, len(token_ids)), ...])"
            )
        penalty = soft_overlong_penalty(
            length, self.max_new_tokens, self.overlong_buffer, self.overlong_penalty
        )
        return {**breakdown, OVERLONG: penalty, "total": breakdown["total"] + penalty}
