"""One learner step of a random-weight Qwen2.5-VL-3B on one GPU: tokens/s and MFU.

    PYTHONPATH=src python benchmarks/gpu_learner.py [--micro-batch 4 --grad-checkpointing off ...]
    .venv/bin/python benchmarks/gpu_learner.py --tiny          # the same code on CPU, in seconds

Needs only torch and transformers: no Ray, DeepSpeed or vLLM is imported (the modules used here,
`gmai_rl.algo`, `gmai_rl.models.scoring`, `.inputs`, `.loading` and `gmai_rl.learner.options`,
are torch-only; tests/unit/test_gpu_learner_bench.py runs the script with the three blocked).

What a step is: the learner's own maths on `--grad-accum` micro-batches of `--micro-batch`
samples, then one optimizer step. Each sample is one image (`--image-size` square, as Qwen2.5-VL's
processor would deliver it: 14-px patches, 2 frames per temporal patch, 2x2 merge; 448 px gives
1024 patches, 256 image tokens), `--prompt-tokens` of prompt text and `--completion-tokens` of
completion, random ids. Per micro-batch: the backbone's forward, the completion log-probs and
entropies through the chunked LM head (`models.scoring.completion_scores`), the clipped GRPO loss
(`algo.policy_loss`, the learner's default clip bounds, token-mean), backward; then the global
gradient-norm clip and AdamW.

Precision, as the learner's DeepSpeed bf16 path keeps it: bf16 weights and activations, fp32
master weights, gradients accumulated in fp32, fp32 AdamW moments. Memory for 3.75B parameters:
bf16 weights 7.5 GB + fp32 master 15 GB + fp32 gradients 15 GB + AdamW moments 30 GB = 67.5 GB,
plus one parameter's bf16 gradient at a time (a hook moves each into its fp32 sum as backward
produces it) and the activations: well inside an H200's 141 GB. `--dtype fp32` trains the fp32
weights in place (no master copy).

Left out, each a fixed extra cost a real step adds: the KL reference's forward (kl_coef > 0), the
scoring pass for old log-probs when a batch takes several optimizer steps (this step is
on-policy: old = current, detached), the learning-rate schedule, data collation, NCCL.

Tokens counted: every position of every LM sequence (image tokens, prompt, completion), summed over
the step's samples; the vision tower's patches are not tokens here, but their FLOPs are in MFU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from gmai_rl.algo import policy_loss
from gmai_rl.learner.options import LearnerOptions, LossOptions
from gmai_rl.models.inputs import PolicyBatch
from gmai_rl.models.loading import (
    check_attn_implementation,
    freeze_vision_tower,
    is_vision_parameter,
)
from gmai_rl.models.scoring import completion_scores

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Dense bf16 tensor-core peaks (TFLOP/s), NVIDIA's datasheets (their headline figures are with 2:4
# sparsity, twice these). First match of the device name wins, so the PCIe/NVL variants come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


# --------------------------------------------------------------------------------- the model


def qwen2_5_vl_3b_config() -> Any:
    """Qwen/Qwen2.5-VL-3B-Instruct's architecture (its config.json on the Hugging Face hub):
    a Qwen2.5-3B decoder (hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11008, vocabulary
    151,936, tied embeddings, M-RoPE sections 16/24/24) under a 32-block ViT (hidden 1280, 16 heads,
    MLP 3420, 112-px windows with full attention in blocks 7/15/23/31) merging 2x2 patches into the
    decoder's 2048. 3.75B parameters, 0.67B of them the vision tower's."""
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [16, 24, 24],
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": True,
    }
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def tiny_config() -> Any:
    """The same architecture at CPU size (0.35M parameters); special ids at the vocabulary's top."""
    from transformers import Qwen2_5_VLConfig

    vocab = 512
    text = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # head_dim 16: 8 rotary frequencies split (temporal, height, width).
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
        },
        "bos_token_id": vocab - 6,
        "eos_token_id": vocab - 5,
        "tie_word_embeddings": True,
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab - 2,
        video_token_id=vocab - 1,
        vision_start_token_id=vocab - 4,
        vision_end_token_id=vocab - 3,
        tie_word_embeddings=True,
    )


