"""The rollout engine protocol: what the trainer needs from any generation backend.

An engine turns prompts into groups of n sampled completions with per-token log-probs, and takes new
weights from the learner. `policy_version` counts the weight updates it has loaded, so every group
records which policy produced it. The HF transformers engine (hf.py) and the vLLM engine implement it.

Who receives the weight broadcast: the HF engine's model lives in the rollout worker's process, so
the worker joins the sync group and feeds `receive_weights(group, plan)` to `load_weights`. The
vLLM engine's model lives in vLLM's worker processes (one per tensor-parallel rank), which must
each join the group themselves: such an engine implements `SyncingEngine` as well (its spec says
`sync_in_engine`, rollout/spec.py), and the rollout worker delegates joining and receiving to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from gmai_rl.sync.buckets import Bucket
from gmai_rl.types import Group, Prompt, SamplingParams


class EngineBrokenError(RuntimeError):
    """The engine can no longer generate or take weights: replace it (a new worker).

    Raised when a weight update failed inside vLLM's in-place reload, which moves every layer to
    the meta device at its start and restores a layer only once its weights are loaded, with no
    rollback: a reload that stops midway leaves the model partly on meta tensors, partly new,
    partly old. Defined here, below the cluster, so that the rollout worker raises it and the
    cluster recognises it without either importing the other's layer.
    """


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


@runtime_checkable
class SyncingEngine(Protocol):
    """An engine whose model runs in processes of its own, which join the sync group themselves."""

    def sync_members(self) -> int:
        """How many sync-group ranks this engine takes (vLLM: one per TP x PP worker)."""
        ...

    def join_sync_group(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        generation: int = 0,
    ) -> None:
        """Join as ranks rank .. rank + sync_members() - 1, leaving any earlier group; blocks
        until the group is complete (`init_sync_group`'s `generation`)."""
        ...

    def receive_weights(self, plan: Sequence[Bucket], verify: bool = False) -> dict[str, Any]:
        """Take one push and load it: {"loaded": n, "checksums": of the received tensors | None}."""
        ...

    def leave_sync_group(self) -> None: ...
