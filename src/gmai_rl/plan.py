"""The pre-flight plan: what a configuration puts on each GPU, worked out before anything loads.

    plan = make_plan(cfg)     # reads the model's config only: parameters counted on the meta device
    print(render(plan))       # the table `gmai-rl plan` prints and every run logs first
    problems = check(plan)    # what cannot fit, each with its numbers and the keys to change

Estimated: a learner rank's model states under its ZeRO stage, precision and offload (following
what DeepSpeed 0.19.8 allocates for the config `learner.deepspeed_config` writes; the unit tests
compare them with DeepSpeed's own estimators), the KL reference, the rollout engine's weights and
KV cache, the prompt length against the engine's window, and whether the placement group's bundles
fit the nodes. Not estimated: activations (they depend on batch, sequence lengths, gradient
checkpointing and the attention kernel), DeepSpeed's communication buckets and the CUDA context;
the plan says so and reports the memory left for them.

The rollout engine's part (its memory, its rows of the table, why it cannot fit its GPU, its
notes) and its window come from the engine's spec (`rollout.engines`): this module names no
engine. The arithmetic is small pure functions on counts and bytes; `read_model` is the only part
that touches transformers (a model built on the meta device: no weights, no download beyond the
config).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmai_rl.cluster.placement import plan_bundles, resource_shortfall
from gmai_rl.config import TrainConfig
from gmai_rl.data import format_question
from gmai_rl.models.loading import (
    ModelOptions,
    freeze_vision_tower,
    is_vision_language_config,
    is_vision_parameter,
)
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.sizing import GIB, EnginePlan, ModelShape, bytes_text, dtype_bytes
from gmai_rl.rollout.spec import EngineInputs
from gmai_rl.types import MCQItem

QUESTION_TOKENS = 512
"""Allowance for a question and its options when the data is not at hand (`gmai-rl plan` without
the dataset): an assumption, medical MCQs being typically a few hundred tokens. A run measures
its data instead."""

TEMPLATE_TOKENS = 16
"""The chat template's own tokens around the system, user and assistant turns."""

CHARS_PER_TOKEN = 3
"""Characters per token when estimating a text without its tokenizer (English BPE averages ~4:
3 errs long)."""

NOT_ESTIMATED = (
    "not estimated: activations (forward/backward, logits), DeepSpeed communication buckets, "
    "the CUDA context; what is left on each GPU is for them"
)

# ------------------------------------------------------------------------- memory (pure)


@dataclass(frozen=True)
class Memory:
    """Bytes one actor holds: on its accelerator, and in host memory."""

    device: float = 0.0
    host: float = 0.0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.device + other.device, self.host + other.host)


def total(parts: Iterable[Memory]) -> Memory:
    return sum(parts, Memory())


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Parameters of the model, tied ones once."""
    trainable: int
    """Those the optimizer updates (all but the vision tower with model.freeze_vision)."""
    vision: int
    """The vision tower's (`models.loading.is_vision_parameter`)."""
    largest_layer: int
    """Most parameters held directly by one module (the embedding or LM head of an LLM): what
    ZeRO-3 gathers at once in DeepSpeed's own estimate."""


