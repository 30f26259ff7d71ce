"""The model's facts from its config: parameters counted on a meta-device instance, the text
model's shape, the vision tower's patch grid and the image processor's area bound.

The only part of the plan that touches transformers (imported when called): no weights, no
download beyond the config. The demo's tiny model is planned before it exists, from the config
the run will build it with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmai_rl.models.loading import (
    ModelOptions,
    freeze_vision_tower,
    is_vision_language_config,
    is_vision_parameter,
)
from gmai_rl.models.lora import with_lora
from gmai_rl.plan.memory import DecoderShape, ParamCounts


@dataclass(frozen=True)
class ModelFacts:
    """What the plan takes from the model's config (no weights)."""

    architecture: str
    params: ParamCounts
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    patch_size: int | None
    """The vision tower's patch side in pixels (Qwen-VL); None for a text-only model."""
    merge_size: int | None
    """Patches merged per side into one visual token (Qwen-VL's spatial_merge_size)."""
    max_pixels: int | None
    """model.max_pixels, else the checkpoint's processor config; None when neither says."""
    source: str
    hidden: int = 0
    """The text model's width; 0: unknown (its activations are not estimated)."""
    intermediate: int = 0
    """The text model's MLP width."""
    heads: int = 0
    """The text model's attention (query) heads."""

    @property
    def decoder(self) -> DecoderShape | None:
        """The text decoder's shape, for its activations; None when the config lacks it."""
        if not (self.hidden and self.intermediate and self.heads):
            return None
        return DecoderShape(
            self.hidden,
            self.intermediate,
            self.layers,
            self.heads,
            self.kv_heads * self.head_dim,
            self.vocab,
        )


def count_parameters(model: Any, freeze_vision: bool) -> ParamCounts:
    """Parameter counts of a (meta) model, the vision tower found as the learner finds it; in
    a LoRA model (`models.lora`) the adapters are the trainable ones."""
    if freeze_vision:
        freeze_vision_tower(model)
    named = dict(model.named_parameters())  # tied weights once
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return ParamCounts(
        total=sum(p.numel() for p in named.values()),
        trainable=sum(p.numel() for p in named.values() if p.requires_grad),
        vision=sum(p.numel() for name, p in named.items() if is_vision_parameter(name)),
        largest_layer=largest,
    )


def max_pixels_of(processor: dict[str, Any]) -> int | None:
    """The image processor's area bound: `max_pixels`, or `size.longest_edge` (transformers 5)."""
    value = processor.get("max_pixels") or (processor.get("size") or {}).get("longest_edge")
    return int(value) if value else None


def _checkpoint_processor(path: Path) -> dict[str, Any]:
    """The image processor's settings saved beside a local checkpoint ({} when there are none)."""
    combined, legacy = path / "processor_config.json", path / "preprocessor_config.json"
    if combined.exists():
        return dict(json.loads(combined.read_text()).get("image_processor") or {})
    if legacy.exists():
        return dict(json.loads(legacy.read_text()))
    return {}


def _model_config(options: ModelOptions) -> tuple[Any, dict[str, Any], str]:
    """(config, image processor settings, where they came from)."""
    path = Path(options.path)
    if options.build_tiny_if_missing and not (path / "config.json").exists():
        from gmai_rl.models.tiny import build_config, build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        processor = build_processor(tokenizer).image_processor.to_dict()
        return build_config(tokenizer), processor, f"the tiny model the run builds at {path}"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            options.path, trust_remote_code=options.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model.path={options.path}: cannot read the model's config ({err}); point "
            "model.path at a checkpoint folder or a reachable hub name"
        ) from err
    return config, _checkpoint_processor(path) if path.is_dir() else {}, options.path


def read_model(options: ModelOptions) -> ModelFacts:
    """The model's sizes from its config: parameters counted on a meta-device instance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config, processor, source = _model_config(options)
    vl = is_vision_language_config(config)
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=options.trust_remote_code
        )
        architecture = type(model).__name__
        if options.lora.enabled:
            model = with_lora(model, options.lora, vl)
            architecture += f" + LoRA rank {options.lora.rank}"
    text = config.get_text_config()
    heads = text.num_attention_heads
    vision = getattr(config, "vision_config", None)
    return ModelFacts(
        architecture=architecture,
        params=count_parameters(model, options.freeze_vision and not options.lora.enabled),
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
        patch_size=getattr(vision, "patch_size", None),
        merge_size=getattr(vision, "spatial_merge_size", None),
        max_pixels=(options.max_pixels or max_pixels_of(processor)) if vl else None,
        source=source,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 0,
        heads=heads,
    )
