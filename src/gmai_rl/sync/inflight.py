"""Bounded waiting on started transfers: the part of the weight sync that decides when to block.

A NCCL collective returns as soon as it is queued on the GPU: `Work.wait()` only makes the
current CUDA stream wait for it, and the host runs on. A sender that allocates one buffer per
bucket would then hold every bucket's buffer at once (up to a second copy of the model), and a
stalled peer would surface only through NCCL's watchdog. `InFlight` is a window of at most
`limit` transfers that the host has started but not yet seen complete, each with the buffer it
reads or writes: before allocating the next buffer the sender makes room by waiting for the
oldest, every wait ends at that transfer's deadline (start + timeout) or as soon as the caller's
`interrupted` check gives a reason (a member died: stop now), and either raises the error the
caller builds (`SyncGroup.broken`: abort the group, name it).

Pure of torch and of any process group: a `Transfer` is anything with a non-blocking `done()`
(gloo's blocking collectives hand back `COMPLETED`), and time comes from a `Clock`, so tests
drive the window with fakes. How a real NCCL transfer answers `done()`: sync/group.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

# Polling backs off from a tenth of a millisecond (a small bucket's transfer) to 5 ms, so a wait
# costs little CPU and overshoots a transfer's end by at most a few ms.
FIRST_PAUSE_S = 1e-4
MAX_PAUSE_S = 5e-3


class Transfer(Protocol):
    """A started collective, as the host sees it."""

    def done(self) -> bool:
        """Never blocks. True once the data has moved: the buffer may be read by any stream or
        freed. Raises (the caller's error type) if the transfer failed."""
        ...


class _Completed:
    def done(self) -> bool:
        return True


COMPLETED: Transfer = _Completed()
"""A transfer that finished before it was handed over (gloo's collectives block until done)."""


@dataclass(frozen=True)
class Clock:
    """Where waits read the time and how they pause (tests pass a fake that advances on sleep)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()


TIMED_OUT = "timed out"
"""What `wait_until_done` returns when the deadline passed first."""


def _never() -> str | None:
    return None


def wait_until_done(
    transfer: Transfer,
    deadline: float,
    clock: Clock = SYSTEM_CLOCK,
    interrupted: Callable[[], str | None] = _never,
) -> str | None:
    """Poll `transfer.done()` until it is True (-> None), `clock.now()` reaches `deadline` (->
    TIMED_OUT) or `interrupted()` gives a reason to stop waiting (-> that reason). Never sleeps
    past the deadline; `interrupted` is asked between polls, so it must be cheap."""
    pause = FIRST_PAUSE_S
    while not transfer.done():
        left = deadline - clock.now()
        if left <= 0:
            return TIMED_OUT
        if (reason := interrupted()) is not None:
            return reason
        clock.sleep(min(pause, left))
        pause = min(2 * pause, MAX_PAUSE_S)
    return None


@dataclass
class _Pending(Generic[T]):
    what: str
    transfer: Transfer
    buffer: T
    deadline: float


class InFlight(Generic[T]):
    """At most `limit` started transfers the host has not yet seen complete, oldest first.

    The window holds each transfer's buffer, so a buffer lives until its transfer is known to be
    done: call `make_room()` before allocating the next one, and live buffers never exceed
    `limit`. Transfers complete in the order they were started (one stream of collectives), so
    waiting for the oldest is waiting for the next to finish.

    Args:
        limit: transfers allowed in flight, >= 1 (1: start one, wait for it, start the next).
        timeout_s: each transfer must be done within this long after `add`.
        on_failure: builds the exception raised when a wait ends without the transfer done,
            from a sentence naming the transfer and why (e.g. `SyncGroup.broken`, which also
            aborts the group).
        clock: time source for the deadlines.
        interrupted: asked while waiting; a reason ends the wait at once (see
            `wait_until_done`), e.g. `SyncGroup.abort_reason`.
    """

    def __init__(
        self,
        limit: int,
        timeout_s: float,
        on_failure: Callable[[str], Exception],
        clock: Clock = SYSTEM_CLOCK,
        interrupted: Callable[[], str | None] = _never,
    ) -> None:
        if limit < 1:
            raise ValueError(f"at least one transfer must be allowed in flight, got {limit}")
        self.limit = limit
        self.timeout_s = timeout_s
        self._on_failure = on_failure
        self._clock = clock
        self._interrupted = interrupted
        self._pending: deque[_Pending[T]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, what: str, transfer: Transfer, buffer: T) -> None:
        """Track a transfer that was just started; `what` names it in a timeout error."""
        if len(self._pending) >= self.limit:
            raise RuntimeError(f"{self.limit} transfers already in flight: make_room() first")
        deadline = self._clock.now() + self.timeout_s
        self._pending.append(_Pending(what, transfer, buffer, deadline))

    def wait_oldest(self) -> T:
        """Block until the oldest transfer is done; forget it and return its buffer.

        Raises:
            The `on_failure` exception if its deadline passes or the wait is interrupted first
            (the window then stops tracking every transfer: a failed group is not waited on
            again).
        """
        pending = self._pending.popleft()
        why = wait_until_done(pending.transfer, pending.deadline, self._clock, self._interrupted)
        if why is not None:
            self._pending.clear()
            raise self._on_failure(
                f"{pending.what} did not complete within {self.timeout_s:g} s of being sent"
                if why == TIMED_OUT
                else f"{pending.what} stopped: {why}"
            )
        return pending.buffer

    def make_room(self) -> None:
        """Block until fewer than `limit` transfers are in flight."""
        while len(self._pending) >= self.limit:
            self.wait_oldest()

    def drain(self) -> None:
        """Block until every transfer is done."""
        while self._pending:
            self.wait_oldest()
