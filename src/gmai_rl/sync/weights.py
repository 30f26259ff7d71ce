"""Send and receive policy weights over a `SyncGroup`, one bucket at a time.

`push_weights` runs on every learner rank (under ZeRO-3 each bucket is gathered collectively;
only rank 0 broadcasts), first the plan's fingerprint, then each bucket flattened and cast to the
wire dtype. `receive_weights` is the receivers' iterator of (name, tensor) for the engine's loader,
one bucket in memory at a time. `checksums` are exact (sha256 of the bytes), for verify mode.
The design and its measurements: docs/weight-sync.md.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from gmai_rl.sync.buckets import (
    Bucket,
    TensorSpec,
    dtype_name,
    flatten,
    plan_fingerprint,
    torch_dtype,
    unflatten,
)

# Opens one bucket on the sender: a context in which the bucket's tensors are full and readable
# (under ZeRO-3: gathered), yielding them in `bucket.specs` order; leaving it releases them.
OpenBucket = Callable[[Bucket], AbstractContextManager[Sequence[torch.Tensor]]]
# Makes a ZeRO-3 gather context for a list of parameters (deepspeed.zero.GatheredParameters).
GatherFn = Callable[[list[torch.nn.Parameter]], AbstractContextManager[object]]


class Broadcaster(Protocol):
    """What the send/receive loops need of a group (`SyncGroup`, or a fake in tests)."""

    rank: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...


class PlanMismatchError(RuntimeError):
    """The receiver's bucket plan differs from the sender's."""


def param_specs(
    named_params: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | str | None = None
) -> list[TensorSpec]:
    """The specs of a model's parameters as they will travel.

    Args:
        named_params: e.g. `model.named_parameters()` (pass the bare module, not a DeepSpeed
            engine, or every name gains a "module." prefix). Tied weights appear once there.
        dtype: the wire dtype, e.g. "bfloat16" to ship fp32 master weights to a bf16 rollout
            engine at half the bytes; default: each parameter's own dtype.

    Returns:
        One spec per parameter with its FULL shape: under ZeRO-3 `param.shape` is the empty
        partitioned placeholder, and the real shape is `param.ds_shape`, used when present.
    """
    specs = []
    for name, param in named_params:
        shape = tuple(getattr(param, "ds_shape", param.shape))
        specs.append(
            TensorSpec(name, shape, dtype_name(dtype if dtype is not None else param.dtype))
        )
    return specs


def send_weights(
    group: Broadcaster | None,
    plan: Sequence[Bucket],
    open_bucket: OpenBucket,
    *,
    verify: bool = False,
) -> dict[str, str] | None:
    """Push every bucket of `plan`: the loop every learner rank runs.

    Per bucket: open it (ZeRO-3: gather), flatten + cast to the wire dtype and broadcast (rank 0
    only), close it (ZeRO-3: release). The broadcast happens while the bucket is open, so no
    learner rank holds more than one bucket's gathered parameters.

    Args:
        group: learner rank 0's sync group (must be group rank 0), or None on the other learner
            ranks, which only open and close each bucket (taking part in ZeRO-3 gathers).
        plan: the bucket plan, identical on every learner rank and every receiver.
        open_bucket: see `OpenBucket`; entered and left once per bucket, in plan order.
        verify: also return the checksums of what was sent. Costs a device->host copy and a
            sha256 of the whole model.

    Returns:
        {name: tensor_checksum} of the sent tensors (wire dtype) when `group` is given and
        `verify` is set; else None.
    """
    if group is not None:
        if group.rank != 0:
            raise ValueError(f"weights are sent from sync-group rank 0, this is rank {group.rank}")
        group.broadcast(_fingerprint_tensor(plan, group.device), src=0)
    sent: dict[str, str] | None = {} if group is not None and verify else None
    for bucket in plan:
        with open_bucket(bucket) as tensors:
            if group is None:
                continue
            flat = flatten(bucket, tensors, device=group.device)
            group.broadcast(flat, src=0)
        if sent is not None:
            sent.update(checksums(unflatten(bucket, flat)))
    return sent


def receive_weights(
    group: Broadcaster, plan: Sequence[Bucket], device: torch.device | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive one push, yielding (name, tensor) bucket by bucket, in plan order.

    Lazy: bucket k is received when the consumer asks for its first tensor, so a loader that
    copies each tensor into the model (vLLM `model.load_weights(weights=...)`, or
    `params[name].data.copy_(tensor)` for HF) holds one bucket at a time. The consumer MUST
    exhaust the iterator: the sender blocks on every bucket until all receivers take it, and a
    half-read push leaves the group out of step (the sender then times out).

    Args:
        group: this worker's sync group (rank >= 1).
        plan: the same plan the sender uses.
        device: where the buffers live; default: the group's device (CPU for gloo, the GPU for
            NCCL, which must receive into CUDA memory).

    Yields:
        (name, tensor) with the spec's full shape and wire dtype. Each tensor is a view into its
        bucket's freshly allocated buffer, never reused for a later bucket (see `unflatten`).

    Raises:
        PlanMismatchError: the sender's plan differs from `plan` (raised before any bucket).
    """
    device = torch.device(device) if device is not None else group.device
    expected = _fingerprint_tensor(plan, device)
    received = torch.zeros_like(expected)
    group.broadcast(received, src=0)
    if not torch.equal(received, expected):
        raise PlanMismatchError(
            "the sender's bucket plan differs from this receiver's (names, shapes, wire dtypes "
            "or bucket size): build both from the same plan object"
        )
    for bucket in plan:
        flat = torch.empty(bucket.numel, dtype=torch_dtype(bucket.dtype), device=device)
        group.broadcast(flat, src=0)
        yield from unflatten(bucket, flat)


