"""The plan as the table `gmai-rl plan` prints and every run logs first: the model, the
placement, one learner rank's states, the rollout engine's rows (from its spec), the prompt
budget, memory per GPU and host, the notes, and whether it fits.
"""

from __future__ import annotations

from gmai_rl.plan.make import Plan
from gmai_rl.plan.memory import Memory
from gmai_rl.plan.problems import check
from gmai_rl.plan.prompt import TEMPLATE_TOKENS
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.sizing import bytes_text

NOT_ESTIMATED = (
    "not estimated: the CUDA context and NCCL's own buffers (~1 GiB per process), the "
    "allocator's fragmentation, vLLM's overhead beyond the assumed; activations are an estimate "
    "(plan.memory.layer_activations): what is left on each GPU is for these"
)


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
    working = {**plan.working, "while training": _sum(plan.working)}
    push = {**plan.push, "while pushing (rank 0)": _sum(plan.push)}
    lines = [
        f"learner    ZeRO-{lo.zero_stage}, {precision}, {optimizer}; one rank of {ranks} on "
        f"{device}:",
        f"             {'':44} {'device':>10} {'host':>10}",
    ]
    lines += [
        f"             {name:44} {bytes_text(mem.device):>10} {bytes_text(mem.host):>10}"
        for name, mem in rows.items()
    ]
    if plan.reference is None:
        lines.append("             no KL reference (algo.loss.kl_coef=0)")
    lines.append("           and beyond its states, per micro-batch and in a push:")
    lines += [
        f"             {name:44} {bytes_text(mem.device):>10} {bytes_text(mem.host):>10}"
        for name, mem in {**working, **push}.items()
    ]
    return lines


def _sum(rows: dict[str, Memory]) -> Memory:
    return sum(rows.values(), Memory())


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
        beside = "asleep" if plan.engine_sleeps else bytes_text(plan.engine_device)
        lines += [
            f"per GPU    training: learner {bytes_text(plan.learner_training)} + engine {beside}; "
            f"pushing: learner {bytes_text(plan.learner_pushing)} + engine "
            f"{bytes_text(plan.engine_pushed)}",
            f"           at most {bytes_text(plan.gpu_peak)} of {bytes_text(g)}: "
            f"{bytes_text(g - plan.gpu_peak)} left",
        ]
    elif g:
        if plan.learner_on_gpu:
            most = max(plan.learner_training, plan.learner_pushing)
            lines.append(
                f"per GPU    learner rank {bytes_text(most)} at most (training "
                f"{bytes_text(plan.learner_training)}, pushing {bytes_text(plan.learner_pushing)})"
                f" of {bytes_text(g)}: {bytes_text(g - most)} left"
            )
        if plan.engine_on_gpu:
            lines.append(
                f"per GPU    rollout engine {bytes_text(plan.engine_device)} + "
                f"{bytes_text(plan.engine_receive)} receive buffer in a push (outside "
                f"gpu_memory_utilization) of {bytes_text(g)}"
            )
    if hw.host_memory:
        lines.append(
            f"host       {bytes_text(plan.host_needed)} for all actors, of this machine's "
            f"{bytes_text(hw.host_memory)} (local Ray)"
        )
    elif plan.host_needed:
        lines.append(f"host       {bytes_text(plan.host_needed)} for all actors")
    if load := plan.zero3_load_host:
        lines.append(
            f"host       + {bytes_text(load)} per node while the learners load (ZeRO-3: each of "
            f"{plan.zero3_load_ranks} rank(s) reads the whole checkpoint first)"
        )
    return lines
