"""What cannot fit or cannot start, each problem with its numbers and the keys to change: the
learner's precision under ZeRO, GPU memory (the learner's states, the engine's, both when
colocated), the bundles against the nodes and CPUs, the longest sequence against the engine's
window and the model's positions, and host memory.
"""

from __future__ import annotations

from gmai_rl.cluster.placement import plan_bundles, resource_shortfall
from gmai_rl.plan.make import Plan
from gmai_rl.plan.nodes import driver_problems
from gmai_rl.rollout.engines import engine_spec
from gmai_rl.rollout.sizing import bytes_text


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
    problems += plan.data_problems
    problems += driver_problems(plan.hw.driver)
    hw = plan.hw
    load = plan.zero3_load_host
    if hw.host_memory and load and plan.host_needed + load > hw.host_memory:
        problems.append(
            f"host memory while the learners load: under ZeRO-3 each of {plan.zero3_load_ranks} "
            f"rank(s) reads the whole checkpoint ({bytes_text(load / plan.zero3_load_ranks)}) "
            f"before keeping its partitions; {bytes_text(load)} + the actors' "
            f"{bytes_text(plan.host_needed)} > this machine's {bytes_text(hw.host_memory)}: "
            "fewer learner ranks per node, or learner.zero_stage=2"
        )
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
    elif plan.learner_on_gpu and plan.learner_training > g:
        parts = ", ".join(f"{k} {bytes_text(v.device)}" for k, v in plan.working.items())
        problems.append(
            f"a learner rank needs {bytes_text(plan.learner_training)} while it trains, more "
            f"than the GPU's {bytes_text(g)}: its states {bytes_text(learner)} + {parts}: lower "
            "learner.micro_batch_size, set model.gradient_checkpointing=true, or shrink the "
            "states (learner.zero_stage=3, learner.offload_optimizer=true)"
        )
    problems += plan.engine.problems
    colocated = cfg.cluster.colocate and plan.learner_on_gpu and plan.engine_on_gpu
    if colocated and plan.learner_training <= g and plan.gpu_peak > g:
        beside = "asleep" if plan.engine_sleeps else bytes_text(plan.engine_device)
        problems.append(
            f"colocated: {bytes_text(plan.gpu_peak)} > {bytes_text(g)} per GPU at the busiest "
            f"phase (training: learner {bytes_text(plan.learner_training)} + engine {beside}; "
            f"pushing: learner {bytes_text(plan.learner_pushing)} + engine "
            f"{bytes_text(plan.engine_pushed)}): lower rollout.vllm.gpu_memory_utilization, "
            "shrink the learner's states (learner.zero_stage, learner.offload_optimizer), put "
            "the engines to sleep (rollout.vllm.enable_sleep_mode) or set cluster.colocate=false"
        )
    if not colocated and plan.engine_on_gpu and plan.engine_pushed > g:
        problems.append(
            f"a rollout engine takes {bytes_text(plan.engine_device)} of its GPU and "
            f"{bytes_text(plan.engine_receive)} more to receive a push (sync.bucket_mb): "
            f"{bytes_text(plan.engine_pushed)} > {bytes_text(g)}; lower "
            "rollout.vllm.gpu_memory_utilization or sync.bucket_mb"
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
