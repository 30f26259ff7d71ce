"""Length shaping for completions near the generation budget: DAPO's soft overlong punishment.

Why: a completion cut at `rollout.max_new_tokens` (finish_reason "length") usually has no closed
answer block, so the rule reward gives it 0, the same as a wrong answer, and the policy is not told
that length was the fault. DAPO (arXiv 2503.14476, section 3.4) adds a penalty that grows over the
last `buffer` tokens of the budget, so running long costs a little before it costs everything.
Left out: DAPO's overlong filtering (masking truncated samples out of the loss); here a truncated
completion trains like any other, with its reward.
"""

from __future__ import annotations

import math

OVERLONG = "overlong"
"""The breakdown key holding a completion's length penalty (present only when shaping is on); it
is already added into "total"."""


def soft_overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """factor * R_length(|y|), DAPO's soft overlong punishment (Yu et al., "DAPO: An Open-Source
    LLM Reinforcement Learning System at Scale", arXiv 2503.14476, eq. 13).

    With |y| = `length` (generated token ids), L_max = `max_tokens` (the generation budget) and
    L_cache = `buffer`:

        R_length(|y|) = 0                                     if |y| <= L_max - L_cache
                        ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                        -1                                    if |y| > L_max

    so the penalty falls linearly from 0 to -factor over the budget's last `buffer` tokens, and a
    completion cut at the budget (|y| == L_max) gets -factor. `buffer` 0 turns shaping off: 0.0
    for every length.

    Raises ValueError for a negative length, max_tokens < 1, buffer outside [0, max_tokens), or a
    factor that is negative or not finite.
    """
    if length < 0:
        raise ValueError(f"overlong penalty: length={length} must be >= 0")
    if max_tokens < 1:
        raise ValueError(f"overlong penalty: max_tokens={max_tokens} must be >= 1")
    if not 0 <= buffer < max_tokens:
        raise ValueError(
            f"overlong penalty: buffer={buffer} must be >= 0 and < max_tokens={max_tokens}"
        )
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"overlong penalty: factor={factor} must be finite and >= 0")
    if buffer == 0:
        return 0.0
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    if length > max_tokens:
        return -factor
    return factor * (start - length) / buffer
