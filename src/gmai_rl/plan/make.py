"""The plan of a configuration: the `Plan` record (every number `render` prints and `check`
checks) and `make_plan`, which puts its parts together: the learner's states (`memory`), the
model's facts (`model`), the nodes (`nodes`), the prompt budget (`prompt`) and the rollout
engine's part, which its spec works out (`rollout.engines`: this package names no engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gmai_rl.cluster.placement import plan_bundles
from gmai_rl.config import TrainConfig
from gmai_rl.plan.memory import (
    Memory,
    activations,
    deepspeed_buffers,
    learner_states,
    lm_head_working,
    on_host,
    reference_states,
    total,
)
from gmai_rl.plan.model import ModelFacts, read_model
from gmai_rl.plan.nodes import Hardware, hardware, nodes_needed
from gmai_rl.plan.prompt import (
    PromptBudget,
    mixed_images_under_zero3,
    over_image_limit,
    prompt_budget,
)
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.sizing import MIB, EnginePlan, ModelShape, bytes_text, dtype_bytes
from gmai_rl.rollout.spec import EngineInputs
from gmai_rl.types import MCQItem


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
    working: dict[str, Memory] = field(default_factory=dict)
    """What one learner rank holds beyond its states while it trains a micro-batch."""
    push: dict[str, Memory] = field(default_factory=dict)
    """What learner rank 0 holds beyond its states while it pushes the weights."""
    engine_receive: float = 0.0
    """An engine's receive buffer on its GPU during a push, outside its reserved share."""
    notes: list[str] = field(default_factory=list)
    data_problems: list[str] = field(default_factory=list)
    """What the run's questions ask of the engine that it refuses (measured when given)."""

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
    def learner_training(self) -> float:
        """A learner rank's GPU bytes while it trains: states and a micro-batch's working set."""
        return self.learner_total.device + total(self.working.values()).device

    @property
    def learner_pushing(self) -> float:
        """Learner rank 0's GPU bytes while it pushes: states and the buckets in flight."""
        return self.learner_total.device + total(self.push.values()).device

    @property
    def engine_pushed(self) -> float:
        """An engine's GPU bytes while it receives a push."""
        return self.engine_device + (self.engine_receive if self.engine_on_gpu else 0.0)

    @property
    def engine_sleeps(self) -> bool:
        """Colocated engines free their GPU memory while the learners train."""
        return engine_spec(self.cfg.rollout.backend).sleeps(self.cfg)

    @property
    def gpu_peak(self) -> float:
        """The most one GPU holds. Separate: the most of a training learner rank, rank 0 in a
        push and an engine receiving one. Colocated, the phases share the GPU: training beside an
        engine (asleep: nothing of it), or a push into the awake engine; the learner keeps its
        states throughout."""
        if self.cfg.cluster.colocate:
            beside = 0.0 if self.engine_sleeps else self.engine_device
            return max(self.learner_training + beside, self.learner_pushing + self.engine_pushed)
        return max(self.learner_training, self.learner_pushing, self.engine_pushed)

    @property
    def host_needed(self) -> float:
        """Host memory of all actors together: learner parts on CPU or offloaded (with their
        working set on CPU), engines on CPU or asleep."""
        c = self.cfg.cluster
        engine = (0.0 if self.engine_on_gpu else self.engine.reserved) + self.engine.asleep_on_host
        working = max(total(self.working.values()).host, total(self.push.values()).host)
        return c.learner_ranks * (self.learner_total.host + working) + c.rollout_workers * engine

    @property
    def zero3_load_ranks(self) -> int:
        """Learner ranks that load on one node: all of them on one machine, else one per GPU."""
        ranks, per_node = self.cfg.cluster.learner_ranks, self.hw.gpus_per_node
        if self.learner_on_gpu and per_node and not self.hw.single_node:
            return min(ranks, per_node)
        return ranks

    @property
    def zero3_load_host(self) -> float:
        """Host memory one node's learner ranks take while loading the model under ZeRO-3 (0
        otherwise): transformers reads the whole checkpoint into every rank's memory before each
        rank keeps its partitions (`modeling_utils`, the `is_deepspeed_zero3_enabled()` branch of
        the load: a merged state dict per process, in 5.19 and 5.24), so each rank holds a full
        copy for a while. In the model's dtype (the checkpoint's own is not read)."""
        if self.cfg.learner.zero_stage != 3:
            return 0.0
        one = self.model.params.total * dtype_bytes(self.cfg.model.dtype)
        return self.zero3_load_ranks * float(one)

    @property
    def kv_tokens(self) -> int | None:
        """Tokens vLLM's KV cache holds (None for HF, or with GPU memory unknown)."""
        return self.engine.kv_tokens

    @property
    def kv_sequences(self) -> int | None:
        """Full-length sequences (rollout.vllm.max_model_len, else the longest) the cache holds."""
        tokens = self.kv_tokens
        return None if tokens is None else tokens // (self.prompt.window or self.prompt.longest)


def engine_memory(
    cfg: TrainConfig, m: ModelFacts, gpu_memory: float | None, longest: int
) -> EnginePlan:
    """The rollout engine of `cfg` for a model `m` whose longest sequence is `longest` tokens:
    its spec's part of the plan (memory, rows, problems, notes)."""
    shape = ModelShape(m.params.total, m.layers, m.kv_heads, m.head_dim, m.vocab)
    return engine_spec(cfg.rollout.backend).plan(EngineInputs(cfg, shape, gpu_memory, longest))


