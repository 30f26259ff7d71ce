"""Parameters under ZeRO: loading a model the way the engine keeps it, reading and writing every
parameter whole from rank 0, and loading DeepSpeed's checkpoint files safely.

Under ZeRO-3 each parameter lives in shards over the ranks: reading one whole is a collective
(`deepspeed.zero.GatheredParameters`) that every rank enters, one parameter at a time, so a rank's
device holds at most one full parameter beyond its shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def loading_for(ds_config: dict[str, Any]) -> Iterator[None]:
    """Within it, transformers loads models the way `ds_config` keeps them.

    Under ZeRO-3 a `HfDeepSpeedConfig` makes `from_pretrained` build the model inside
    `deepspeed.zero.Init`, so no rank holds the full model on its device, and load the
    checkpoint into the partitions. Every rank reads the whole checkpoint into host memory first
    (a merged state dict per process), a full copy per rank while it loads: the plan counts it
    (`Plan.zero3_load_host`) (transformers integrations/deepspeed.py,
    `_load_state_dict_into_zero3_model`). It is dropped afterwards: transformers reads it through a
    global weak reference, and a ZeRO-3 reference must not make a ZeRO-2 policy look like ZeRO-3.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    active = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del active


def partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data lives in shards over the ranks)."""
    return hasattr(param, "ds_id")


def gather_on_rank0(
    module: torch.nn.Module, rank: int, trainable_only: bool = False
) -> dict[str, torch.Tensor] | None:
    """On rank 0 every parameter of `module` (or every trainable one), copied to the CPU; None
    on the other ranks.

    A ZeRO-3 parameter is gathered in turn (a collective every rank enters) and released before
    the next, so a rank's device holds at most one full parameter beyond its shard, and only
    rank 0 keeps host copies.
    """
    import deepspeed

    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=partitioned(param)):
            if state is not None:
                state[name] = param.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def load_on_rank0(module: torch.nn.Module, path: Path, rank: int) -> None:
    """Load a safetensors file into `module`'s parameters: rank 0 reads it; a ZeRO-3 parameter
    is re-partitioned from rank 0's copy, a replicated one is read by every rank."""
    import deepspeed
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        for name, param in module.named_parameters():
            sharded = partitioned(param)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=sharded):
                if rank == 0 or not sharded:
                    param.data.copy_(weights.get_tensor(name))


@contextmanager
def weights_only_torch_loads() -> Iterator[None]:
    """Every torch.load inside unpickles tensors and plain data only.

    DeepSpeed 0.19.8 reads its checkpoint files with `torch.load(weights_only=False)`
    (`TorchCheckpointEngine.load`): resuming from a checkpoint someone else wrote would run any
    code its pickles hold. `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides that; the optimizer states
    hold three DeepSpeed classes besides plain data, allowed by name.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@torch.no_grad()
def copy_parameters(
    source: torch.nn.Module, target: torch.nn.Module, rank: int, zero3: bool
) -> None:
    """Copy every parameter of `source` into the same-named one of `target` (the policy into
    the KL reference). Under ZeRO-3 both are partitioned: each pair is gathered, rank 0 copies,
    and DeepSpeed re-partitions the target from rank 0's copy; every rank calls."""
    import deepspeed

    sources = dict(source.named_parameters())
    for name, param in target.named_parameters():
        whole = sources[name]
        with deepspeed.zero.GatheredParameters([whole, param], modifier_rank=0, enabled=zero3):
            if rank == 0 or not zero3:
                param.data.copy_(whole.data)
