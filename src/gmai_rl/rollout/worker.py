"""A rollout worker: one generation engine plus its end of the weight-sync group.

The trainer runs each worker as a Ray actor (it wraps this class with `ray.remote` where it places
the actors). The worker counts the weight updates it has loaded as its policy version, and every
group it returns carries that version.

The engine is its backend's (`rollout.engines`): the spec makes it, and says who receives the
weights. An HF engine's model is in this process, so the worker itself is one member of the sync
group. A vLLM engine (`sync_in_engine`, a `SyncingEngine`) has its model in vLLM's workers, one
per tensor-parallel rank, and each of them is a member: the worker reports `sync_members()`, the
cluster gives it a block of that many consecutive ranks, and joining and receiving are delegated
to the engine.

A prompt whose images cannot be read any more (deleted or corrupted after the driver checked them
at load) does not fail the call: it comes back as a Group with no completions and `dropped` set
(`generate_or_drop`), which the driver counts and leaves out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from gmai_rl.data.loader import image_problem
from gmai_rl.models.device import require_cuda, rng_states, set_rng_states
from gmai_rl.models.loading import ModelOptions
from gmai_rl.rollout.base import EngineBrokenError, RolloutEngine, SyncingEngine
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.options import Backend, Device
from gmai_rl.rollout.spec import EngineSpec
from gmai_rl.sync.buckets import Bucket
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.group import SyncGroup, init_sync_group
from gmai_rl.sync.weights import checksums, receive_weights
from gmai_rl.types import Group, Prompt, SamplingParams

log = logging.getLogger(__name__)


def resolve_device(device: Device | str) -> str:
    if device == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def syncing_engine(spec: EngineSpec, engine: RolloutEngine) -> SyncingEngine | None:
    """`engine` when its spec says that its own processes receive the weights (and the engine,
    as configured, agrees: a vLLM engine serving LoRA adapters does not), else None (the
    rollout worker receives them and loads them into the engine)."""
    if not spec.sync_in_engine or not getattr(engine, "receives_in_workers", True):
        return None
    if not isinstance(engine, SyncingEngine):
        raise TypeError(
            f"the {spec.label} engine's spec says its own workers receive the weights, but "
            f"{type(engine).__name__} does not implement SyncingEngine"
        )
    return engine


def generate_or_drop(
    engine: RolloutEngine, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
) -> list[Group]:
    """`engine.generate`, except that a prompt whose images cannot be read is answered with a
    dropped Group (no completions, `dropped` naming the image and why) instead of an error.

    Nothing is checked up front: both engines read a batch's images before generating, so a
    failure costs no generation. Only then are the batch's images checked as at load (decoded
    whole); the prompts of those that fail are set aside and the rest generated again (and
    again, should another image go meanwhile). A failure that no image explains is raised.
    """
    try:
        return engine.generate(prompts, n, sampling)
    except EngineBrokenError:
        raise
    except Exception as error:
        problems = unreadable_images(prompts)
        if not problems:
            raise
        log.warning(
            "generate failed (%s: %s); generating again without the %d prompt(s) whose images "
            "cannot be read",
            type(error).__name__,
            error,
            len(problems),
        )
    rest = [p for i, p in enumerate(prompts) if i not in problems]
    generated = iter(generate_or_drop(engine, rest, n, sampling) if rest else [])
    version = engine.policy_version
    return [
        Group(p, [], [], version, dropped=problems[i]) if i in problems else next(generated)
        for i, p in enumerate(prompts)
    ]


def unreadable_images(prompts: Sequence[Prompt]) -> dict[int, str]:
    """Prompt index -> why its first unusable image cannot be used, for the prompts with one."""
    verdicts: dict[str, str | None] = {}  # prompts may share an image
    problems: dict[int, str] = {}
    for i, prompt in enumerate(prompts):
        for path in prompt.images:
            if path not in verdicts:
                problem = image_problem(path)
                verdicts[path] = None if problem is None else str(problem)
            if (verdict := verdicts[path]) is not None:
                problems[i] = verdict
                break
    return problems


class RolloutWorker:
    def __init__(
        self,
        backend: Backend | str,
        model: ModelOptions,
        device: Device | str = Device.auto,
        torch_threads: int = 1,
        max_batch_prompts: int = 64,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        device = resolve_device(device)
        if device.startswith("cuda"):
            require_cuda("rollout worker")
        spec = engine_spec(backend)
        self.engine = spec.make(model, device, seed, **(engine_kwargs or {}))
        self.syncing = syncing_engine(spec, self.engine)
        """The engine, when its own processes join the sync group; None: this worker does."""
        self.max_batch_prompts = max_batch_prompts
        self.group: SyncGroup | None = None
        self.sync_buffers = FlatBuffers()  # the received bucket, kept across pushes on CPU
        self._engine_synced = False

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions per prompt, one Group per prompt in order; a prompt whose images
        cannot be read gets a dropped Group (`generate_or_drop`)."""
        groups: list[Group] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            groups += generate_or_drop(
                self.engine, prompts[start : start + self.max_batch_prompts], n, sampling
            )
        return groups

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def get_policy_version(self) -> int:
        return self.engine.policy_version

    def ping(self) -> int:
        return self.engine.policy_version

    def save_state(self, path: str) -> None:
        """Write this worker's RNG states (what its next samples depend on) and policy version.

        The HF engine samples from torch's generator, restored exactly on resume. vLLM keeps
        its own per-engine generators, which it does not expose: a resumed vLLM run samples
        differently from an uninterrupted one (same distribution, other draws).
        """
        torch.save({**rng_states(), "version": self.engine.policy_version}, path)

    def load_state(self, path: str) -> None:
        """Restore `save_state`'s file; call after the resumed weights were pushed."""
        state = torch.load(path, weights_only=True)
        set_rng_states(state)
        self.engine.policy_version = int(state["version"])

    def sync_members(self) -> int:
        """Sync-group ranks this worker needs: 1, or one per vLLM worker process."""
        if self.syncing is not None:
            return self.syncing.sync_members()
        return 1

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
        """Join as ranks rank .. rank + sync_members() - 1 (blocks until the group is whole),
        leaving the group this worker was in (`init_sync_group`'s `generation`)."""
        if self.syncing is not None:
            self.syncing.join_sync_group(
                host, port, rank, world_size, backend, timeout_s, generation
            )
            self.group = None
            self._engine_synced = True
            return
        if self.group is not None:
            self.group.destroy()
        self.group = init_sync_group(
            host, port, rank, world_size, backend, timeout_s, generation=generation
        )

    def set_policy_version(self, version: int) -> None:
        """After a re-formed group's push of unchanged weights: the version they are."""
        self.engine.policy_version = version

    def receive_weights(self, plan: Sequence[Bucket], verify: bool = False) -> dict[str, Any]:
        """Take one push from learner rank 0; returns the new version (and checksums if verify).

        With verify, the checksums are of the engine's weights read back after loading (HF),
        or of the tensors as they reached vLLM's loader (vLLM's weights cannot be read back
        under HF names; see rollout/vllm_sync.py). Either way they are comparable with what
        `push_weights(..., verify=True)` returns.
        """
        out: dict[str, Any]
        if self.syncing is not None:
            if not self._engine_synced:
                raise RuntimeError("receive_weights before join_sync_group")
            received = self.syncing.receive_weights(plan, verify)
            out = {"loaded": received["loaded"]}
            if verify:
                out["checksums"] = received["checksums"]
        else:
            if self.group is None:
                raise RuntimeError("receive_weights before join_sync_group")
            # The HF engine's loader copies each tensor at once: one kept buffer serves.
            weights = receive_weights(self.group, plan, buffers=self.sync_buffers)
            out = {"loaded": self.engine.load_weights(weights)}
            if verify:
                out["checksums"] = self.weight_checksums(plan)
        self.engine.policy_version += 1
        out["version"] = self.engine.policy_version
        return out

    def weight_checksums(self, plan: Sequence[Bucket]) -> dict[str, str]:
        """Checksums of the engine's weights, cast to the wire dtypes of `plan`."""
        wire = {spec.name: spec.dtype for bucket in plan for spec in bucket.specs}
        return checksums(
            (name, tensor.to(getattr(torch, wire[name])))
            for name, tensor in self.engine.named_weights()
            if name in wire
        )

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the learners train (vLLM sleep mode on
        CUDA); a no-op for engines without one. The next generate or receive wakes it."""
        sleep = getattr(self.engine, "sleep", None)
        if sleep is not None:
            sleep()

    def wake_up(self) -> None:
        wake_up = getattr(self.engine, "wake_up", None)
        if wake_up is not None:
            wake_up()

    def shutdown(self) -> None:
        if self.syncing is not None and self._engine_synced:
            self.syncing.leave_sync_group()
            self._engine_synced = False
        if self.group is not None:
            self.group.destroy()
            self.group = None
