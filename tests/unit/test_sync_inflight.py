"""Bounded in-flight broadcasts, driven by fakes on CPU (no process group, no GPU).

On NCCL a broadcast returns once it is queued, so the sender's memory and every timeout depend
on when the host decides to wait. The fakes here stand in for a device that lags behind the
host: a transfer is done only after the host has polled it a few times, or never. Time is a
fake clock that advances only when the code sleeps, so deadlines are checked exactly, without
timing assertions. Real CUDA streams: tests/gpu/test_sync_cuda.py.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from gmai_rl.sync.buckets import Bucket, plan_buckets
from gmai_rl.sync.group import ABORT_KEY, SyncGroup, SyncGroupError
from gmai_rl.sync.inflight import (
    COMPLETED,
    MAX_PAUSE_S,
    TIMED_OUT,
    Clock,
    InFlight,
    Transfer,
    wait_until_done,
)
from gmai_rl.sync.weights import (
    PlanMismatchError,
    param_specs,
    push_weights,
    receive_weights,
    send_weights,
)

CPU = torch.device("cpu")


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.t = 0.0

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.t += seconds

    def clock(self) -> Clock:
        return Clock(now=lambda: self.t, sleep=self.sleep)


class Lagging:
    """A transfer the device finishes only after the host polled it `lag` times; `on_done`
    runs once, when it first reports done (the data lands then)."""

    def __init__(self, lag: int, on_done: Callable[[], None] = lambda: None) -> None:
        self.left = lag
        self.on_done: Callable[[], None] | None = on_done

    def done(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return False
        if self.on_done is not None:
            self.on_done()
            self.on_done = None
        return True


class Never:
    def done(self) -> bool:
        return False


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])


def plan_for(model: torch.nn.Module) -> list[Bucket]:
    plan = plan_buckets(param_specs(model.named_parameters()), 64)
    assert len(plan) >= 6  # several buckets, or no window ever fills
    return plan


# --- the window on its own -------------------------------------------------------------------


def test_wait_until_done_stops_exactly_at_the_deadline() -> None:
    fake = FakeClock()
    assert wait_until_done(COMPLETED, deadline=-1.0, clock=fake.clock()) is None  # no sleep
    assert fake.t == 0.0
    assert wait_until_done(Never(), deadline=2.0, clock=fake.clock()) == TIMED_OUT
    assert fake.t == pytest.approx(2.0)  # never sleeps past it


def test_wait_until_done_stops_as_soon_as_it_is_interrupted() -> None:
    fake = FakeClock()
    asked = []

    def interrupted() -> str | None:
        asked.append(fake.t)
        return "rollout worker 1 died" if fake.t >= 0.5 else None

    why = wait_until_done(Never(), deadline=60.0, clock=fake.clock(), interrupted=interrupted)
    assert why == "rollout worker 1 died"
    assert 0.5 <= fake.t < 0.5 + MAX_PAUSE_S  # the next poll after the request, not the deadline
    # Asked between polls only: a transfer that is done is never held up by the check.
    assert wait_until_done(COMPLETED, 60.0, fake.clock(), interrupted) is None
    assert len(asked) == len([t for t in asked if t <= fake.t])


def test_wait_until_done_backs_off_but_not_beyond_the_longest_pause() -> None:
    fake = FakeClock()
    assert wait_until_done(Lagging(lag=40), deadline=100.0, clock=fake.clock()) is None
    # 40 polls: the pauses double up to MAX_PAUSE_S, then stay there.
    assert 0 < fake.t <= 40 * MAX_PAUSE_S


def test_window_waits_for_the_oldest_first_and_holds_at_most_limit() -> None:
    fake = FakeClock()
    finished: list[str] = []
    window: InFlight[str] = InFlight(2, 10.0, SyncGroupError, fake.clock())
    for name in "abcde":
        window.make_room()
        assert len(window) < 2
        window.add(name, Lagging(3, lambda name=name: finished.append(name)), name)
    assert finished == ["a", "b", "c"]  # e's arrival needed c's completion
    window.drain()
    assert finished == list("abcde") and len(window) == 0


def test_window_timeout_names_the_transfer_and_forgets_the_rest() -> None:
    fake = FakeClock()
    window: InFlight[int] = InFlight(3, 2.5, SyncGroupError, fake.clock())
    window.add("bucket 1", Never(), 1)
    fake.t = 1.0
    window.add("bucket 2", Never(), 2)
    with pytest.raises(SyncGroupError, match=r"^bucket 1 did not complete within 2\.5 s"):
        window.make_room() if len(window) >= 3 else window.drain()
    assert fake.t == pytest.approx(2.5)  # bucket 1's deadline, counted from its start
    assert len(window) == 0


def test_window_rejects_a_bound_below_one_and_overfilling() -> None:
    with pytest.raises(ValueError, match="at least one"):
        InFlight(0, 1.0, SyncGroupError)
    window: InFlight[int] = InFlight(1, 1.0, SyncGroupError)
    window.add("a", COMPLETED, 1)
    with pytest.raises(RuntimeError, match="make_room"):
        window.add("b", COMPLETED, 2)


# --- the sender: bounded buffers, order, timeouts ---------------------------------------------


class LaggingSender:
    """Learner rank 0's group over a lagging device: every bucket broadcast finishes only after
    `lag` polls. Counts the bucket buffers still alive each time a new one is sent."""

    rank = 0
    device = CPU
    timeout_s = 60.0

    def __init__(self, events: list[tuple], lag: int = 3) -> None:
        self.events, self.lag = events, lag
        self.buffers: list[weakref.ref[torch.Tensor]] = []
        self.most_alive = 0
        self.calls = 0

    def alive(self) -> int:
        return sum(b() is not None for b in self.buffers)

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        index, self.calls = self.calls - 1, self.calls + 1
        if index < 0:
            return COMPLETED  # the plan fingerprint
        self.events.append(("broadcast", index))
        self.buffers.append(weakref.ref(tensor))
        self.most_alive = max(self.most_alive, self.alive())
        return Lagging(self.lag, lambda: self.events.append(("done", index)))

    def broken(self, message: str) -> Exception:
        self.events.append(("broken", message))
        return SyncGroupError(f"{message} (fake group, rank {self.rank})")

    def abort_reason(self) -> str | None:
        return None


def bucket_gather(model: torch.nn.Module, plan: list[Bucket], events: list[tuple]):
    """A ZeRO-3 gather stand-in that logs which bucket (by index) it opened and released."""
    index_of = {tuple(b.names): i for i, b in enumerate(plan)}
    names = {id(p): n for n, p in model.named_parameters()}

    @contextmanager
    def gather(params: list[torch.nn.Parameter]) -> Iterator[None]:
        index = index_of[tuple(names[id(p)] for p in params)]
        events.append(("gather", index))
        yield
        events.append(("release", index))

    return gather


def bucket_opener(model: torch.nn.Module, plan: list[Bucket], events: list[tuple]):
    """`send_weights`'s open_bucket over a plain model, logging open/close by bucket index."""
    params = dict(model.named_parameters())
    index_of = {tuple(b.names): i for i, b in enumerate(plan)}

    @contextmanager
    def open_bucket(bucket: Bucket) -> Iterator[list[torch.Tensor]]:
        index = index_of[tuple(bucket.names)]
        events.append(("gather", index))
        yield [params[n].detach() for n in bucket.names]
        events.append(("release", index))

    return open_bucket


