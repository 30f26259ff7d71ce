"""A rollout worker: one generation engine plus its end of the weight-sync group.

The trainer runs each worker as a Ray actor (it wraps this class with `ray.remote` where it places
the actors). The worker counts the weight updates it has loaded as its policy version, and every
group it returns carries that version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gmai_rl.models.loading import ModelOptions
from gmai_rl.rollout.base import RolloutEngine
from gmai_rl.sync.buckets import Bucket
from gmai_rl.sync.group import SyncGroup, init_sync_group
from gmai_rl.sync.weights import checksums, receive_weights
from gmai_rl.types import Group, Prompt, SamplingParams


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_engine(
    backend: str, model: ModelOptions, device: str, **engine_kwargs: Any
) -> RolloutEngine:
    if backend == "hf":
        from gmai_rl.rollout.hf import HFEngine

        return HFEngine(model, device=device)
    if backend == "vllm":
        from gmai_rl.rollout.vllm import VLLMEngine  # type: ignore[import-not-found]

        return VLLMEngine(model, **engine_kwargs)  # type: ignore[no-any-return]
    raise ValueError(f"unknown rollout backend {backend!r}; expected 'hf' or 'vllm'")


class RolloutWorker:
    def __init__(
        self,
        backend: str,
        model: ModelOptions,
        device: str = "auto",
        torch_threads: int = 1,
        max_batch_prompts: int = 64,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.engine = make_engine(backend, model, resolve_device(device), **(engine_kwargs or {}))
        self.max_batch_prompts = max_batch_prompts
        self.group: SyncGroup | None = None

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        groups: list[Group] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            groups += self.engine.generate(
                prompts[start : start + self.max_batch_prompts], n, sampling
            )
        return groups

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def get_policy_version(self) -> int:
        return self.engine.policy_version

    def join_sync_group(
        self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        self.group = init_sync_group(host, port, rank, world_size, backend, timeout_s)

    def receive_weights(self, plan: Sequence[Bucket], verify: bool = False) -> dict[str, Any]:
        """Take one push from learner rank 0; returns the new version (and checksums if verify)."""
        if self.group is None:
            raise RuntimeError("receive_weights before join_sync_group")
        loaded = self.engine.load_weights(receive_weights(self.group, plan))
        self.engine.policy_version += 1
        out: dict[str, Any] = {"version": self.engine.policy_version, "loaded": loaded}
        if verify:
            out["checksums"] = self.weight_checksums(plan)
        return out

    def weight_checksums(self, plan: Sequence[Bucket]) -> dict[str, str]:
        """Checksums of the engine's weights, cast to the wire dtypes of `plan`."""
        wire = {spec.name: spec.dtype for bucket in plan for spec in bucket.specs}
        return checksums(
            (name, tensor.to(getattr(torch, wire[name])))
            for name, tensor in self.engine.named_weights()
            if name in wire
        )

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