def make_plan(
    cfg: TrainConfig,
    model: ModelFacts | None = None,
    hw: Hardware | None = None,
    items: Sequence[MCQItem] | None = None,
    trained: Sequence[MCQItem] = (),
) -> Plan:
    """The plan of `cfg`; the model's config is read and the hardware found unless given. With
    `items` (the run's questions) the prompt budget is measured on them, and what they ask of
    the engine checked; `trained` (the RL and SFT items) are checked against the learner."""
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
    # A LoRA policy's reference is its own base with a copy of the adapters (`lora_reference`).
    if cfg.algo.loss.kl_coef > 0 and not cfg.model.lora.enabled:
        ref_bytes = 2 if lo.bf16 else weight_bytes
        reference = reference_states(
            m.params.total, c.learner_ranks, lo.zero_stage, ref_bytes, lo.reference_offload
        )
    if c.gpus_per_learner == 0:
        learner = {name: on_host(mem) for name, mem in learner.items()}
        reference = on_host(reference) if reference is not None else None
    prompt = prompt_budget(cfg, m, items)
    pushed = pushed_bytes(cfg, m)
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
        working=working_memory(cfg, m, prompt.longest),
        push=push_memory(cfg, pushed),
        engine_receive=min(float(cfg.sync.bucket_mb * MIB), pushed),
    )
    if c.gpus_per_learner == 0:
        plan.working = {name: on_host(mem) for name, mem in plan.working.items()}
        plan.push = {name: on_host(mem) for name, mem in plan.push.items()}
    plan.notes = _notes(plan)
    plan.data_problems = [
        *over_image_limit(cfg, m, items or []),
        *mixed_images_under_zero3(cfg, m, trained),
    ]
    return plan


def working_memory(cfg: TrainConfig, m: ModelFacts, longest: int) -> dict[str, Memory]:
    """One learner rank's GPU memory beyond its states while it trains: a micro-batch's
    activations at the longest sequence (`memory.activations`; unknown shape: left out, and a
    note says so), the chunked LM head, DeepSpeed's gradient bucket."""
    lo = cfg.learner
    w = 2 if lo.bf16 else dtype_bytes(cfg.model.dtype)
    rows: dict[str, Memory] = {}
    shape = m.decoder
    if shape is not None:
        how = ", checkpointed" if cfg.model.gradient_checkpointing else ""
        tokens = lo.micro_batch_size * longest
        rows[f"activations ({lo.micro_batch_size} x {longest} tokens{how})"] = Memory(
            device=activations(shape, tokens, w, cfg.model.gradient_checkpointing)
        )
        rows["LM head (chunks, its gradient)"] = Memory(
            device=lm_head_working(shape, lo.logprob_chunk_size, w, head_trains(cfg, m))
        )
    rows["DeepSpeed gradient bucket"] = Memory(
        device=deepspeed_buffers(
            lo.zero_stage,
            lo.bf16,
            dtype_bytes(cfg.model.dtype),
            m.params.trainable,
            cfg.cluster.gpus_per_learner > 0,
        )
    )
    return rows


def head_trains(cfg: TrainConfig, m: ModelFacts) -> bool:
    """Whether the LM head has a gradient: not under LoRA (no adapter on it), else whenever
    anything trains."""
    return m.params.trainable > 0 and not cfg.model.lora.enabled


def pushed_bytes(cfg: TrainConfig, m: ModelFacts) -> float:
    """The largest push on the wire: the whole model (the first push), or under LoRA the
    adapters, the only tensors that ever travel."""
    wire = dtype_bytes(cfg.sync.wire_dtype or cfg.model.dtype)
    return float(wire * (m.params.trainable if cfg.model.lora.enabled else m.params.total))


def push_memory(cfg: TrainConfig, pushed: float) -> dict[str, Memory]:
    """Learner rank 0's GPU memory beyond its states in a push of `pushed` bytes: the flat
    buckets in flight (`sync.max_buckets_in_flight` x `sync.bucket_mb`, or fewer bytes when the
    push is smaller), and under ZeRO-3 the bucket's gathered parameters."""
    s, bucket = cfg.sync, float(cfg.sync.bucket_mb * MIB)
    in_flight = min(s.max_buckets_in_flight * bucket, pushed)
    label = f"{s.max_buckets_in_flight} x {s.bucket_mb} MiB"
    if in_flight < s.max_buckets_in_flight * bucket:
        what = "the adapters" if cfg.model.lora.enabled else "the whole model"
        label = f"{what}, {bytes_text(pushed)}"
    rows = {f"weight-sync buckets ({label})": Memory(device=in_flight)}
    if cfg.learner.zero_stage == 3:
        rows["a bucket's gathered parameters"] = Memory(device=min(bucket, pushed))
    return rows


def _notes(plan: Plan) -> list[str]:
    """What the plan could not check, and why."""
    hw, m = plan.hw, plan.model
    notes = []
    if m.decoder is None:
        notes.append(
            f"activations not estimated: {m.architecture}'s config gives no hidden_size, "
            "intermediate_size or num_attention_heads"
        )
    lora = plan.cfg.model.lora
    vision_trains = lora.vision if lora.enabled else not plan.cfg.model.freeze_vision
    if m.params.trainable > 0 and m.params.vision and vision_trains:
        notes.append("the vision tower trains: its activations are not estimated")
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
