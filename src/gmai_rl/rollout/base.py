"""The rollout engine protocol: what the trainer needs from any generation backend.

An engine turns prompts into groups of n sampled completions with per-token log-probs, and takes new
weights from the learner. `policy_version` counts the weight updates it has loaded, so every group
records which policy produced it. The HF transformers engine (hf.py) and the vLLM engine implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from gmai_rl.types import Group, Prompt, SamplingParams


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions for each prompt, one Group per prompt in input order."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (HF parameter name, tensor) pairs into the running model; returns how many."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The engine's current weights under HF parameter names (for verification)."""
        ...
