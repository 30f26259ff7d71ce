"""Rewards. `mcq` and `overlong` are pure Python; the Ray reward actor lives in `worker.py` and is
never imported here, so `import gmai_rl.reward` stays free of Ray, vLLM, DeepSpeed and torch."""

from gmai_rl.reward.mcq import RewardBreakdown, extract_choice, mcq_reward
from gmai_rl.reward.overlong import OVERLONG, soft_overlong_penalty

__all__ = ["OVERLONG", "RewardBreakdown", "extract_choice", "mcq_reward", "soft_overlong_penalty"]
