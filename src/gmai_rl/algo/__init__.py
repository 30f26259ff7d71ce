"""The RL maths as pure torch functions: group advantages, policy loss, KL, online filters.

Plain functions of tensors with explicit scalar arguments and shapes in their docstrings; no
Ray, vLLM, DeepSpeed or transformers import here (tests/unit/test_algo_imports.py checks it).
"""

from gmai_rl.algo.advantages import ESTIMATORS, group_advantages
from gmai_rl.algo.filters import FilterResult, filter_by_accuracy, filter_zero_variance
from gmai_rl.algo.kl import KL_ESTIMATORS, kl_estimate
from gmai_rl.algo.logprobs import entropy_from_logits, linear_token_logprobs, token_logprobs
from gmai_rl.algo.loss import (
    AGG_MODES,
    aggregate,
    logprob_mismatch,
    loss_normalisers,
    policy_loss,
    truncated_is_weights,
)

__all__ = [
    "AGG_MODES",
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "FilterResult",
    "aggregate",
    "entropy_from_logits",
    "filter_by_accuracy",
    "filter_zero_variance",
    "group_advantages",
    "kl_estimate",
    "linear_token_logprobs",
    "logprob_mismatch",
    "loss_normalisers",
    "policy_loss",
    "token_logprobs",
    "truncated_is_weights",
]