@pytest.mark.parametrize("bound", [1, 2, 3])
def test_sender_never_holds_more_bucket_buffers_than_the_bound(bound: int) -> None:
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    group = LaggingSender(events)
    alive_at_open: list[int] = []
    opener = bucket_opener(model, plan, events)

    def open_bucket(bucket: Bucket):
        alive_at_open.append(group.alive())
        return opener(bucket)

    send_weights(group, plan, open_bucket, max_in_flight=bound)
    # Before bucket k is gathered and flattened, at most bound - 1 older buffers are left...
    assert max(alive_at_open) == bound - 1
    # ...so with its own, never more than the bound (reached: the fake lags).
    assert group.most_alive == bound
    assert events.count(("done", len(plan) - 1)) == 1  # drained before returning
    assert group.alive() == 0  # and nothing kept


def test_without_a_bound_the_lagging_fake_holds_every_buffer() -> None:
    # The control: the fake really lets a sender run ahead, so the bound above is what holds.
    model = tiny_model()
    plan = plan_for(model)
    group = LaggingSender([])
    push_weights(model, plan, group, zero_stage=0, max_in_flight=len(plan))
    assert group.most_alive == len(plan)


@pytest.mark.parametrize("bound", [1, 2])
def test_zero3_order_per_bucket_and_bucket_k_opens_only_after_k_minus_bound_is_done(
    bound: int,
) -> None:
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    gather = bucket_gather(model, plan, events)
    push_weights(model, plan, LaggingSender(events), 3, gather=gather, max_in_flight=bound)

    # gather -> broadcast -> release, bucket after bucket, as with blocking broadcasts.
    steps = [e for e in events if e[0] != "done"]
    assert steps == [
        (step, i) for i in range(len(plan)) for step in ("gather", "broadcast", "release")
    ]
    # Completions in order, and none of the window's waits let bucket k in early.
    done_at = {e[1]: n for n, e in enumerate(events) if e[0] == "done"}
    assert sorted(done_at) == list(range(len(plan)))
    assert list(done_at.values()) == sorted(done_at.values())
    for k in range(bound, len(plan)):
        assert done_at[k - bound] < events.index(("gather", k)), k


