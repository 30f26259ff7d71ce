"""What a learner rank holds, in bytes: its model states under ZeRO, precision and offload, and
the frozen KL reference (pure arithmetic on parameter counts).

The figures follow what DeepSpeed 0.19.8 allocates for the config `learner.deepspeed_config`
writes; tests/unit/test_plan.py compares them with DeepSpeed's own estimators.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Memory:
    """Bytes one actor holds: on its accelerator, and in host memory."""

    device: float = 0.0
    host: float = 0.0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.device + other.device, self.host + other.host)


def total(parts: Iterable[Memory]) -> Memory:
    return sum(parts, Memory())


def on_host(m: Memory) -> Memory:
    """The same bytes in host memory (a learner rank on CPU)."""
    return Memory(host=m.device + m.host)


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


# ----------------------------------------------------------------- working memory of a step

DEEPSPEED_BUCKET = 500_000_000
"""Elements in DeepSpeed 0.19.8's gradient buckets at their defaults: `reduce_bucket_size`
(ZeRO-2/3's contiguous reduce buffer, `stage_1_and_2.setup_buckets`, `stage3` IPG buffer) and
the engine's all-reduce of whole gradients without partitioning (`MEMORY_OPT_ALLREDUCE_SIZE`,
ZeRO-0/1)."""


@dataclass(frozen=True)
class DecoderShape:
    """What a decoder's activations scale with (the text model of a vision-language one)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    """Key/value width: key-value heads x head dim."""
    vocab: int


def layer_activations(shape: DecoderShape, weight_bytes: int) -> float:
    """Bytes autograd keeps per token for one decoder layer of the Qwen2/Llama kind (RMSNorm,
    grouped-query attention through SDPA's fused kernels, SwiGLU MLP, no dropout).

    Counted on transformers' Qwen2.5-VL layer in bf16 (the saved tensors' storages; test:
    tests/unit/test_plan_activations.py): 20 x hidden + 4 x kv_dim + 8 x intermediate + 4 x heads
    (RMSNorm's fp32 upcasts, the q/k/v/o projections' inputs and outputs, the attention's
    output and log-sum-exp, the MLP's gate, up and product). Korthikanti et al. 2022's
    34 x hidden per token (GPT, 4 x hidden MLP, dropout) counts the same things for another
    layer. Other dtypes are scaled by their width (fp32 measured 1.88x bf16: an upper bound).
    Not counted: a padded micro-batch's attention mask (b x s^2, once)."""
    h, i = shape.hidden, shape.intermediate
    return (20 * h + 4 * shape.kv_dim + 8 * i + 4 * shape.heads) * weight_bytes / 2


def activations(shape: DecoderShape, tokens: int, weight_bytes: int, checkpointing: bool) -> float:
    """Bytes of one micro-batch's activations at their peak (the start of backward) for `tokens`
    tokens (padded rows count whole). With HF's gradient checkpointing each layer keeps only its
    input (hidden x weight_bytes per token) and one layer's activations are rebuilt at a time;
    the embeddings and the final norm keep ~6 x hidden x weight_bytes / 2 either way."""
    per_layer = layer_activations(shape, weight_bytes)
    outside = 6 * shape.hidden * weight_bytes / 2
    if checkpointing:
        return tokens * (shape.layers * shape.hidden * weight_bytes + outside + per_layer)
    return tokens * (shape.layers * per_layer + outside)


def lm_head_working(shape: DecoderShape, chunk: int, weight_bytes: int, trains_head: bool) -> float:
    """The chunked LM head (`algo.logprobs.linear_token_logprobs`): two chunks of fp32 logits
    (the chunk and its softmax in backward) and, when the head trains, its weight gradient
    summed over chunks in fp32 beside one chunk's product in the head's dtype."""
    logits = 2 * chunk * shape.vocab * 4
    gradient = shape.vocab * shape.hidden * (4 + weight_bytes) if trains_head else 0
    return float(logits + gradient)


def deepspeed_buffers(
    zero_stage: int, bf16: bool, weight_bytes: int, trainable: int, on_gpu: bool
) -> float:
    """DeepSpeed's gradient bucket on each rank [bytes]. ZeRO-2/3 reduce through a contiguous
    16-bit buffer of `DEEPSPEED_BUCKET` elements, allocated whole (on CPU only the part the
    gradients fill is touched); ZeRO-0/1 all-reduce the gradients a bucket at a time, flattened
    in their accumulation dtype (fp32 under bf16), so a bucket is at most the gradients."""
    if zero_stage >= 2:
        elements = DEEPSPEED_BUCKET if on_gpu else min(DEEPSPEED_BUCKET, trainable)
        return float(elements * (2 if bf16 else weight_bytes))
    return float(min(DEEPSPEED_BUCKET, trainable) * (4 if bf16 else weight_bytes))