def learner_states(
    params: ParamCounts,
    ranks: int,
    zero_stage: int,
    bf16: bool,
    weight_bytes: int,
    offload_optimizer: bool,
) -> dict[str, Memory]:
    """Model states of one learner rank by component [bytes], as DeepSpeed 0.19.8 allocates them
    for `learner.deepspeed_config`.

    bf16 (mixed precision): 16-bit weights, fp32 gradient accumulation (the config's
    data_types.grad_accum_dtype), fp32 master weights, Adam's two fp32 moments: 2 + 4 + 4 + 8
    bytes per trainable parameter, frozen ones holding only their 2 bytes of weights. ZeRO-1
    keeps the gradients whole on every rank (its BF16_Optimizer also keeps the 16-bit ones until
    backward ends; with offload, hooks fold each into its fp32 accumulator at once); ZeRO-2/3
    reduce them straight into an fp32 partition; ZeRO-3 partitions the weights too and gathers a
    layer at a time (4 bytes x the largest layer, DeepSpeed's figure). Otherwise plain precision
    in the weights' dtype: weights, gradients, and under ZeRO >= 1 an fp32 master partition (a copy
    under ZeRO-1/2, the partition itself under ZeRO-3 unless offloaded) with Adam's moments; torch
    AdamW without ZeRO keeps the moments in the weights' dtype. `offload_optimizer` (ZeRO >= 1)
    moves master weights, moments and the fp32 gradient partition to host memory.
    """
    n, s, p, t = ranks, zero_stage, params.total, params.trainable
    off = offload_optimizer and s >= 1
    w = 2 if bf16 else weight_bytes

    def partition(nbytes: float, offloaded: bool = off) -> Memory:
        return Memory(host=nbytes) if offloaded else Memory(device=nbytes)

    label = "bf16" if bf16 else {4: "fp32"}.get(w, "16-bit")
    rows = {f"weights ({label})": Memory(device=w * p / (n if s == 3 else 1))}
    if bf16:
        if s == 0 or (s == 1 and not off):
            rows["bf16 gradients"] = Memory(device=2 * t)
        if s <= 1:
            rows["fp32 gradients"] = Memory(device=4 * t, host=4 * t / n if off else 0.0)
        else:
            rows["fp32 gradients"] = partition(4 * t / n)
        rows["fp32 master weights"] = partition(4 * t / (n if s else 1))
        rows["Adam moments (fp32)"] = partition(8 * t / (n if s else 1))
    else:
        if s <= 1:
            rows["gradients"] = Memory(device=w * t, host=4 * t / n if off else 0.0)
        else:
            rows["gradients"] = partition(w * t / n)
        if s in (1, 2) or (s == 3 and off):
            rows["fp32 master weights"] = partition(4 * t / n)
        rows["Adam moments"] = partition(8 * t / n) if s else Memory(device=2 * w * t)
    if s == 3:
        rows["gathered layer (ZeRO-3)"] = Memory(device=2 * w * params.largest_layer)
    return {name: m for name, m in rows.items() if m.device or m.host}


def reference_states(
    total_params: int, ranks: int, zero_stage: int, weight_bytes: int, offload: bool
) -> Memory:
    """The frozen KL reference of one rank (`learner.deepspeed_config.reference_config`): a full
    replica under ZeRO-0/1/2, partitioned under ZeRO-3, partitioned in host memory when
    offloaded."""
    if offload:
        return Memory(host=weight_bytes * total_params / ranks)
    return Memory(device=weight_bytes * total_params / (ranks if zero_stage == 3 else 1))


def image_tokens(max_pixels: int, patch_size: int, merge_size: int) -> int:
    """Most visual tokens one image becomes in Qwen-VL: it is resized to at most max_pixels in
    cells of (patch x merge) pixels squared, one token per cell."""
    return max_pixels // (patch_size * merge_size) ** 2


def text_tokens(text: str | None) -> int:
    """A text's tokens estimated from its length (no tokenizer needed)."""
    return math.ceil(len(text or "") / CHARS_PER_TOKEN)


def prompt_tokens(
    images: int, tokens_per_image: int, system_prompt: str | None, question: int = QUESTION_TOKENS
) -> int:
    """A prompt's tokens at most: each image's tokens and its two markers, the system prompt,
    the chat template and the question with its options."""
    return images * (tokens_per_image + 2) + text_tokens(system_prompt) + TEMPLATE_TOKENS + question


def nodes_needed(bundle_gpus: Iterable[float], gpus_per_node: int) -> int:
    """Nodes a first-fit-decreasing packing of the bundles' GPUs takes (a bundle is never split
    over nodes); 0 without GPU bundles."""
    free: list[float] = []
    for gpus in sorted((g for g in bundle_gpus if g > 0), reverse=True):
        for i, left in enumerate(free):
            if gpus <= left + 1e-9:
                free[i] = left - gpus
                break
        else:
            free.append(gpus_per_node - gpus)
    return len(free)


# ----------------------------------------------------------------------------- the model


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