class StalledSender(LaggingSender):
    """The fingerprint arrives; no bucket broadcast ever completes (a peer stopped taking part)."""

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        first = self.calls == 0
        super().start_broadcast(tensor, src)
        return COMPLETED if first else Never()


@pytest.mark.parametrize("bound", [1, 2])
def test_a_bucket_that_never_completes_fails_the_push_at_its_deadline(bound: int) -> None:
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    fake = FakeClock()
    group = StalledSender(events)
    group.timeout_s = 2.0
    with pytest.raises(SyncGroupError) as info:
        send_weights(
            group, plan, bucket_opener(model, plan, events), max_in_flight=bound, clock=fake.clock()
        )
    first = plan[0].names[0]
    message = (
        f"bucket 1 of {len(plan)} ({len(plan[0].names)} tensors from {first!r}, "
        f"{plan[0].nbytes} bytes of float32) did not complete within 2 s of being sent"
    )
    assert str(info.value) == f"{message} (fake group, rank 0)"
    assert events.count(("broken", message)) == 1
    # Bucket 1 stalled; the sender sent `bound` buckets and nothing after the failure...
    assert [e for e in events if e[0] == "broadcast"] == [("broadcast", i) for i in range(bound)]
    # ...but still gathered and released every bucket, in order: under ZeRO-3 the other
    # learner ranks gather each one with rank 0, and stopping early would leave them waiting.
    walked = [e for e in events if e[0] in ("gather", "release")]
    assert walked == [(what, i) for i in range(len(plan)) for what in ("gather", "release")]
    assert fake.t == pytest.approx(2.0)  # at the (fake) deadline, not a poll later


class FailingSender(LaggingSender):
    """A push that fails at bucket 1: its broadcast cannot start (a gloo send to a receiver
    whose connection broke raises at once), or the driver asks the push to stop (a member
    died) once bucket 0 is on its way."""

    def __init__(self, events: list[tuple], how: str) -> None:
        super().__init__(events)
        self.how = how

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        if self.how == "start" and self.calls == 2:  # the fingerprint, bucket 0, then bucket 1
            self.calls += 1
            raise RuntimeError("Connection reset by peer")
        return super().start_broadcast(tensor, src)

    def abort_reason(self) -> str | None:
        sent = [e for e in self.events if e[0] == "broadcast"]
        return "rollout worker 1 died" if self.how == "abort" and sent else None


@pytest.mark.parametrize("how", ["start", "abort"])
@pytest.mark.parametrize("bound", [1, 2])
def test_a_push_that_fails_midway_still_walks_every_bucket(how: str, bound: int) -> None:
    """Whatever ends rank 0's sending (here a broadcast that cannot start, or a stop asked for
    while bucket 0 is in flight), it opens and closes every later bucket as the other ZeRO-3
    ranks do, then raises."""
    model = tiny_model()
    plan = plan_for(model)
    events: list[tuple] = []
    group = FailingSender(events, how)
    opener = bucket_opener(model, plan, events)
    with pytest.raises(Exception, match=r"Connection reset|rollout worker 1 died"):
        send_weights(group, plan, opener, max_in_flight=bound, clock=FakeClock().clock())
    walked = [e for e in events if e[0] in ("gather", "release")]
    assert walked == [(what, i) for i in range(len(plan)) for what in ("gather", "release")]
    # A stop is seen in the waits: the window's `bound` buckets went out before it.
    sent = 1 if how == "start" else bound
    assert [e for e in events if e[0] == "broadcast"] == [("broadcast", i) for i in range(sent)]


def test_a_bound_below_one_is_refused_naming_the_setting() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sync\.max_buckets_in_flight"):
        push_weights(model, plan_for(model), LaggingSender([]), 0, max_in_flight=0)


# --- the receiver: yields a bucket only once it has arrived ------------------------------------


