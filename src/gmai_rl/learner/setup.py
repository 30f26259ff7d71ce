"""A learner rank's start: joining the learner group, and the DeepSpeed engines it trains with.

The policy is one ZeRO engine with an AdamW optimizer over its trainable parameters; the KL
reference, when the loss has a KL term, a second engine without one, loaded without gradient
checkpointing (it never runs backward). Each model is loaded the way its engine keeps it:
whole onto the rank's GPU under ZeRO-0/1/2, into partitions under ZeRO-3 (`zero.loading_for`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from gmai_rl.learner.deepspeed_config import deepspeed_config, reference_config
from gmai_rl.learner.options import LearnerOptions
from gmai_rl.learner.zero import loading_for
from gmai_rl.models.device import require_cuda
from gmai_rl.models.loading import ModelOptions, load_model


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, use_cuda: bool
) -> str:
    """Join the learner group (NCCL on GPU, gloo on CPU); returns the device ("cuda:0", "cpu").

    `use_cuda` is the configuration's choice; a GPU rank without working CUDA fails here.
    """
    if use_cuda:
        require_cuda(f"learner rank {rank}")
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    import deepspeed

    if not use_cuda:
        # The shared-memory comm op serves only tensor-parallel inference all-reduce, never
        # training; marking it incompatible skips its C++ build (~20-50 s on a fresh machine).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False
    )
    if use_cuda:
        # Ray gives each actor its own GPU(s) through CUDA_VISIBLE_DEVICES.
        torch.cuda.set_device(0)
        return "cuda:0"
    return "cpu"


def load_device(device: torch.device, ds_config: dict[str, Any]) -> str | None:
    """Where a model's weights are loaded: straight onto the rank's GPU when it holds them whole
    (ZeRO-0/1/2), else by transformers' ZeRO-3 path (`loading_for`)."""
    partitioned = ds_config["zero_optimization"]["stage"] == 3
    return str(device) if device.type == "cuda" and not partitioned else None


def build_policy(
    model: ModelOptions, learner: LearnerOptions, world_size: int, device: torch.device
) -> tuple[Any, torch.optim.Optimizer]:
    """The policy's DeepSpeed engine and its optimizer (the rate is set per step, from 0)."""
    import deepspeed

    config = deepspeed_config(learner, world_size)
    with loading_for(config):
        policy = load_model(model, device=load_device(device, config))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config)
    return engine, optimizer


def build_reference(
    model: ModelOptions, learner: LearnerOptions, world_size: int, device: torch.device
) -> Any:
    """The frozen KL reference's DeepSpeed engine (eval mode, no optimizer)."""
    import deepspeed

    config = reference_config(learner, world_size)
    with loading_for(config):
        reference = load_model(
            replace(model, gradient_checkpointing=False),
            device=load_device(device, config),
        )
    reference.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=reference.eval(), config=config)
    return engine