def count_parameters(model: Any, freeze_vision: bool) -> ParamCounts:
    """Parameter counts of a (meta) model, the vision tower found as the learner finds it."""
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
    text = config.get_text_config()
    heads = text.num_attention_heads
    vision = getattr(config, "vision_config", None)
    return ModelFacts(
        architecture=type(model).__name__,
        params=count_parameters(model, options.freeze_vision),
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
        patch_size=getattr(vision, "patch_size", None),
        merge_size=getattr(vision, "spatial_merge_size", None),
        max_pixels=(options.max_pixels or max_pixels_of(processor)) if vl else None,
        source=source,
    )


# ------------------------------------------------------------------------------ hardware


@dataclass(frozen=True)
class Hardware:
    """The nodes the plan checks against."""

    gpus_per_node: int | None
    gpu_memory: float | None
    """Bytes per GPU; None: unknown (the GPU memory checks are skipped)."""
    source: str
    single_node: bool
    """A local ray.init(): every actor runs on the driver's machine."""
    host_memory: float | None = None
    """The driver's memory when every actor runs there; None: not checked (`host_note` says
    why)."""
    host_note: str = ""


def driver_gpus() -> tuple[int, float] | None:
    """(GPU count, bytes of the first GPU) on the driver's machine, or None without CUDA. Only
    called for null cluster.gpus_per_node / gpu_memory_gib: it initialises CUDA in the driver."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.device_count(), float(torch.cuda.get_device_properties(0).total_memory)


def has_nvidia_devices() -> bool:
    """Whether this machine has NVIDIA GPUs, without initialising CUDA (the device files)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def hardware(cfg: TrainConfig) -> Hardware:
    """cluster.gpus_per_node and cluster.gpu_memory_gib, null ones read from the driver's GPUs;
    the driver's memory when the actors will run on its machine (a local ray.init())."""
    c = cfg.cluster
    gpus, memory = c.gpus_per_node, c.gpu_memory_gib * GIB if c.gpu_memory_gib else None
    source = "cluster.gpus_per_node, cluster.gpu_memory_gib"
    if gpus is None or memory is None:
        found = driver_gpus()
        source = "the driver's GPUs (torch.cuda)" if found else "unknown: no GPU on the driver"
        if found:
            gpus = found[0] if gpus is None else gpus
            memory = found[1] if memory is None else memory
    if c.address or os.environ.get("RAY_ADDRESS"):
        return Hardware(gpus, memory, source, False, None, "the Ray cluster is remote")
    wants_gpus = c.gpus_per_learner > 0 or c.gpus_per_rollout_worker > 0
    if wants_gpus and not has_nvidia_devices():
        note = "the config asks for GPUs and this machine has none: it plans for another one"
        return Hardware(gpus, memory, source, True, None, note)
    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Hardware(gpus, memory, source, True, host)


# --------------------------------------------------------------------- engine and prompt


def engine_memory(
    cfg: TrainConfig, m: ModelFacts, gpu_memory: float | None, longest: int
) -> EnginePlan:
    """The rollout engine of `cfg` for a model `m` whose longest sequence is `longest` tokens:
    its spec's part of the plan (memory, rows, problems, notes)."""
    shape = ModelShape(m.params.total, m.layers, m.kv_heads, m.head_dim, m.vocab)
    return engine_spec(cfg.rollout.backend).plan(EngineInputs(cfg, shape, gpu_memory, longest))


@dataclass(frozen=True)
class PromptBudget:
    image_tokens: int | None
    """Tokens of one image at max_pixels; None for a text model or an unknown bound."""
    images: int
    """Images per prompt: the most in the data, else rollout.vllm.images_per_prompt."""
    system: int
    """The system prompt's tokens (estimated from its length)."""
    question: int
    """The longest question with its options in the data, else the QUESTION_TOKENS allowance."""
    measured: bool
    """Whether `question` and `images` were measured on the data."""
    prompt: int
    """The longest prompt: images, system prompt, chat template and question."""
    longest: int
    """prompt + rollout.max_new_tokens."""
    window: int | None
    """The engine's fixed window (vLLM: rollout.vllm.max_model_len); None: none (HF)."""