def build_model(config: Any, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> Any:
    """Random weights, built on `device` directly (no host copy of 3.75B parameters)."""
    from transformers import AutoModelForImageTextToText

    with device:
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn
        )
    return model.train()


# --------------------------------------------------------------------------------- the inputs


def image_grid(image_size: int, vision: Any) -> tuple[int, int, int]:
    """(t, h, w) in patches of one still image, as Qwen2-VL's image processor gives it: the side
    rounded to a multiple of patch x merge (28 px), the frame repeated to fill a temporal patch."""
    unit = vision.patch_size * vision.spatial_merge_size
    side = max(unit, round(image_size / unit) * unit) // vision.patch_size
    return 1, side, side


def random_batch(
    config: Any, micro_batch: int, prompt_tokens: int, completion_tokens: int, image_size: int
) -> PolicyBatch:
    """A `PolicyBatch` of equal-length samples: <|vision_start|> image tokens <|vision_end|>, the
    prompt text, then the completion; random text ids below the special tokens."""
    vision = config.vision_config
    t, h, w = image_grid(image_size, vision)
    patches = t * h * w
    image_tokens = patches // vision.spatial_merge_size**2
    text_ids = config.vision_start_token_id  # random ids stay below the vision special tokens

    image = [config.image_token_id] * image_tokens
    prompt_len = 2 + image_tokens + prompt_tokens
    seq_len = prompt_len + completion_tokens
    input_ids = torch.randint(0, text_ids, (micro_batch, seq_len))  # [B, L]
    input_ids[:, : prompt_len - prompt_tokens] = torch.tensor(
        [config.vision_start_token_id, *image, config.vision_end_token_id]
    )
    mm_token_type_ids = (input_ids == config.image_token_id).long()  # [B, L] 1 on image tokens
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    model_inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": torch.randn(micro_batch * patches, patch_dim),  # [B x patches, 1176]
        "image_grid_thw": torch.tensor([[t, h, w]] * micro_batch),  # [B, 3]
    }
    # Logits at position P - 1 + c predict completion token c (models.inputs.build_policy_batch).
    logit_index = torch.arange(prompt_len - 1, seq_len - 1).expand(micro_batch, -1)  # [B, C]
    return PolicyBatch(
        model_inputs,
        completion_ids=input_ids[:, prompt_len:],  # [B, C]
        completion_mask=torch.ones(micro_batch, completion_tokens),  # [B, C]
        logit_index=logit_index.contiguous(),
    )


# ----------------------------------------------------------------------------- the optimizer


class MasterAdamW:
    """AdamW on fp32 master copies of low-precision weights, as DeepSpeed's bf16 optimizer runs it.

    Each parameter's gradient is added to its master's fp32 gradient as soon as backward has
    produced it (a post-accumulate hook), then freed, so micro-batches accumulate in fp32 and at
    most one bf16 gradient is alive. `step` clips the fp32 gradients' global norm, updates the
    masters and copies them back into the model. fp32 parameters are their own masters.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, grad_clip: float, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        self.grad_clip = grad_clip
        self.masters = self.params
        if any(p.dtype != torch.float32 for p in self.params):
            self.masters = [p.detach().float() for p in self.params]
            for p, master in zip(self.params, self.masters, strict=True):
                p.register_post_accumulate_grad_hook(_accumulate_into(master))
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, fused=fused)

    def step(self) -> torch.Tensor:
        """Clip, update, copy back; returns the gradient norm before clipping (0-d tensor)."""
        grads = [m for m in self.masters if m.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                for p, master in zip(self.params, self.masters, strict=True):
                    p.copy_(master)
        return norm


def _accumulate_into(master: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        assert param.grad is not None
        if master.grad is None:
            master.grad = param.grad.float()
        else:
            master.grad.add_(param.grad)
        param.grad = None

    return hook


# ----------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class TextDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, text: Any) -> TextDims:
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
        )

    @property
    def layer_matmul_params(self) -> int:
        """q, k, v, o projections and the SwiGLU MLP's gate, up and down (biases left out)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class VisionDims:
    depth: int
    hidden: int
    intermediate: int
    patch_dim: int
    merge: int
    out_hidden: int
    window: int
    full_blocks: int

    @classmethod
    def of(cls, vision: Any) -> VisionDims:
        return cls(
            depth=vision.depth,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch_dim=vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
            merge=vision.spatial_merge_size,
            out_hidden=vision.out_hidden_size,
            # A window's side in merged tokens (112 px / 14 px / 2 = 4: 8 x 8 patches).
            window=vision.window_size // vision.spatial_merge_size // vision.patch_size,
            full_blocks=len(vision.fullatt_block_indexes),
        )


