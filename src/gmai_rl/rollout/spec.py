"""One spec per rollout engine: what the trainer knows about an engine without building it.

    spec = engine_spec(cfg.rollout.backend)                     # rollout.engines: the registry
    errors = spec.validate(cfg)                                 # config_checks.validate
    window = spec.window(cfg)                                   # plan: the prompt budget
    sized = spec.plan(EngineInputs(cfg, shape, gpu_memory, longest))  # plan: memory, rows, checks
    kwargs = spec.engine_kwargs(cfg.rollout)                    # cluster -> rollout worker
    engine = spec.make(model, device, seed, **kwargs)           # rollout worker
    spec.sleeps(cfg), spec.sleep_discards_weights(cfg)          # cluster: between stages

Config, plan, cluster and rollout worker ask the spec and never name an engine, so a new engine
is one spec module and one `register` call (rollout/engines.py), plus its `Backend` member (the
config's choice) and, if it takes options, their section in `RolloutConfig`.

Importing a spec imports neither the engine nor its framework (vLLM, transformers, torch): `make`
does, in the rollout worker's process. A spec reads the run's configuration through `RolloutRun`,
the part of `gmai_rl.config.TrainConfig` an engine may depend on: the config sits above this
layer, so it is described here, not imported.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gmai_rl.rollout.sizing import EnginePlan, ModelShape

if TYPE_CHECKING:
    from gmai_rl.rollout.base import RolloutEngine


class LoraSection(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def rank(self) -> int: ...


class ModelSection(Protocol):
    @property
    def dtype(self) -> str: ...
    @property
    def lora(self) -> LoraSection: ...


class RolloutSection(Protocol):
    """`rollout.*`; an engine's own options are the section its spec names (`options_key`)."""

    @property
    def backend(self) -> str: ...
    @property
    def samples_per_prompt(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def max_batch_prompts(self) -> int: ...


class ClusterSection(Protocol):
    @property
    def gpus_per_rollout_worker(self) -> float: ...
    @property
    def colocate(self) -> bool: ...
    @property
    def rollout_workers(self) -> int: ...


class AlgoSection(Protocol):
    @property
    def prompts_per_step(self) -> int: ...


class RolloutRun(Protocol):
    """What an engine's spec reads of the run's configuration (`TrainConfig` is one)."""

    @property
    def model(self) -> ModelSection: ...
    @property
    def rollout(self) -> RolloutSection: ...
    @property
    def cluster(self) -> ClusterSection: ...
    @property
    def algo(self) -> AlgoSection: ...


@dataclass(frozen=True)
class EngineInputs:
    """What an engine's memory depends on besides its own options."""

    run: RolloutRun
    model: ModelShape
    gpu_memory: float | None
    """Bytes of each GPU; None: unknown (the GPU checks are skipped)."""
    longest: int
    """The longest sequence in tokens: the longest prompt + rollout.max_new_tokens."""

    @property
    def on_gpu(self) -> bool:
        return self.run.cluster.gpus_per_rollout_worker > 0


class Sleep(enum.Enum):
    """What an engine does while the learners train."""

    never = "never"
    """Keeps its memory (its own GPUs, or an engine without a sleep mode)."""
    keeps_weights = "keeps_weights"
    """Frees its accelerator memory, its weights kept in host memory (vLLM sleep level 1)."""
    drops_weights = "drops_weights"
    """Frees its accelerator memory, weights included (vLLM sleep level 2): every weight push
    after a sleep must carry every parameter, frozen ones too."""


def _no_errors(run: RolloutRun) -> list[str]:
    return []


def _no_window(run: RolloutRun) -> int | None:
    return None


def _never_sleeps(run: RolloutRun) -> Sleep:
    return Sleep.never


def _no_image_limit(run: RolloutRun) -> int | None:
    return None


@dataclass(frozen=True)
class EngineSpec:
    """A rollout engine as the trainer sees it: how it is made, checked, sized, put to sleep and
    fed weights. Functions of the configuration only, so the driver can ask before any actor
    exists."""

    name: str
    """The `rollout.backend` value that selects the engine (a `Backend` member's)."""
    label: str
    """How the plan names it ("HF", "vLLM")."""
    make: Callable[..., RolloutEngine]
    """(model: ModelOptions, device: str, seed: int, **engine_kwargs) -> the engine, built in the
    rollout worker's process (which has seeded torch with `seed`); the only part that imports
    the engine's module and framework."""
    plan: Callable[[EngineInputs], EnginePlan]
    """The engine's part of the pre-flight plan: its memory, the rows the plan prints about it,
    why it cannot fit its GPU, and what the estimate left out."""
    validate: Callable[[RolloutRun], list[str]] = _no_errors
    """Cross-field errors of a run with this engine, each naming the keys to change."""
    options_key: str | None = None
    """The `rollout` section holding the engine's options (`rollout.vllm`), handed to `make`
    under that name; None: the engine takes none."""
    options_type: type | None = None
    """The dataclass of that section (`VLLMOptions`)."""
    window: Callable[[RolloutRun], int | None] = _no_window
    """The engine's fixed context window, prompt and completion, in tokens; None: none fixed
    (HF generate), or none set."""
    window_key: str | None = None
    """The key that sets the window (`rollout.vllm.max_model_len`), as the plan names it."""
    images_per_prompt: Callable[[RolloutRun], int | None] = _no_image_limit
    """The most images the engine takes in one prompt (vLLM refuses a whole generate call
    with a prompt over its `limit_mm_per_prompt`); None: no limit."""
    images_key: str | None = None
    """The key that sets that limit (`rollout.vllm.images_per_prompt`)."""
    sleep_mode: Callable[[RolloutRun], Sleep] = _never_sleeps
    """Whether the engine frees its accelerator memory while the learners train, and whether
    its weights survive that."""
    sync_in_engine: bool = False
    """Where pushed weights arrive. False: in the rollout worker's process, which is one member
    of the weight-sync group and feeds them to `engine.load_weights`. True: in the engine's own
    worker processes, each a member (vLLM: one per tensor-parallel rank); the engine implements
    `rollout.base.SyncingEngine` and the worker delegates joining and receiving to it."""

    def __post_init__(self) -> None:
        if (self.options_key is None) != (self.options_type is None):
            raise ValueError(f"engine {self.name!r}: options_key and options_type go together")

    def engine_kwargs(self, rollout: Any) -> dict[str, Any]:
        """What the rollout worker hands `make` besides model, device and seed, taken from the
        `rollout` config section: {options_key: its options}, {} for an engine without any."""
        if self.options_key is None:
            return {}
        return {self.options_key: getattr(rollout, self.options_key)}

    def sleeps(self, run: RolloutRun) -> bool:
        """Whether the engines free their accelerator memory while the learners train (the
        cluster puts them to sleep before training and wakes them before the weight push)."""
        return self.sleep_mode(run) is not Sleep.never

    def sleep_discards_weights(self, run: RolloutRun) -> bool:
        """Whether a sleep loses the weights: then every push must be whole (frozen ones too)."""
        return self.sleep_mode(run) is Sleep.drops_weights