def prompt_budget(
    cfg: TrainConfig, m: ModelFacts, items: Sequence[MCQItem] | None = None
) -> PromptBudget:
    """The longest prompt and sequence: measured on `items` when given, else assumed."""
    tokens = None
    if m.patch_size and m.merge_size and m.max_pixels:
        tokens = image_tokens(m.max_pixels, m.patch_size, m.merge_size)
    if items:
        question = max(text_tokens(format_question(item)) for item in items)
        images = max(len(item.images) for item in items)
    else:
        question, images = QUESTION_TOKENS, cfg.rollout.vllm.images_per_prompt
    images = images if tokens is not None else 0
    prompt = prompt_tokens(images, tokens or 0, cfg.data.system_prompt, question)
    return PromptBudget(
        image_tokens=tokens,
        images=images,
        system=text_tokens(cfg.data.system_prompt),
        question=question,
        measured=bool(items),
        prompt=prompt,
        longest=prompt + cfg.rollout.max_new_tokens,
        window=engine_spec(cfg.rollout.backend).window(cfg),
    )


# ---------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Every number the plan prints and checks (bytes unless named otherwise)."""

    cfg: TrainConfig
    model: ModelFacts
    hw: Hardware
    bundles: list[dict[str, float]]
    nodes: int | None
    """Nodes the GPU bundles take (None: gpus_per_node unknown)."""
    learner: dict[str, Memory]
    """One learner rank's model states by component, where they live (host on CPU runs)."""
    reference: Memory | None
    """One rank's share of the KL reference; None without one (algo.loss.kl_coef=0)."""
    engine: EnginePlan
    prompt: PromptBudget
    notes: list[str] = field(default_factory=list)

    @property
    def gpus_needed(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)

    @property
    def cpus_needed(self) -> float:
        """The bundles' CPUs and the reward workers' (0.5 each, outside the placement group)."""
        return sum(b.get("CPU", 0) for b in self.bundles) + 0.5 * self.cfg.reward.num_workers

    @property
    def learner_on_gpu(self) -> bool:
        return self.cfg.cluster.gpus_per_learner > 0

    @property
    def engine_on_gpu(self) -> bool:
        return self.cfg.cluster.gpus_per_rollout_worker > 0

    @property
    def learner_total(self) -> Memory:
        return total(self.learner.values()) + (self.reference or Memory())

    @property
    def engine_device(self) -> float:
        return self.engine.reserved if self.engine_on_gpu else 0.0

    @property
    def gpu_peak(self) -> float:
        """The most one GPU holds: a learner rank's states or an engine's share, both when
        colocated (generation and training alternate, but the learner keeps its states)."""
        learner = self.learner_total.device
        if self.cfg.cluster.colocate:
            return learner + self.engine_device
        return max(learner, self.engine_device)

    @property
    def host_needed(self) -> float:
        """Host memory of all actors together: learner parts on CPU or offloaded, engines on CPU
        or asleep."""
        c = self.cfg.cluster
        engine = (0.0 if self.engine_on_gpu else self.engine.reserved) + self.engine.asleep_on_host
        return c.learner_ranks * self.learner_total.host + c.rollout_workers * engine

    @property
    def kv_tokens(self) -> int | None:
        """Tokens vLLM's KV cache holds (None for HF, or with GPU memory unknown)."""
        return self.engine.kv_tokens

    @property
    def kv_sequences(self) -> int | None:
        """Full-length sequences (rollout.vllm.max_model_len, else the longest) the cache holds."""
        tokens = self.kv_tokens
        return None if tokens is None else tokens // (self.prompt.window or self.prompt.longest)


def on_host(m: Memory) -> Memory:
    return Memory(host=m.device + m.host)