def text_flops(d: TextDims, seq_len: int, scored: int) -> float:
    """Forward + backward FLOPs of one decoder sequence of `seq_len` tokens whose last `scored`
    positions go through the LM head.

    PaLM's model-FLOPs count (Chowdhery et al. 2022, "PaLM", appendix B; torchtitan's
    `get_num_flop_per_token` uses the same): 6 N per token for the N matmul weights (2 forward,
    4 backward), plus 12 L H Q T per token for attention (QK^T and AV, L layers, H heads of size
    Q, over T = seq_len keys; the full square, as PaLM and Megatron count it, though the causal
    kernels compute half). The LM head (V x hidden) runs on the scored positions only: that is all
    the learner's loss needs (`models.scoring`). Recomputation (gradient checkpointing, the
    chunked head's backward) is not counted, as MFU prescribes.
    """
    dense = 6 * d.layers * d.layer_matmul_params * seq_len
    attention = 12 * d.layers * d.heads * d.head_dim * seq_len**2
    head = 6 * d.vocab * d.hidden * scored
    return float(dense + attention + head)


def vision_flops(d: VisionDims, grid: tuple[int, int, int], trained: bool = True) -> float:
    """FLOPs of the vision tower on one image of `grid` (t, h, w) patches, counted as `text_flops`
    counts: 6 per matmul weight per patch (the patch embedding, each block's qkv, proj and SwiGLU
    MLP; the merger per merged token), 12 x hidden x S per patch for attention over S keys: the
    patch's window in most blocks, the whole image in the `full_blocks`. Non-causal attention
    really computes the full square. A frozen tower (`trained=False`) runs forward only: a third.
    """
    t, h, w = grid
    patches = t * h * w
    block = 4 * d.hidden**2 + 3 * d.hidden * d.intermediate
    unit = d.merge**2
    merger = (unit * d.hidden) ** 2 + unit * d.hidden * d.out_hidden
    dense = (d.patch_dim * d.hidden + d.depth * block) * patches + merger * patches // unit
    # Windows tile the merged grid from its top-left corner; the last row and column may be short.
    # A window of r x c merged tokens has S = r c unit patches, each attending to S keys: S^2 pairs.
    rows = _tile_sizes(h // d.merge, d.window)
    cols = _tile_sizes(w // d.merge, d.window)
    window_pairs = t * unit**2 * sum(r * r for r in rows) * sum(c * c for c in cols)
    full_pairs = t * (h * w) ** 2  # frames attend within themselves
    pairs = (d.depth - d.full_blocks) * window_pairs + d.full_blocks * full_pairs
    total = 6 * dense + 12 * d.hidden * pairs
    return float(total if trained else total / 3)


def _tile_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_TFLOPS if key in device_name), None)


