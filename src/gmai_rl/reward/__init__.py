"""Rewards. `mcq` is pure Python; the Ray reward actor lives in `worker.py` and is never imported
here, so `import gmai_rl.reward` stays free of Ray, vLLM, DeepSpeed and torch."""

from gmai_rl.reward.mcq import RewardBreakdown, extract_choice, mcq_reward

__all__ = ["RewardBreakdown", "extract_choice", "mcq_reward"]
