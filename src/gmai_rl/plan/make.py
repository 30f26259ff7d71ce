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
from gmai_rl.plan.memory import Memory, learner_states, on_host, reference_states, total
from gmai_rl.plan.model import ModelFacts, read_model
from gmai_rl.plan.nodes import Hardware, hardware, nodes_needed
from gmai_rl.plan.prompt import (
    PromptBudget,
    mixed_images_under_zero3,
    over_image_limit,
    prompt_budget,
)
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.sizing import EnginePlan, ModelShape, dtype_bytes
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
    plan.data_problems = [
        *over_image_limit(cfg, m, items or []),
        *mixed_images_under_zero3(cfg, m, trained),
    ]
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
