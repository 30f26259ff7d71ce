"""The DeepSpeed configs of a learner rank: the policy's engine and the frozen reference's (pure).

Gradient accumulation is driven by the learner (the boundary is set on the last micro-batch of
each mini-batch), so `gradient_accumulation_steps` is 1 here whatever the batch.
"""

from __future__ import annotations

from typing import Any

from gmai_rl.learner.options import LearnerOptions


def deepspeed_config(opts: LearnerOptions, world_size: int) -> dict[str, Any]:
    """The policy engine's config."""
    zero: dict[str, Any] = {"stage": opts.zero_stage}
    if opts.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if opts.zero_stage == 3:
        # Gather full parameters for every forward: the tiny and medium models we train fit.
        zero["stage3_param_persistence_threshold"] = 0
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": opts.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": opts.micro_batch_size * world_size,
        "gradient_clipping": opts.grad_clip,
        "zero_optimization": zero,
        # A step with a NaN/Inf gradient is skipped on every rank (Learner._optimizer_step);
        # explicit, since DeepSpeed checks bf16 gradients only when this is on.
        "bf16": {"enabled": opts.bf16, "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if opts.bf16:
        # Without it DeepSpeed accumulates bf16 gradients in bf16 across micro-batches; GRPO's
        # zero-mean advantages make the micro-batches' gradients largely cancel, and bf16's
        # 8-bit mantissa loses what is left. ZeRO-1 then uses DeepSpeed's BF16_Optimizer, ZeRO-2/3
        # keep fp32 gradient partitions (deepspeed 0.19.8 engine._do_optimizer_sanity_check).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def reference_config(opts: LearnerOptions, world_size: int) -> dict[str, Any]:
    """The frozen reference policy: no optimizer, so ZeRO-1/2 have nothing to shard and it is a
    full replica (stage 0); under ZeRO-3, or when offloaded, its parameters are partitioned
    (stage 3), and `reference_offload` keeps them in CPU memory between uses."""
    config = deepspeed_config(opts, world_size)
    config.pop("data_types", None)  # no gradients
    partitioned = opts.zero_stage == 3 or opts.reference_offload
    zero: dict[str, Any] = {"stage": 3 if partitioned else 0}
    if partitioned:
        zero["stage3_param_persistence_threshold"] = 0
    if opts.reference_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config["zero_optimization"] = zero
    return config
