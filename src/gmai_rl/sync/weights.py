"""Send and receive policy weights over a `SyncGroup`, one bucket at a time.

`push_weights` runs on every learner rank (under ZeRO-3 each bucket is gathered collectively;
only rank 0 broadcasts), first the plan's fingerprint, then each bucket flattened and cast to the
wire dtype, with at most `max_in_flight` buckets sent but not yet complete. `receive_weights` is
the receivers' iterator of (name, tensor) for the engine's loader, one bucket in memory at a
time, each yielded only once its data has arrived. `checksums` are exact (sha256 of the bytes),
for verify mode. The design and its measurements: docs/weight-sync.md.
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
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.inflight import SYSTEM_CLOCK, Clock, InFlight, Transfer

# Opens one bucket on the sender: a context in which the bucket's tensors are full and readable
# (under ZeRO-3: gathered), yielding them in `bucket.specs` order; leaving it releases them.
OpenBucket = Callable[[Bucket], AbstractContextManager[Sequence[torch.Tensor]]]
# Makes a ZeRO-3 gather context for a list of parameters (deepspeed.zero.GatheredParameters).
GatherFn = Callable[[list[torch.nn.Parameter]], AbstractContextManager[object]]


DEFAULT_MAX_IN_FLIGHT = 2
"""Buckets the sender may have started but not seen complete: 2 lets the next bucket's gather and
flatten overlap the current bucket's transfer, at one more bucket of memory."""


class Broadcaster(Protocol):
    """What the send/receive loops need of a group (`SyncGroup`, or a fake in tests)."""

    rank: int
    device: torch.device
    timeout_s: float

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        """See `SyncGroup.start_broadcast`: the tensor is settled once the transfer is done."""
        ...

    def broken(self, message: str) -> Exception:
        """See `SyncGroup.broken`: the error to raise when a transfer missed its deadline."""
        ...

    def abort_reason(self) -> str | None:
        """See `SyncGroup.abort_reason`: a reason to stop waiting now, or None."""
        ...


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
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    buffers: FlatBuffers | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> dict[str, str] | None:
    """Push every bucket of `plan`: the loop every learner rank runs.

    Per bucket: open it (ZeRO-3: gather), flatten + cast to the wire dtype and start its
    broadcast (rank 0 only), close it (ZeRO-3: release). The flat copy is taken while the bucket
    is open, so no learner rank holds more than one bucket's gathered parameters.

    A broadcast may still be running when its bucket closes (NCCL queues it on the GPU and
    returns). Rank 0 keeps each flat buffer until its broadcast is done, and before opening
    bucket k waits until bucket k - `max_in_flight` is done: at most `max_in_flight` flat
    buffers exist at a time, however far ahead of the GPU the host could run. Each wait ends at
    `group.timeout_s` after that bucket's broadcast started, with `group.broken`'s error (for
    `SyncGroup`: a `SyncGroupError` naming the bucket, the group, the rank and the timeout), or
    sooner when `group.abort_reason()` gives a reason (a member died).

    A failure on rank 0 (a transfer that failed, missed its deadline or was stopped) does not
    end the loop: every later bucket is still opened and closed, without sending, and the
    failure is raised after the last one. Under ZeRO-3 each bucket's gather is a collective of
    every learner rank, so a rank 0 that stopped early would leave the others' gathers, and the
    next training step's, out of step. With gloo a receiver that cannot be reached is no
    failure: `SyncGroup` records it in `group.lost` and the push goes on for the others.

    Args:
        group: learner rank 0's sync group (must be group rank 0), or None on the other learner
            ranks, which only open and close each bucket (taking part in ZeRO-3 gathers).
        plan: the bucket plan, identical on every learner rank and every receiver.
        open_bucket: see `OpenBucket`; entered and left once per bucket, in plan order.
        verify: also return the checksums of what was sent. Costs a device->host copy and a
            sha256 of the whole model.
        max_in_flight: the bound above, >= 1 (`sync.max_buckets_in_flight`).
        buffers: flat buffers kept across pushes (on CPU; see `gmai_rl.sync.buffers`): bucket k
            is flattened into slot k % max_in_flight, free again by the bound above. None: a
            new buffer per bucket.
        clock: time source of the waits (tests pass a fake).

    Returns:
        {name: tensor_checksum} of the sent tensors (wire dtype) when `group` is given and
        `verify` is set; else None.
    """
    if max_in_flight < 1:
        raise ValueError(
            f"sync.max_buckets_in_flight must be >= 1, got {max_in_flight} (1: one bucket at a "
            "time)"
        )
    window: InFlight[torch.Tensor] | None = None
    failure: Exception | None = None
    if group is not None:
        if group.rank != 0:
            raise ValueError(f"weights are sent from sync-group rank 0, this is rank {group.rank}")
        window = InFlight(max_in_flight, group.timeout_s, group.broken, clock, group.abort_reason)
        try:
            _broadcast_and_wait(group, _fingerprint_tensor(plan, group.device), clock)
        except Exception as err:
            failure = err
    sent: dict[str, str] | None = {} if group is not None and verify else None
    for index, bucket in enumerate(plan):
        # After a failure every bucket is still opened and closed, nothing sent: under ZeRO-3
        # the other learner ranks gather each bucket with this one, and a rank that stopped
        # early would leave their gathers (and the next training step's) out of step.
        sending = window is not None and failure is None
        if sending and window is not None:
            try:
                window.make_room()
            except Exception as err:
                failure, sending = err, False
        with open_bucket(bucket) as tensors:
            if not sending or group is None or window is None:
                continue
            slot = index % max_in_flight
            try:
                flat = flatten(
                    bucket, tensors, out=_flat_buffer(bucket, group.device, buffers, slot)
                )
                window.add(_describe(plan, index), group.start_broadcast(flat, src=0), flat)
            except Exception as err:
                failure = err
                continue
            if sent is not None:
                # The sender's buffer is only read by the broadcast: safe to read now.
                sent.update(checksums(unflatten(bucket, flat)))
            del flat  # the window's reference is the one that must decide its lifetime
    if window is not None and failure is None:
        window.drain()
    if failure is not None:
        raise failure
    return sent