def make_plan(
    cfg: TrainConfig,
    model: ModelFacts | None = None,
    hw: Hardware | None = None,
    items: Sequence[MCQItem] | None = None,
) -> Plan:
    """The plan of `cfg`; the model's config is read and the hardware found unless given. With
    `items` (the run's questions) the prompt budget is measured on them."""
    m = model if model is not None else read_model(cfg.model)
    hw = hw if hw is not None else hardware(cfg)
    c, lo = cfg.cluster, cfg.learner
    bundles = plan_bundles(c).bundles
    nodes = None
    if hw.gpus_per_node:
        nodes = nodes_needed([b.get("GPU", 0) for b in bundles], hw.gpus_per_node)
    weight_bytes = dtype_bytes(cfg.model.dtype)
    learner = learner_states(
        m.params, c.learner_ranks, lo.zero_stage, lo.bf16, weight_bytes, lo.offload_optimizer
    )
    reference = None
    if cfg.algo.loss.kl_coef > 0:
        ref_bytes = 2 if lo.bf16 else weight_bytes
        reference = reference_states(
            m.params.total, c.learner_ranks, lo.zero_stage, ref_bytes, lo.reference_offload
        )
    if c.gpus_per_learner == 0:
        learner = {name: on_host(mem) for name, mem in learner.items()}
        reference = on_host(reference) if reference is not None else None
    prompt = prompt_budget(cfg, m, items)
    plan = Plan(
        cfg,
        m,
        hw,
        bundles,
        nodes,
        learner,
        reference,
        engine_memory(cfg, m, hw.gpu_memory, prompt.longest),
        prompt,
    )
    plan.notes = _notes(plan)
    return plan


def _notes(plan: Plan) -> list[str]:
    """What the plan could not check, and why."""
    hw, m = plan.hw, plan.model
    notes = []
    if m.patch_size and plan.prompt.image_tokens is None:
        notes.append(
            "image tokens unknown: set model.max_pixels (the checkpoint's processor config has "
            "no bound)"
        )
    notes += plan.engine.notes
    if hw.host_memory is None:
        notes.append(f"host memory not checked: {hw.host_note}")
    if (plan.learner_on_gpu or plan.engine_on_gpu) and hw.gpu_memory is None:
        notes.append(f"GPU memory not checked: {hw.source}")
    if not (plan.learner_on_gpu or plan.engine_on_gpu):
        notes.append("CPU run: no GPU memory to check")
    return notes


# ------------------------------------------------------------------------ render, check