# --------------------------------------------------------------------------------- the bench


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field of `Options` with its --help text (and argparse extras) beside its default."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Options:
    micro_batch: int = option(4, "samples per forward/backward")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    steps: int = option(10, "timed steps; the median is reported")
    warmup: int = option(3, "untimed steps first (allocator growth, kernel selection)")
    prompt_tokens: int = option(100, "prompt text tokens per sample, besides the image's")
    completion_tokens: int = option(1024, "completion tokens per sample")
    image_size: int = option(448, "side of the square image in px (448: 256 image tokens)")
    dtype: str = option("bf16", "bf16 (fp32 master weights and moments) or fp32", choices=DTYPES)
    grad_checkpointing: bool = option(
        True, "on, as conf/model/qwen2_5_vl_3b.yaml (recomputation is not in MFU), or off"
    )
    attn: str = option("sdpa", "attention kernels", choices=("sdpa", "flash_attention_2", "eager"))
    freeze_vision: bool = option(False, "train the decoder only (the 3B preset's choice)")
    tiny: bool = option(False, "a 0.35M-parameter model of the same architecture, CPU-sized")
    device: str | None = option(None, "default: cuda when available, else cpu", type=str)
    peak_tflops: float | None = option(
        None, "the device's dense bf16 peak; default: by CUDA device name", type=float
    )
    lr: float = option(1e-6, "AdamW learning rate")
    seed: int = option(0, "torch seed (weights, inputs, advantages)")


TINY = {
    "micro_batch": 2,
    "prompt_tokens": 16,
    "completion_tokens": 32,
    "image_size": 56,
    "dtype": "fp32",
    "steps": 3,
    "warmup": 1,
}
"""What --tiny changes unless the command line says otherwise."""


@dataclass
class Record:
    """What one benchmark run measured."""

    options: Options
    device_name: str
    params: int
    vision_params: int
    tokens_per_step: int
    flops_per_step: float
    step_seconds: list[float]
    """Every timed step's wall time."""
    losses: list[float]
    grad_norms: list[float]
    """Global gradient norm before clipping, per step (warm-up included)."""
    peak_tflops: float | None
    peak_memory_gb: float | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_s

    @property
    def tflops(self) -> float:
        """Achieved model TFLOP/s."""
        return self.flops_per_step / self.median_s / 1e12

    @property
    def mfu(self) -> float | None:
        return self.tflops / self.peak_tflops if self.peak_tflops else None