def push_weights(
    model: torch.nn.Module,
    plan: Sequence[Bucket],
    group: Broadcaster | None,
    zero_stage: int,
    *,
    verify: bool = False,
    gather: GatherFn | None = None,
) -> dict[str, str] | None:
    """Push `model`'s current parameters; called by EVERY learner rank at the same time.

    Args:
        model: the bare module (`engine.module` for DeepSpeed), whose parameter names are the
            plan's names.
        plan: from `plan_buckets(param_specs(model.named_parameters(), wire_dtype), ...)`,
            the same on every learner rank (it is deterministic, so building it on each rank
            works too) and on every receiver.
        group: learner rank 0's SyncGroup; None on the other learner ranks.
        zero_stage: 3 gathers each bucket's parameters across the learner ranks (every rank
            must call); below 3 the parameters are full everywhere and only rank 0 does work.
        verify: rank 0 returns `checksums` of what it sent (wire dtype), else None.
        gather: the ZeRO-3 gather context factory; default
            `deepspeed.zero.GatheredParameters(params, modifier_rank=None)` (tests pass a fake).

    Returns:
        On rank 0 with verify: {name: checksum}; otherwise None.
    """
    if zero_stage < 3 and group is None:
        return None
    params = dict(model.named_parameters())
    missing = [spec.name for bucket in plan for spec in bucket.specs if spec.name not in params]
    if missing:
        raise KeyError(f"plan names not among the model's parameters: {missing[:5]}")
    if zero_stage >= 3 and gather is None:
        gather = _deepspeed_gather

    @contextlib.contextmanager
    def open_bucket(bucket: Bucket) -> Iterator[Sequence[torch.Tensor]]:
        tensors = [params[name] for name in bucket.names]
        with gather(tensors) if gather is not None else contextlib.nullcontext():
            yield tensors

    return send_weights(group, plan, open_bucket, verify=verify)


def _deepspeed_gather(params: list[torch.nn.Parameter]) -> AbstractContextManager[object]:
    # modifier_rank=None: we only read; on exit every rank re-partitions (frees) its copy
    # without a broadcast back.
    import deepspeed

    gathered: AbstractContextManager[object] = deepspeed.zero.GatheredParameters(
        params, modifier_rank=None
    )
    return gathered


def _fingerprint_tensor(plan: Sequence[Bucket], device: torch.device | str) -> torch.Tensor:
    """`[32]` uint8: the plan fingerprint as a tensor that can be broadcast."""
    digest = plan_fingerprint(plan)
    return torch.tensor(list(digest), dtype=torch.uint8, device=device)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Exact checksum of a tensor: sha256 of its dtype, shape and raw bytes, as hex.

    Bitwise: 0.0 and -0.0 differ, NaNs compare by payload. Works for every dtype, bf16 included
    (the bytes are read through a uint8 view, never through numpy's dtype support).
    """
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{dtype_name(data.dtype)}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def checksums(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """{name: tensor_checksum} of e.g. `model.named_parameters()` or a received iterator."""
    return {name: tensor_checksum(tensor) for name, tensor in named_tensors}
