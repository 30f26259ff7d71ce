"""Load a policy (vision-language or text-only) and its processor from a local path or hub name.

Vision-language checkpoints (Qwen2.5-VL, Qwen2-VL, ...) load through `AutoModelForImageTextToText`
and `AutoProcessor`; text-only causal LMs through `AutoModelForCausalLM` and `AutoTokenizer`. The
rest of the project only needs to know `is_vision_language(processor)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from gmai_rl.models.lora import LoraOptions, adapter_base, load_adapter, with_lora, without_peft
from gmai_rl.types import StrChoice

log = logging.getLogger(__name__)


class Dtype(StrChoice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Parameter-name prefixes of the vision tower in the architectures we support.
_VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.")


@dataclass
class ModelOptions:
    path: str
    """Local folder or hub name of an HF checkpoint, or a folder holding a PEFT adapter (an
    exported LoRA run): its base is loaded and the adapter applied."""
    dtype: Dtype = Dtype.float32
    """Weights' dtype: float32, bfloat16 or float16."""
    attn_implementation: str | None = None
    """"sdpa", "eager", "flash_attention_2"...; None lets transformers choose."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (they are still broadcast to the rollout workers)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint's repository (needed by some architectures)."""
    min_pixels: int | None = None
    """Processor bound on image area (Qwen-VL resizes images into [min_pixels, max_pixels])."""
    max_pixels: int | None = None
    """Upper bound on image area; null keeps the processor's own."""
    build_tiny_if_missing: bool = False
    """Write an offline tiny random Qwen2.5-VL at `path` first when it has no config.json (demo)."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """Train LoRA adapters on the frozen base instead of the full weights (`models.lora`)."""

    @property
    def weights_path(self) -> str:
        """Where the base weights, config and processor are: the path, or an adapter's base."""
        return adapter_base(self.path) or self.path


def torch_dtype(name: str) -> Any:
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


def is_vision_language_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def is_vision_parameter(name: str) -> bool:
    """Whether a parameter (by its `named_parameters` name, in a `PeftModel` too) belongs to
    the vision tower."""
    return without_peft(name).startswith(_VISION_PREFIXES)


def load_processor(options: ModelOptions) -> Any:
    """AutoProcessor for a vision-language checkpoint, AutoTokenizer for a text-only one."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = options.weights_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    if not is_vision_language_config(config):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    kwargs = {
        k: v
        for k, v in (("min_pixels", options.min_pixels), ("max_pixels", options.max_pixels))
        if v
    }
    return AutoProcessor.from_pretrained(
        path, trust_remote_code=options.trust_remote_code, **kwargs
    )


# Attention implementations that need a package torch does not ship, and that package's module.
_ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash-attn", "flash_attn"),
    "flash_attention_3": ("flash-attn 3 (hopper build)", "flash_attn_interface"),
}


def check_attn_implementation(name: str | None) -> None:
    """Fail at start-up, naming the package, when the requested attention backend is not installed.

    SDPA (torch's own) works everywhere; flash-attn builds against the node's CUDA and is not in
    the GPU lock, so a preset that asks for it must find it installed.
    """
    import importlib.util

    if name not in _ATTENTION_PACKAGES:
        return
    package, module = _ATTENTION_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"model.attn_implementation={name} needs the {package} package, which is not "
            f"installed in this environment (module {module!r} not found). Install it on every "
            "node (it compiles against the node's CUDA), or use model.attn_implementation=sdpa."
        )


def load_model(options: ModelOptions, device: str | None = None) -> Any:
    """The policy as a torch module in train mode, with the requested freezing and checkpointing.

    `device` "cuda:N" loads the weights straight onto that GPU (no full copy in host memory
    first); None loads on the CPU, or partitioned when a DeepSpeed ZeRO-3 config is active
    (transformers' `HfDeepSpeedConfig`: every rank reads the whole checkpoint into host memory,
    then keeps its shard).

    With `lora.enabled` the model comes back wrapped in trainable adapters (a `PeftModel`, base
    frozen). A `path` holding an exported adapter loads its base and applies it: merged into the
    weights for inference, or kept trainable to go on training it under `lora.enabled`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    check_attn_implementation(options.attn_implementation)
    path = options.weights_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    auto = (
        AutoModelForImageTextToText if is_vision_language_config(config) else AutoModelForCausalLM
    )
    kwargs: dict[str, Any] = {"dtype": torch_dtype(options.dtype)}
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    if device is not None and device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
    model = auto.from_pretrained(path, trust_remote_code=options.trust_remote_code, **kwargs)
    if options.freeze_vision:
        frozen = freeze_vision_tower(model)
        log.info("froze %d vision-tower parameters", frozen)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if path != options.path:  # an exported adapter on its base
        return load_adapter(model, options.path, trainable=options.lora.enabled)
    if options.lora.enabled:
        model = with_lora(model, options.lora, is_vision_language_config(config))
        log.info("LoRA adapters: %s", _trainable_summary(model))
    return model


def merge_adapter(adapter: str, out: str, options: ModelOptions) -> None:
    """Write the exported adapter at `adapter` merged into its base: a plain transformers
    checkpoint (with the processor) at `out`, loaded on the CPU."""
    merged = replace(options, path=adapter, lora=LoraOptions(), gradient_checkpointing=False)
    load_model(merged).save_pretrained(out)
    load_processor(merged).save_pretrained(out)


def _trainable_summary(model: Any) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"


def freeze_vision_tower(model: Any) -> int:
    """Set requires_grad=False on the vision tower; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_vision_parameter(name):
            param.requires_grad_(False)
            frozen += 1
    if frozen == 0 and is_vision_language_config(model.config):
        raise ValueError(
            f"freeze_vision: no parameter of {type(model).__name__} starts with {_VISION_PREFIXES}"
        )
    return frozen


def is_vision_language(processor: Any) -> bool:
    """True for a multimodal processor, False for a plain tokenizer."""
    return hasattr(processor, "image_processor")


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)
