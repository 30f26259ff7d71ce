"""Bucket buffers kept across pushes (`FlatBuffers`): reused only where nothing still reads them.

The fakes of test_sync_inflight stand in for a device that finishes a broadcast only after the
host polled it a few times: a sender that reused a buffer too early would change bytes still on
the wire, which the fake records at the moment each transfer lands.
"""

from __future__ import annotations

import pytest
import torch
from test_sync_inflight import (
    COMPLETED,
    Lagging,
    LaggingReceiver,
    LaggingSender,
    bucket_opener,
    plan_for,
    sent_payloads,
    tiny_model,
)

from gmai_rl.sync.buckets import Bucket, flatten
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.inflight import Transfer
from gmai_rl.sync.weights import receive_weights, send_weights

CPU = torch.device("cpu")


def test_a_slot_hands_back_the_same_memory_grown_to_the_largest_request() -> None:
    buffers = FlatBuffers()
    first = buffers.take(0, 100, torch.float32, CPU)
    again = buffers.take(0, 60, torch.float32, CPU)
    assert again.shape == (60,) and again.data_ptr() == first.data_ptr()
    grown = buffers.take(0, 200, torch.float32, CPU)
    assert grown.shape == (200,) and buffers.nbytes == 200 * 4
    assert buffers.take(0, 150, torch.float32, CPU).data_ptr() == grown.data_ptr()
    other = buffers.take(1, 10, torch.float32, CPU)
    assert other.data_ptr() != grown.data_ptr() and buffers.nbytes == 210 * 4


def test_another_dtype_replaces_the_slot() -> None:
    buffers = FlatBuffers()
    buffers.take(0, 100, torch.float32, CPU)
    half = buffers.take(0, 100, torch.bfloat16, CPU)
    assert half.dtype == torch.bfloat16 and buffers.nbytes == 100 * 2


def test_off_the_cpu_nothing_is_kept() -> None:
    # CUDA's caching allocator already recycles blocks; keeping them would only hold GPU memory.
    buffers = FlatBuffers()
    meta = buffers.take(0, 100, torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (100,)
    assert buffers.nbytes == 0


def test_flatten_into_a_given_buffer_fills_exactly_it() -> None:
    bucket = plan_for(tiny_model())[0]
    tensors = [torch.full(s.shape, float(i)) for i, s in enumerate(bucket.specs)]
    out = torch.empty(bucket.numel)
    assert flatten(bucket, tensors, out=out) is out
    assert torch.equal(out, flatten(bucket, tensors))
    with pytest.raises(ValueError, match="out must be"):
        flatten(bucket, tensors, out=torch.empty(bucket.numel + 1))


class LandingSender(LaggingSender):
    """Records each bucket's bytes when its transfer lands (lags), not when it starts."""

    def __init__(self, lag: int) -> None:
        super().__init__([], lag)
        self.landed: dict[int, torch.Tensor] = {}
        self.pointers: set[int] = set()

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        index, self.calls = self.calls - 1, self.calls + 1
        if index < 0:
            return COMPLETED  # the plan fingerprint
        self.pointers.add(tensor.data_ptr())
        return Lagging(self.lag, lambda: self.landed.__setitem__(index, tensor.clone()))


@pytest.mark.parametrize("bound", [1, 2, 3])
def test_a_kept_sender_buffer_is_refilled_only_after_its_broadcast_landed(bound: int) -> None:
    model = tiny_model()
    plan = plan_for(model)
    expected = sent_payloads(model, plan)[1:]  # [0] is the plan fingerprint
    buffers = FlatBuffers()
    for push in range(2):
        group = LandingSender(lag=3)
        send_weights(
            group, plan, bucket_opener(model, plan, []), max_in_flight=bound, buffers=buffers
        )
        if push == 1:  # the slots grew to their largest bucket in the first push: now stable
            assert len(group.pointers) == bound
        for index, payload in enumerate(expected):
            assert torch.equal(group.landed[index], payload), f"bucket {index}"


def test_a_kept_receiver_buffer_serves_a_loader_that_copies_push_after_push() -> None:
    source, target = tiny_model(), torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    plan = plan_for(source)
    params = dict(target.named_parameters())
    buffers = FlatBuffers()
    pointers = set()
    for push in range(2):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(push)  # new weights each push
        for name, tensor in receive_weights(
            LaggingReceiver(sent_payloads(source, plan)), plan, buffers=buffers
        ):
            pointers.add(tensor.untyped_storage().data_ptr())
            with torch.no_grad():
                params[name].copy_(tensor)
        for name, param in source.named_parameters():
            assert torch.equal(params[name], param), (push, name)
    assert len(pointers) == 1  # every bucket of both pushes in the one kept buffer
    assert buffers.nbytes == max(b.nbytes for b in plan)


def test_without_kept_buffers_every_bucket_gets_its_own() -> None:
    # The documented default a loader that keeps references relies on.
    model = tiny_model()
    plan: list[Bucket] = plan_for(model)
    storages = {
        t.untyped_storage().data_ptr()
        for _, t in receive_weights(LaggingReceiver(sent_payloads(model, plan)), plan)
    }
    # Each bucket's tensors share one buffer, and no two buckets share one.
    assert len(storages) == len(plan)
