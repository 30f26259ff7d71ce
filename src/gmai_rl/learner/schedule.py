"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step, set on the optimizer before each update, so the SFT and RL stages
can each start their own schedule on the same DeepSpeed engine.
"""

from __future__ import annotations

import math


def lr_at(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Warmup rises linearly from base_lr/warmup_steps at step 0 to base_lr at step warmup_steps-1;
    then the rate follows half a cosine from base_lr to min_lr_ratio*base_lr at total_steps, and
    stays there after it.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min_lr_ratio * base_lr
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