def count_text(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def render(plan: Plan) -> str:
    """The plan as the table `gmai-rl plan` prints and a run logs before it starts."""
    cfg, m, p = plan.cfg, plan.model, plan.model.params
    frozen = " (frozen)" if cfg.model.freeze_vision else ""
    lines = [
        "pre-flight plan (the model's config only: parameters counted on the meta device)",
        f"model      {m.architecture} from {m.source}",
        f"           {count_text(p.total)} parameters, {count_text(p.trainable)} trainable, "
        f"vision tower {count_text(p.vision)}{frozen}, largest layer {count_text(p.largest_layer)}",
        *_placement_lines(plan),
        *_learner_lines(plan),
        *plan.engine.lines,
        *_prompt_lines(plan),
        *_memory_lines(plan),
        *(f"note       {n}" for n in plan.notes),
        NOT_ESTIMATED,
    ]
    problems = check(plan)
    lines.append("fits: yes" if not problems else f"fits: NO ({len(problems)} problem(s))")
    return "\n".join(lines)


def _placement_lines(plan: Plan) -> list[str]:
    c, hw = plan.cfg.cluster, plan.hw
    layout = "colocated (rank i shares a bundle with worker i)" if c.colocate else "separate"
    nodes = (
        f"nodes of {hw.gpus_per_node} x {bytes_text(hw.gpu_memory or 0)} ({hw.source})"
        if hw.gpus_per_node
        else f"GPUs per node {hw.source}"
    )
    if plan.nodes:
        nodes += f": {plan.nodes} node(s)"
    return [
        f"placement  {c.learner_ranks} learner rank(s) x {c.gpus_per_learner:g} GPU + "
        f"{c.rollout_workers} rollout worker(s) x {c.gpus_per_rollout_worker:g} GPU, {layout}",
        f"           {plan.gpus_needed:g} GPU(s), {plan.cpus_needed:g} CPU(s) with "
        f"{plan.cfg.reward.num_workers} reward worker(s); {nodes}",
    ]


def _learner_lines(plan: Plan) -> list[str]:
    cfg = plan.cfg
    lo, ranks = cfg.learner, cfg.cluster.learner_ranks
    precision = "bf16 mixed precision" if lo.bf16 else f"{cfg.model.dtype}"
    optimizer = (
        "optimizer in host memory (offload)"
        if lo.offload_optimizer and lo.zero_stage
        else "optimizer on the device"
    )
    device = "GPU" if plan.learner_on_gpu else "CPU"
    rows = dict(plan.learner)
    if plan.reference is not None:
        placed = (
            "in host memory, partitioned"
            if lo.reference_offload
            else "partitioned"
            if lo.zero_stage == 3
            else "full replica"
        )
        rows[f"KL reference ({placed})"] = plan.reference
    rows["total"] = plan.learner_total
    lines = [
        f"learner    ZeRO-{lo.zero_stage}, {precision}, {optimizer}; one rank of {ranks} on "
        f"{device}:",
        f"             {'':32} {'device':>10} {'host':>10}",
    ]
    lines += [
        f"             {name:32} {bytes_text(mem.device):>10} {bytes_text(mem.host):>10}"
        for name, mem in rows.items()
    ]
    if plan.reference is None:
        lines.append("             no KL reference (algo.loss.kl_coef=0)")
    return lines


def _prompt_lines(plan: Plan) -> list[str]:
    b, m = plan.prompt, plan.model
    image = (
        f"{b.images} image(s) x ({b.image_tokens} at max_pixels {m.max_pixels} + 2) + "
        if b.image_tokens is not None
        else ""
    )
    spec = engine_spec(plan.cfg.rollout.backend)
    limit = f"{spec.window_key} {b.window}" if b.window else f"{spec.label}: no fixed window"
    how = "the longest in the data" if b.measured else "assumed: the data is not at hand"
    return [
        f"prompt     {image}system {b.system} + template {TEMPLATE_TOKENS} + question "
        f"{b.question} ({how}) = {b.prompt} tokens",
        f"           + rollout.max_new_tokens {plan.cfg.rollout.max_new_tokens} = {b.longest} "
        f"tokens at most ({limit}; the model has {m.max_positions} positions)",
    ]


def _memory_lines(plan: Plan) -> list[str]:
    hw, lines = plan.hw, []
    g = hw.gpu_memory
    if g and plan.cfg.cluster.colocate and plan.learner_on_gpu:
        lines.append(
            f"per GPU    learner rank {bytes_text(plan.learner_total.device)} + engine "
            f"{bytes_text(plan.engine_device)} = {bytes_text(plan.gpu_peak)} of "
            f"{bytes_text(g)}: {bytes_text(g - plan.gpu_peak)} left for activations"
        )
    elif g:
        if plan.learner_on_gpu:
            left = g - plan.learner_total.device
            lines.append(
                f"per GPU    learner rank {bytes_text(plan.learner_total.device)} of "
                f"{bytes_text(g)}: {bytes_text(left)} left for activations"
            )
        if plan.engine_on_gpu:
            lines.append(
                f"per GPU    rollout engine {bytes_text(plan.engine_device)} of {bytes_text(g)}"
            )
    if hw.host_memory:
        lines.append(
            f"host       {bytes_text(plan.host_needed)} for all actors, of this machine's "
            f"{bytes_text(hw.host_memory)} (local Ray)"
        )
    elif plan.host_needed:
        lines.append(f"host       {bytes_text(plan.host_needed)} for all actors")
    return lines


def check(plan: Plan) -> list[str]:
    """What cannot fit or cannot start, each with its numbers and the keys to change."""
    lo = plan.cfg.learner
    problems = []
    if lo.zero_stage == 0 and lo.bf16:
        problems.append(
            "learner.zero_stage=0 with learner.bf16=true: DeepSpeed 0.19.8 accumulates bf16 "
            "gradients in fp32 only under ZeRO (its engine refuses the mix without it); use "
            "learner.zero_stage=1, 2 or 3"
        )
    problems += _gpu_problems(plan)
    problems += _placement_problems(plan)
    problems += _prompt_problems(plan)
    hw = plan.hw
    if hw.host_memory and plan.host_needed > hw.host_memory:
        problems.append(
            f"host memory: the actors need {bytes_text(plan.host_needed)}, this machine has "
            f"{bytes_text(hw.host_memory)}: fewer actors or less offload "
            "(learner.offload_optimizer, learner.reference_offload)"
        )
    return problems


def _gpu_problems(plan: Plan) -> list[str]:
    cfg, g = plan.cfg, plan.hw.gpu_memory
    if g is None:
        return []
    problems = []
    learner = plan.learner_total.device
    if learner > g:
        parts = ", ".join(
            f"{k} {bytes_text(v.device)}" for k, v in plan.learner.items() if v.device
        )
        if plan.reference is not None and plan.reference.device:
            parts += f", KL reference {bytes_text(plan.reference.device)}"
        problems.append(
            f"a learner rank's model states take {bytes_text(learner)} of its GPU ({parts}), "
            f"more than the GPU's {bytes_text(g)} (cluster.gpu_memory_gib): shard them "
            "(learner.zero_stage=3, more cluster.learner_ranks), learner.offload_optimizer=true, "
            "learner.bf16=true, model.freeze_vision=true or learner.reference_offload=true"
        )
    problems += plan.engine.problems
    colocated = cfg.cluster.colocate and plan.learner_on_gpu and plan.engine_on_gpu
    if colocated and learner <= g and plan.gpu_peak > g:
        problems.append(
            f"colocated: a learner rank's {bytes_text(learner)} + the engine's "
            f"{bytes_text(plan.engine_device)} = {bytes_text(plan.gpu_peak)} > {bytes_text(g)} "
            "per GPU: lower rollout.vllm.gpu_memory_utilization, shrink the learner's states "
            "(learner.zero_stage, learner.offload_optimizer) or set cluster.colocate=false"
        )
    return problems


def _placement_problems(plan: Plan) -> list[str]:
    c, hw = plan.cfg.cluster, plan.hw
    problems = []
    if hw.gpus_per_node:
        big = [b["GPU"] for b in plan.bundles if b.get("GPU", 0) > hw.gpus_per_node]
        strict = c.placement_strategy == "STRICT_PACK"
        if big:
            problems.append(
                f"a bundle asks for {big[0]:g} GPUs, more than a node's {hw.gpus_per_node} "
                "(cluster.gpus_per_node): lower cluster.gpus_per_rollout_worker "
                "(rollout.vllm.tensor_parallel_size)"
            )
        elif plan.nodes and plan.nodes > 1 and (hw.single_node or strict):
            why = "a local ray.init() has one node" if hw.single_node else "STRICT_PACK"
            problems.append(
                f"the bundles need {plan.gpus_needed:g} GPUs, {plan.nodes} nodes of "
                f"{hw.gpus_per_node}, but {why}: fewer cluster.learner_ranks or "
                "cluster.rollout_workers, cluster.colocate=true, or a Ray cluster "
                "(cluster.address)"
            )
    if hw.single_node and c.num_cpus is not None:
        # The same check (and words) as the cluster's start-up check, against what the local
        # ray.init() will advertise.
        problems += [
            f"cluster.num_cpus={c.num_cpus}: {problem}"
            for problem in resource_shortfall(
                plan_bundles(c),
                plan.cfg.reward.num_workers,
                str(c.placement_strategy),
                {"CPU": c.num_cpus},
            )
        ]
    return problems


def _prompt_problems(plan: Plan) -> list[str]:
    b, m, r = plan.prompt, plan.model, plan.cfg.rollout
    key = engine_spec(r.backend).window_key  # what sets b.window
    problems = []
    if b.window is not None and b.longest > b.window:
        images = (
            f" ({b.images} image(s) x {b.image_tokens} tokens at max_pixels {m.max_pixels})"
            if b.image_tokens is not None
            else ""
        )
        problems.append(
            f"prompt ~{b.prompt} tokens{images} + rollout.max_new_tokens {r.max_new_tokens} = "
            f"{b.longest} > {key} {b.window}: raise {str(key).rsplit('.', 1)[-1]}, or lower "
            "rollout.max_new_tokens or model.max_pixels"
        )
    limit = b.window or b.longest
    if m.max_positions and limit > m.max_positions:
        what = f"{key} {b.window}" if b.window else f"the longest sequence, {b.longest} tokens,"
        lower = f"{key} or rollout.max_new_tokens" if key else "rollout.max_new_tokens"
        problems.append(
            f"{what} exceeds the model's {m.max_positions} positions "
            f"(max_position_embeddings): lower {lower}"
        )
    return problems
