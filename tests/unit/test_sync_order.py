"""Order of one weight sync, checked with fakes (no process group, no DeepSpeed).

The contract under ZeRO-3: per bucket, every learner rank gathers, rank 0 broadcasts while the
bucket is gathered, then every rank releases it; non-zero ranks never broadcast. Getting this
wrong deadlocks (a rank skips a gather) or ships partitioned placeholders (broadcast after
release), so the order is asserted event by event.
"""

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from gmai_rl.sync.buckets import Bucket, TensorSpec, flatten, plan_buckets
from gmai_rl.sync.inflight import COMPLETED, Transfer
from gmai_rl.sync.weights import (
    PlanMismatchError,
    checksums,
    param_specs,
    push_weights,
    receive_weights,
)


class BlockingGroup:
    """A group whose broadcasts are done when they return, as gloo's are."""

    rank = 0
    device = torch.device("cpu")
    timeout_s = 1.0

    def broken(self, message: str) -> Exception:
        raise AssertionError(f"a completed broadcast cannot time out: {message}")

    def abort_reason(self) -> str | None:
        return None


class RecordingGroup(BlockingGroup):
    """Stands in for SyncGroup: logs each broadcast and keeps what the sender sent."""

    def __init__(self, events: list[tuple], rank: int = 0) -> None:
        self.events = events
        self.rank = rank
        self.sent: list[torch.Tensor] = []

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        assert src == 0
        self.events.append(("broadcast", tensor.numel(), str(tensor.dtype)))
        self.sent.append(tensor.clone())
        return COMPLETED


class ReplayGroup(BlockingGroup):
    """A receiver's side of a link: each broadcast is filled with the next recorded payload."""

    def __init__(self, payloads: list[torch.Tensor]) -> None:
        self.rank = 1
        self.payloads = list(payloads)
        self.calls = 0

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        payload = self.payloads.pop(0)
        assert payload.shape == tensor.shape and payload.dtype == tensor.dtype
        tensor.copy_(payload)
        self.calls += 1
        return COMPLETED


def fake_gather(events: list[tuple], names: dict[int, str]):
    """A GatheredParameters stand-in recording enter/exit with the params' names."""

    @contextmanager
    def gather(params: list[torch.nn.Parameter]) -> Iterator[None]:
        which = tuple(names[id(p)] for p in params)
        events.append(("gather", which))
        yield
        events.append(("release", which))

    return gather


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def plan_for(model: torch.nn.Module, wire: str | None = None, limit: int = 64) -> list[Bucket]:
    return plan_buckets(param_specs(model.named_parameters(), wire), limit)


def names_of(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def test_zero3_rank0_gathers_broadcasts_then_releases_each_bucket() -> None:
    model = tiny_model()
    plan = plan_for(model)
    assert len(plan) >= 3  # the test is only meaningful with several buckets
    events: list[tuple] = []
    group = RecordingGroup(events)
    push_weights(model, plan, group, zero_stage=3, gather=fake_gather(events, names_of(model)))

    expected: list[tuple] = [("broadcast", 32, "torch.uint8")]  # the plan fingerprint first
    for bucket in plan:
        names = tuple(bucket.names)
        expected += [
            ("gather", names),
            ("broadcast", bucket.numel, "torch.float32"),
            ("release", names),
        ]
    assert events == expected


def test_zero3_other_ranks_gather_every_bucket_but_never_broadcast() -> None:
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    result = push_weights(
        model, plan, None, zero_stage=3, verify=True, gather=fake_gather(events, names_of(model))
    )
    assert result is None
    expected = []
    for bucket in plan:
        expected += [("gather", tuple(bucket.names)), ("release", tuple(bucket.names))]
    assert events == expected


def test_below_zero3_only_rank0_works_and_nothing_is_gathered() -> None:
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    gather = fake_gather(events, names_of(model))
    assert push_weights(model, plan, None, zero_stage=2, gather=gather) is None
    assert events == []
    push_weights(model, plan, RecordingGroup(events), zero_stage=2)
    assert [e[0] for e in events] == ["broadcast"] * (1 + len(plan))


def test_broadcast_payload_is_the_flattened_bucket_in_the_wire_dtype() -> None:
    model = tiny_model()
    plan = plan_for(model, wire="bfloat16")
    group = RecordingGroup([])
    push_weights(model, plan, group, zero_stage=0)
    params = dict(model.named_parameters())
    for bucket, payload in zip(plan, group.sent[1:], strict=True):
        want = flatten(bucket, [params[n].detach().to(torch.bfloat16) for n in bucket.names])
        assert torch.equal(payload, want)


def test_send_then_receive_round_trip_with_verify_checksums() -> None:
    model = tiny_model()
    plan = plan_for(model, wire="bfloat16")
    sender = RecordingGroup([])
    sent = push_weights(model, plan, sender, zero_stage=0, verify=True)
    received = {n: t.clone() for n, t in receive_weights(ReplayGroup(sender.sent), plan)}
    assert list(received) == [n for n, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert received[name].shape == param.shape
        assert torch.equal(received[name], param.detach().to(torch.bfloat16))
    assert checksums(received.items()) == sent


def test_receive_is_lazy_one_bucket_at_a_time() -> None:
    model = tiny_model()
    plan = plan_for(model)
    sender = RecordingGroup([])
    push_weights(model, plan, sender, zero_stage=0)
    link = ReplayGroup(sender.sent)
    weights = receive_weights(link, plan)
    assert link.calls == 0
    next(weights)
    assert link.calls == 2  # fingerprint + first bucket, nothing more
    rest = list(weights)
    assert link.calls == 1 + len(plan) and len(rest) + 1 == len(list(model.parameters()))


def test_receiver_with_another_plan_fails_before_loading_anything() -> None:
    model = tiny_model()
    sender = RecordingGroup([])
    push_weights(model, plan_for(model, wire="bfloat16"), sender, zero_stage=0)
    with pytest.raises(PlanMismatchError, match="plan differs"):
        next(receive_weights(ReplayGroup(sender.sent), plan_for(model, wire="float32")))


def test_sender_must_be_group_rank_0_and_plan_must_match_the_model() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="rank 0"):
        push_weights(model, plan_for(model), RecordingGroup([], rank=1), zero_stage=0)
    other = plan_for(torch.nn.Linear(2, 2))
    renamed = [
        Bucket(b.dtype, tuple(TensorSpec("x." + s.name, s.shape, s.dtype) for s in b.specs))
        for b in other
    ]
    with pytest.raises(KeyError, match=r"x\.weight"):
        push_weights(model, renamed, RecordingGroup([]), zero_stage=0)


def test_importing_sync_loads_neither_ray_nor_deepspeed() -> None:
    # In a fresh interpreter: this test process may have imported either already.
    code = (
        "import sys, gmai_rl.sync; "
        "print(sorted(m for m in ('ray', 'deepspeed', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