def run(opts: Options) -> Record:
    """Build the model and a batch, take warmup + steps learner steps, return the measurements."""
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_attn_implementation(opts.attn)
    config = tiny_config() if opts.tiny else qwen2_5_vl_3b_config()
    model = build_model(config, DTYPES[opts.dtype], device, opts.attn)
    if opts.freeze_vision:
        freeze_vision_tower(model)
    if opts.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named = dict(model.named_parameters())
    params = sum(p.numel() for p in named.values())
    vision_params = sum(p.numel() for n, p in named.items() if is_vision_parameter(n))

    learner, loss_opts = LearnerOptions(), LossOptions()
    optimizer = MasterAdamW(
        model.parameters(), opts.lr, learner.grad_clip, fused=device.type == "cuda"
    )
    batch = random_batch(
        config, opts.micro_batch, opts.prompt_tokens, opts.completion_tokens, opts.image_size
    ).to(device)
    mask = batch.completion_mask  # [B, C]
    # Normalisers over the whole optimizer step, as the learner passes them (`loss_normalisers`).
    num_tokens = int(mask.sum()) * opts.grad_accum
    num_seqs = opts.micro_batch * opts.grad_accum
    suppressed = (
        config.vision_start_token_id,
        config.vision_end_token_id,
        config.image_token_id,
        config.video_token_id,
    )

    def step() -> tuple[float, float]:
        loss_sum = torch.zeros((), device=device)
        for _ in range(opts.grad_accum):
            logprobs, _entropy = completion_scores(
                model,
                batch,
                loss_opts.temperature,
                suppressed,
                learner.logprob_chunk_size,
                with_entropy=True,
            )  # [B, C] each
            advantages = torch.randn(opts.micro_batch, device=device)  # [B]
            loss, _ = policy_loss(
                logprobs,
                logprobs.detach(),  # on-policy: pi_old is the current policy
                advantages,
                mask,
                clip_eps_low=loss_opts.clip_eps_low,
                clip_eps_high=loss_opts.clip_eps_high,
                loss_agg=loss_opts.loss_agg,
                num_tokens=num_tokens,
                num_seqs=num_seqs,
            )
            loss.backward()
            loss_sum += loss.detach()
        norm = optimizer.step()
        return float(loss_sum), float(norm)  # host syncs: the step is over

    losses, norms, seconds = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(opts.warmup + opts.steps):
        _sync(device)
        start = time.perf_counter()
        loss, norm = step()
        _sync(device)
        if i >= opts.warmup:
            seconds.append(time.perf_counter() - start)
        losses.append(loss)
        norms.append(norm)

    t, h, w = image_grid(opts.image_size, config.vision_config)
    seq_len = batch.model_inputs["input_ids"].shape[1]
    per_sample = text_flops(
        TextDims.of(config.text_config), seq_len, opts.completion_tokens
    ) + vision_flops(VisionDims.of(config.vision_config), (t, h, w), not opts.freeze_vision)
    samples = opts.micro_batch * opts.grad_accum
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Record(
        options=opts,
        device_name=name,
        params=params,
        vision_params=vision_params,
        tokens_per_step=samples * seq_len,
        flops_per_step=samples * per_sample,
        step_seconds=seconds,
        losses=losses,
        grad_norms=norms,
        peak_tflops=opts.peak_tflops or (peak_tflops(name) if cuda else None),
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(record: Record) -> str:
    """The run as one markdown row under its header."""
    o = record.options
    mfu = f"{record.mfu:.1%}" if record.mfu is not None else "n/a"
    memory = f"{record.peak_memory_gb:.1f}" if record.peak_memory_gb is not None else "n/a"
    model = "tiny Qwen2.5-VL" if o.tiny else "Qwen2.5-VL-3B"
    params, vision = _count(record.params), _count(record.vision_params)
    frozen = ", vision frozen" if o.freeze_vision else ""
    cells = [
        f"{model} ({params}, vision {vision}{frozen})",
        record.device_name,
        f"{o.dtype}, {o.attn}, ckpt {'on' if o.grad_checkpointing else 'off'}",
        f"{o.micro_batch} x {o.grad_accum}",
        f"{o.image_size} px + {o.prompt_tokens} + {o.completion_tokens}",
        f"{record.tokens_per_step}",
        f"{record.median_s:.3f} ({min(record.step_seconds):.3f}-{max(record.step_seconds):.3f})",
        f"{record.tokens_per_s:,.0f}",
        f"{record.tflops:.3g}",
        mfu,
        memory,
    ]
    header = [
        "model (params)",
        "device",
        "precision, attention",
        "micro-batch x accum",
        "image + prompt + completion",
        "tokens/step",
        "step s, median (range)",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        "peak GB",
    ]
    return "\n".join(
        "| " + " | ".join(row) + " |" for row in (header, ["---"] * len(header), cells)
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line: a flag per field, on/off for a field that defaults to on;
    --tiny also changes the defaults in TINY."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_off = {"on": True, "off": False}
    switches = [f.name for f in fields(Options) if f.default is True]
    for f in fields(Options):
        kwargs = {"default": None, **f.metadata}
        if f.default is False:
            kwargs["action"] = "store_true"
        elif f.name in switches:
            kwargs["choices"] = on_off
        elif "type" not in kwargs and "choices" not in kwargs:
            kwargs["type"] = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    given.update({k: on_off[given[k]] for k in switches if k in given})
    return Options(**{**(TINY if given.get("tiny") else {}), **given})


def main(argv: Sequence[str] | None = None) -> Record:
    record = run(parse_args(argv))
    print(table(record))
    print(
        f"\nmodel FLOPs per step {record.flops_per_step:.4g}; loss {record.losses[-1]:.4g}, "
        f"grad norm {record.grad_norms[-1]:.4g} (last step)"
    )
    return record


if __name__ == "__main__":
    main()