class LaggingReceiver:
    """A receiver's group over a lagging device: a buffer is filled with the sender's payload
    only when its transfer reports done; until then it holds NaN."""

    rank = 1
    device = CPU
    timeout_s = 60.0

    def __init__(
        self,
        payloads: list[torch.Tensor],
        stall_at: int | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.payloads = list(payloads)
        self.stall_at, self.clock = stall_at, clock
        self.stalled_since: float | None = None
        self.calls = 0
        self.pending = 0

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        payload = self.payloads.pop(0)
        tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.zero_()
        self.calls += 1
        if self.calls - 1 == self.stall_at:
            self.stalled_since = self.clock.t if self.clock else None
            return Never()
        self.pending += 1

        def land() -> None:
            tensor.copy_(payload)
            self.pending -= 1

        return Lagging(3, land)

    def broken(self, message: str) -> Exception:
        return SyncGroupError(message)

    def abort_reason(self) -> str | None:
        return None


def sent_payloads(model: torch.nn.Module, plan: list[Bucket]) -> list[torch.Tensor]:
    class Keep(LaggingSender):
        def __init__(self) -> None:
            super().__init__([], lag=0)
            self.sent: list[torch.Tensor] = []

        def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
            self.sent.append(tensor.clone())
            return COMPLETED

    keep = Keep()
    push_weights(model, plan, keep, zero_stage=0)
    return keep.sent


def test_receiver_yields_each_bucket_only_after_its_data_arrived() -> None:
    model = tiny_model()
    plan = plan_for(model)
    link = LaggingReceiver(sent_payloads(model, plan))
    got = {}
    for name, tensor in receive_weights(link, plan):
        assert link.pending == 0  # nothing yielded while its transfer was still running
        got[name] = tensor.clone()
    assert list(got) == [n for n, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert torch.equal(got[name], param.detach()), name


def test_receiver_checks_the_fingerprint_only_once_it_arrived() -> None:
    # A fingerprint compared before it lands (zeros) would fail every plan: this one is right.
    model = tiny_model()
    plan = plan_for(model)
    received = list(receive_weights(LaggingReceiver(sent_payloads(model, plan)), plan))
    assert len(received) == len(list(model.parameters()))
    other = plan_buckets(param_specs(model.named_parameters()), 128)
    with pytest.raises(PlanMismatchError):
        next(receive_weights(LaggingReceiver(sent_payloads(model, plan)), other))


@pytest.mark.parametrize(("stall_at", "named"), [(0, "the plan fingerprint"), (3, "bucket 3 of")])
def test_receiver_times_out_naming_what_did_not_arrive(stall_at: int, named: str) -> None:
    model = tiny_model()
    plan = plan_for(model)
    fake = FakeClock()
    link = LaggingReceiver(sent_payloads(model, plan), stall_at=stall_at, clock=fake)
    link.timeout_s = 3.0
    with pytest.raises(SyncGroupError, match=f"^{named}.* did not complete within 3 s"):
        list(receive_weights(link, plan, clock=fake.clock()))
    assert link.stalled_since is not None
    assert fake.t - link.stalled_since == pytest.approx(3.0)


# --- SyncGroup's NCCL branch, with a fake backend ---------------------------------------------


class FakeWork:
    def __init__(self, completes: bool, error: str | None = None) -> None:
        self.completes, self.error = completes, error

    def wait(self) -> bool:
        if self.error and self.completes:
            raise RuntimeError(self.error)
        return True

    def is_completed(self) -> bool:
        return self.completes


class FakeNcclBackend:
    """Hands out works that complete (or fail) as scripted, one per collective, in order."""

    def __init__(self, works: list[FakeWork]) -> None:
        self.works = works
        self.aborted = self.shut_down = False

    def broadcast(self, tensors: list[torch.Tensor], opts: object) -> FakeWork:
        return self.works.pop(0)

    def abort(self) -> None:
        self.aborted = True

    def shutdown(self) -> None:
        self.shut_down = True


def nccl_group(works: list[FakeWork], timeout_s: float = 0.05) -> SyncGroup:
    backend = FakeNcclBackend(works)
    return SyncGroup("10.0.0.1", 29500, 0, 3, "nccl", timeout_s, CPU, None, backend)


def test_nccl_push_that_stalls_aborts_the_group_and_names_bucket_group_rank_and_timeout() -> None:
    model = tiny_model()
    plan = plan_for(model)
    group = nccl_group([FakeWork(True)] + [FakeWork(False) for _ in plan])
    backend = group._pg
    with pytest.raises(SyncGroupError) as info:
        push_weights(model, plan, group, zero_stage=0, max_in_flight=2)
    text = str(info.value)
    assert text.startswith(f"bucket 1 of {len(plan)} (")
    assert "did not complete within 0.05 s of being sent" in text
    assert (
        "sync group 10.0.0.1:29500 (backend nccl, rank 0 of world size 3, timeout 0.05 s)" in text
    )
    assert "destroy it and build a new one" in text
    assert backend.aborted  # the stuck collective is torn down, not left to the watchdog
    with pytest.raises(SyncGroupError, match="unusable after an earlier failure"):
        group.broadcast(torch.zeros(1))
    group.destroy()
    assert not backend.shut_down  # an aborted communicator has nothing left to flush


def test_nccl_blocking_broadcast_waits_for_completion_and_reports_a_failed_collective() -> None:
    group = nccl_group([FakeWork(True), FakeWork(True, error="NCCL error: remote process exited")])
    group.broadcast(torch.zeros(2))  # completes: returns
    with pytest.raises(SyncGroupError, match=r"broadcast of 3 .* failed: NCCL error: remote"):
        group.broadcast(torch.zeros(3))
    assert group._pg.aborted


class FakeGlooBackend:
    """Point-to-point sends and receives that complete, or fail for the peers in `dead` (a
    closed connection fails the send call itself; one closed mid-transfer fails its wait)."""

    def __init__(self, dead_at_call=(), dead_at_wait=()) -> None:
        self.dead_at_call, self.dead_at_wait = set(dead_at_call), set(dead_at_wait)
        self.sent: list[tuple[int, int]] = []  # (peer, tag)
        self.received: list[tuple[int, int]] = []

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeWork:
        if peer in self.dead_at_call:
            raise RuntimeError(f"Connection closed by peer {peer}")
        self.sent.append((peer, tag))
        dead = peer in self.dead_at_wait
        return FakeWork(True, error=f"Connection reset by peer {peer}" if dead else None)

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeWork:
        self.received.append((peer, tag))
        return FakeWork(
            True, error="Connection closed by peer 0" if peer in self.dead_at_wait else None
        )

    def abort(self) -> None:
        raise AssertionError("gloo groups are never aborted")


def test_gloo_rank0_sends_to_every_receiver_and_goes_on_without_a_dead_one() -> None:
    backend = FakeGlooBackend(dead_at_wait={2})
    group = SyncGroup("h", 1, 0, 4, "gloo", 1.0, CPU, None, backend)
    assert group.start_broadcast(torch.zeros(1)) is COMPLETED  # done when it returns
    assert backend.sent == [(1, 1), (2, 1), (3, 1)]
    assert list(group.lost) == [2] and "Connection reset by peer 2" in group.lost[2]
    backend.dead_at_call.add(3)  # its connection is known closed by the next transfer
    group.broadcast(torch.zeros(1))
    assert backend.sent[3:] == [(1, 2)]  # rank 2 skipped, rank 3's send failed at the call
    assert sorted(group.lost) == [2, 3]
    group.broadcast(torch.zeros(1))  # the push goes on for the one left
    assert backend.sent[4:] == [(1, 3)]


def test_a_gloo_receiver_takes_each_transfer_from_rank_0_and_breaks_when_rank_0_goes() -> None:
    backend = FakeGlooBackend()
    group = SyncGroup("h", 1, 2, 3, "gloo", 1.0, CPU, None, backend)
    group.broadcast(torch.zeros(1))
    assert backend.received == [(0, 1)]  # the tag counts transfers, as on rank 0
    backend.dead_at_wait.add(0)
    with pytest.raises(SyncGroupError, match="failed: Connection closed by peer 0"):
        group.broadcast(torch.zeros(1))
    with pytest.raises(SyncGroupError, match="unusable after an earlier failure"):
        group.broadcast(torch.zeros(1))


class FakeStore:
    """rank 0's store as the abort check reads it."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.checks = 0

    def check(self, keys: list[str]) -> bool:
        self.checks += 1
        return all(k in self.keys for k in keys)

    def get(self, key: str) -> bytes:
        return self.keys[key]


def test_a_nccl_wait_stops_when_an_abort_is_requested_and_aborts_the_communicator() -> None:
    store = FakeStore()
    backend = FakeNcclBackend([FakeWork(True), FakeWork(False)])
    group = SyncGroup("h", 1, 1, 3, "nccl", 60.0, CPU, store, backend)
    group.broadcast(torch.zeros(1))  # the probe: completes
    store.keys[ABORT_KEY] = b"rollout worker 0 died"
    # Stopped by the request, not by the 60 s deadline (whose message says "did not complete").
    with pytest.raises(SyncGroupError, match="stopped: aborted: rollout worker 0 died"):
        group.broadcast(torch.zeros(2))
    assert backend.aborted


def test_the_abort_check_reads_the_store_at_most_every_poll_interval() -> None:
    store = FakeStore()
    group = SyncGroup("h", 1, 1, 3, "nccl", 60.0, CPU, store, FakeNcclBackend([]))
    assert [group.abort_reason() for _ in range(1000)] == [None] * 1000
    assert store.checks == 1