def receive_weights(
    group: Broadcaster,
    plan: Sequence[Bucket],
    device: torch.device | str | None = None,
    *,
    buffers: FlatBuffers | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive one push, yielding (name, tensor) bucket by bucket, in plan order.

    Lazy: bucket k is received when the consumer asks for its first tensor, so a loader that
    copies each tensor into the model (vLLM `model.load_weights(weights=...)`, or
    `params[name].data.copy_(tensor)` for HF) holds one bucket at a time. A bucket is yielded
    only once its broadcast is done (at most `group.timeout_s` after it started, else
    `group.broken`'s error), so a consumer may read it on any CUDA stream. The consumer MUST
    exhaust the iterator: the sender blocks on every bucket until all receivers take it, and a
    half-read push leaves the group out of step (the sender then times out).

    Args:
        group: this worker's sync group (rank >= 1).
        plan: the same plan the sender uses.
        device: where the buffers live; default: the group's device (CPU for gloo, the GPU for
            NCCL, which must receive into CUDA memory).
        buffers: receive every bucket into one buffer kept across pushes (on CPU; see
            `gmai_rl.sync.buffers`). Only for a loader that copies each tensor before asking
            for the next bucket: that bucket overwrites the last one. None: a new buffer per
            bucket, which a loader may keep references to.
        clock: time source of the waits (tests pass a fake).

    Yields:
        (name, tensor) with the spec's full shape and wire dtype. Each tensor is a view into its
        bucket's buffer (see `unflatten`): a fresh one per bucket unless `buffers` is given.

    Raises:
        PlanMismatchError: the sender's plan differs from `plan` (raised before any bucket).
    """
    device = torch.device(device) if device is not None else group.device
    expected = _fingerprint_tensor(plan, device)
    # Settled on the host before the comparison reads it.
    received = _broadcast_and_wait(group, torch.zeros_like(expected), clock)
    if not torch.equal(received, expected):
        raise PlanMismatchError(
            "the sender's bucket plan differs from this receiver's (names, shapes, wire dtypes "
            "or bucket size): build both from the same plan object"
        )
    for index, bucket in enumerate(plan):
        flat = _flat_buffer(bucket, device, buffers, slot=0)
        flat = _broadcast_and_wait(group, flat, clock, _describe(plan, index))
        yield from unflatten(bucket, flat)


def push_weights(
    model: torch.nn.Module,
    plan: Sequence[Bucket],
    group: Broadcaster | None,
    zero_stage: int,
    *,
    verify: bool = False,
    gather: GatherFn | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    buffers: FlatBuffers | None = None,
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
        max_in_flight: rank 0's bound on buckets sent but not yet complete (see `send_weights`).
        buffers: rank 0's flat buffers kept across pushes (see `send_weights`).

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

    return send_weights(
        group, plan, open_bucket, verify=verify, max_in_flight=max_in_flight, buffers=buffers
    )


def _deepspeed_gather(params: list[torch.nn.Parameter]) -> AbstractContextManager[object]:
    # modifier_rank=None: we only read; on exit every rank re-partitions (frees) its copy
    # without a broadcast back.
    import deepspeed

    gathered: AbstractContextManager[object] = deepspeed.zero.GatheredParameters(
        params, modifier_rank=None
    )
    return gathered


def _flat_buffer(
    bucket: Bucket, device: torch.device, buffers: FlatBuffers | None, slot: int
) -> torch.Tensor:
    """`[bucket.numel]` of the bucket's dtype: from `buffers`' slot when given, else a new one."""
    dtype = torch_dtype(bucket.dtype)
    if buffers is not None:
        return buffers.take(slot, bucket.numel, dtype, device)
    return torch.empty(bucket.numel, dtype=dtype, device=device)


def _broadcast_and_wait(
    group: Broadcaster, tensor: torch.Tensor, clock: Clock, what: str = "the plan fingerprint"
) -> torch.Tensor:
    """Broadcast `tensor` from rank 0 and return it once done (bounded by the group's timeout)."""
    window: InFlight[torch.Tensor] = InFlight(
        1, group.timeout_s, group.broken, clock, group.abort_reason
    )
    window.add(what, group.start_broadcast(tensor, src=0), tensor)
    return window.wait_oldest()


def _describe(plan: Sequence[Bucket], index: int) -> str:
    """How a timeout names a bucket: its place in the plan, first tensor, size and dtype."""
    bucket = plan[index]
    first = bucket.specs[0].name if bucket.specs else "no tensors"
    return (
        f"bucket {index + 1} of {len(plan)} ({len(bucket.specs)} tensors from {first!r}, "
        f"{bucket.nbytes} bytes of {bucket.dtype})"
    )


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
