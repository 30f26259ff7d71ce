"""LoRA adapters on the policy, with PEFT: what is trained, what is pushed, what is exported.

With `model.lora.enabled` the policy is a `peft.PeftModel`: the base weights load as always and
stay frozen; low-rank adapters on the language model's linear layers (`targets`) are the only
trainable parameters, so only they carry optimizer state, only they are pushed to the rollout
workers, and only they (with their optimizer state) go into a resumable checkpoint. The KL
reference is the same base with a copy of the adapters RL started from (`learner.lora_reference`):
no second copy of the weights. Every holder of the policy (learner ranks, HF rollout engines) wraps
the same base with the same configuration, so parameters have the same names everywhere.

An exported adapter is PEFT's own folder format (adapter_config.json +
adapter_model.safetensors, `base_model_name_or_path` naming the base), loadable by
`peft.PeftModel.from_pretrained`, by `gmai-rl eval` (`adapter_base`), and mergeable into a plain
transformers checkpoint (`merge_adapter`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Qwen2 / Qwen2.5-VL decoder block: attention and MLP. Adapting the MLP
too matters most (Thinking Machines, "LoRA Without Regret", 2025: attention-only LoRA trails)."""

VISION_MODULES = r"^(model\.)?(visual|vision_tower)\..*"
"""Module names of the vision tower (Qwen2.5-VL's `model.visual`), whose blocks reuse the names
`gate_proj`/`up_proj`/`down_proj`: left out of the adapters unless `vision` is set."""

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraOptions:
    """`model.lora`: train low-rank adapters instead of the full weights."""

    enabled: bool = False
    """Wrap the policy in adapters; off: train every (unfrozen) weight."""
    rank: int = 32
    """r, the adapters' inner dimension."""
    alpha: int = 64
    """The adapters' output is scaled by alpha / rank."""
    dropout: float = 0.0
    """On the adapters' input while training. 0 by default: dropout makes the learner's
    log-probs of a sample random draws, so the PPO ratio and the KL term would be noisy by
    construction, and a rollout engine never applies it."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module names (last component) that get an adapter."""
    vision: bool = False
    """Also adapt the vision tower's layers with those names (frozen otherwise)."""
    export_merged: bool = False
    """The final export also writes the base with the adapter merged in (final/merged), a plain
    transformers checkpoint, beside the adapter (final)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("model.lora.targets is empty: name the layers that get an adapter")


def peft_config(options: LoraOptions, vision_tower: bool = True) -> Any:
    """The `peft.LoraConfig` of `options` for a model with or without a vision tower."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.targets),
        exclude_modules=VISION_MODULES if vision_tower and not options.vision else None,
        bias="none",
    )


def with_lora(model: Any, options: LoraOptions, vision_tower: bool) -> Any:
    """`model` wrapped in adapters (a `PeftModel`); every base parameter frozen. `vision_tower`:
    the model has one (`models.loading.is_vision_language_config`)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(options, vision_tower))


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(model: Any) -> Any:
    """The transformers model inside a `PeftModel` (adapters injected in its layers), or the
    model itself: what code that calls `base_model`, `get_output_embeddings()` or the model's
    own helpers (`get_rope_index`) needs."""
    return model.get_base_model() if is_peft(model) else model


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run `model` as its base (the KL reference); nothing for a model without adapters."""
    if not is_peft(model):
        yield
        return
    with model.disable_adapter():
        yield


PEFT_PREFIX = "base_model.model."
"""What a `PeftModel` puts before its model's parameter names."""


def without_peft(name: str) -> str:
    """A parameter's name in the model a `PeftModel` wraps."""
    return name.removeprefix(PEFT_PREFIX)


def adapter_names(names: Sequence[str]) -> list[str]:
    """The adapters' parameters among `names` (PEFT's `lora_A`/`lora_B`, any adapter name)."""
    return [n for n in names if ".lora_A." in n or ".lora_B." in n]


def adapter_base(path: str | Path) -> str | None:
    """The base model an exported adapter folder was trained on; None for a model folder."""
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{config}: not a PEFT adapter config ({err})") from err
    if not base:
        raise ValueError(f"{config}: base_model_name_or_path is empty; set it to the base model")
    return str(base)


def load_adapter(model: Any, path: str | Path, trainable: bool) -> Any:
    """An exported adapter applied to its loaded base: kept as a trainable `PeftModel`, or
    merged into the weights (inference: no adapter overhead, a plain transformers model)."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    return wrapped if trainable else wrapped.merge_and_unload()
