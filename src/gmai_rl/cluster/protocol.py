"""What the driver asks of a cluster, as a `Protocol` (no Ray).

`gmai_rl.cluster.cluster.Cluster` is the real one; the tests drive the loop and the pipeline
with one fake of it (tests/support.py, `FakeCluster`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gmai_rl.learner.options import OptimOptions
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams, TrainSample


class TrainingCluster(Protocol):
    """The stages of a run, each on every actor it needs; see `Cluster` for what each does."""

    @property
    def version(self) -> int:
        """The policy version the rollout workers hold (weight pushes loaded)."""
        ...

    @property
    def rollout_restarts(self) -> int: ...

    @property
    def reward_restarts(self) -> int: ...

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[Group]: ...

    def score(self, groups: Sequence[Group], items: Sequence[MCQItem]) -> None: ...

    def start_stage(self, optim: OptimOptions, reset_reference: bool = False) -> None: ...

    def train(self, samples: Sequence[TrainSample], num_minibatches: int) -> dict[str, float]: ...

    def train_sft(self, samples: Sequence[TrainSample]) -> dict[str, float]: ...

    def sleep_rollouts(self) -> None: ...

    def wake_rollouts(self) -> None: ...

    def sync_weights(self, verify: bool) -> int: ...

    def save_state(self, folder: str) -> None: ...

    def restore_state(self, folder: str, policy_version: int) -> None: ...

    def save(self, path: str) -> None: ...

    def shutdown(self) -> None: ...
