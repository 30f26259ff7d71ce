"""The weight-sync process group: learner rank 0 (group rank 0) + the rollout engines' members.

Built beside each member's own torch.distributed world, without the default group: a dedicated
`TCPStore` hosted by rank 0 and a gloo or NCCL backend object constructed on it, used through the
backend's list API. Every wait is bounded by `timeout_s`, and every failure is re-raised as
`SyncGroupError` naming host:port, rank, world size and timeout; a group that timed out is dead
(build a new one). Why this shape, and the measured timeouts: docs/weight-sync.md.

How a member's death ends a push at once, by backend:
- gloo: rank 0 sends each transfer to every receiver point to point, and each receiver takes it
  from rank 0 (`_gloo_transfer`). A dead receiver's connection is closed by its kernel, so rank
  0's send to it fails at once; rank 0 records it in `lost` and completes the push for the
  others. (gloo's own broadcast cannot do this: its receivers wait on a buffer that no peer's
  death wakes, measured: a survivor sat out the whole timeout even after rank 0 closed its group
  or exited.) gloo calls block the calling thread and enforce the timeout themselves.
- NCCL: a collective only queues work on the GPU, and a dead peer on the same node leaves it
  spinning. The host bounds the wait itself: `start_broadcast` returns a `Transfer` whose
  `done()` polls the NCCL work, and whoever waits on it (`broadcast`, `barrier`, the window in
  sync/inflight.py) gives up at start + timeout_s, or as soon as someone who saw a member die
  (the driver, told by Ray) asks the group to stop through rank 0's store (`request_abort`,
  `abort_reason`), and calls `broken`, which aborts the NCCL communicator. NCCL's own watchdog
  is set `NCCL_WATCHDOG_GRACE_S` later, as a backstop: left to fire first, it would take the
  whole process down.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed import BroadcastOptions, TCPStore  # type: ignore[attr-defined]

from gmai_rl.sync.inflight import COMPLETED, SYSTEM_CLOCK, TIMED_OUT, Transfer, wait_until_done

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0
ABORT_KEY = "gmai_rl/abort"
"""Set in rank 0's store to stop every member's waits on the group (its value says why)."""
ABORT_POLL_S = 0.1
"""How often a member waiting on a NCCL transfer asks the store whether to stop: a round trip to
rank 0's store every 0.1 s costs nothing next to a transfer, and ends a wait on a dead member
within a fraction of a second of the request."""
NCCL_WATCHDOG_GRACE_S = 60.0
"""How much later than our own deadline NCCL's watchdog times a collective out. Our wait aborts
the communicator at the deadline, which ends the stuck kernel; the watchdog then sees the work
finish instead of timing out (with the default TORCH_NCCL_ASYNC_ERROR_HANDLING a watchdog
timeout kills the process)."""


class SyncGroupError(RuntimeError):
    """A sync-group rendezvous or collective failed (usually: a peer did not show up in time)."""


def find_free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on this node, each held in TIME_WAIT for the kernel's
    TIME_WAIT period (60 s on Linux) so that nothing else is handed it meanwhile.

    A port that is merely bound to 0, read and released goes back into the pool the kernel
    draws from for every other `bind(("", 0))` on the node (Ray's and gRPC's servers, other
    probes), and a store that binds it seconds later, once its actor has started, fails with
    "address already in use" (seen in CI). A port with a TIME_WAIT connection on it is skipped
    by the kernel's own choices (bind to 0 and connect) but can still be bound explicitly by a
    socket with SO_REUSEADDR, which TCPStore sets. So each port is bound with SO_REUSEADDR, a
    loopback connection is accepted on it, and the accepted end is closed first: the TIME_WAIT
    is on the port's side. The trick is Yelp's ephemeral-port-reserve.

    Call it on the node that will host rank 0's store, shortly before the store binds: after
    the TIME_WAIT period the port is unguarded again.
    """
    with contextlib.ExitStack() as stack:
        listeners = []
        for _ in range(count):  # all bound at once: distinct ports
            listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("", 0))
            listener.listen(1)
            listeners.append(listener)
        ports = [int(listener.getsockname()[1]) for listener in listeners]
        for listener, port in zip(listeners, ports, strict=True):
            with socket.create_connection(("127.0.0.1", port)):
                accepted, _ = listener.accept()
                accepted.close()  # before the client: the TIME_WAIT stays on `port`
        return ports


def find_free_port() -> int:
    """A TCP port that is free on this node right now (see `find_free_ports`)."""
    return find_free_ports(1)[0]


@dataclass
class SyncGroup:
    """A live sync group. Build it with `init_sync_group`; every member holds one."""

    host: str
    port: int
    rank: int
    world_size: int
    backend: str
    timeout_s: float
    device: torch.device
    _store: Any = field(repr=False)
    _pg: Any = field(repr=False)
    _failure: str | None = field(default=None, repr=False)
    lost: dict[int, str] = field(default_factory=dict)
    """gloo, rank 0: receivers whose transfer failed (a dead process, a pair that timed out), by
    group rank, with the error; later transfers skip them and go on for the others."""
    _transfers: int = field(default=0, repr=False)
    """Transfers started on this group: the tag of the next gloo send/receive pair (every
    member starts the same transfers in the same order, so the counts agree)."""
    _abort_checked: float = field(default=float("-inf"), repr=False)

    def _where(self) -> str:
        return (
            f"sync group {self.host}:{self.port} (backend {self.backend}, rank {self.rank} of "
            f"world size {self.world_size}, timeout {self.timeout_s:g} s)"
        )

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise SyncGroupError(
                f"{self._where()} is unusable after an earlier failure ({self._failure}); "
                "destroy it and build a new one"
            )
        if self._pg is None:
            raise SyncGroupError(f"{self._where()} was destroyed")

    def broken(self, message: str) -> SyncGroupError:
        """Mark the group dead after `message` (a collective failed or missed its deadline) and
        return the error to raise. With NCCL this aborts the communicator first: a collective
        whose peer never comes occupies its kernel, and every stream that waits on it, until
        then. Every later call on the group fails at once."""
        if self._failure is None:
            self._failure = message
            if self.backend == "nccl" and self._pg is not None:
                with contextlib.suppress(RuntimeError):
                    self._pg.abort()
        return SyncGroupError(
            f"{message} on {self._where()}; the group is unusable now, destroy it and build a "
            "new one"
        )

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        """Start broadcasting `tensor` in place from group rank `src` to every other member.

        Every member must call it with a tensor of the same numel and dtype, in the same order
        relative to the group's other collectives. On `src` the tensor is read, elsewhere
        overwritten. gloo: returns when the transfer is done (`COMPLETED`); on `src`, a receiver
        it could not reach is recorded in `lost` instead of raising. NCCL: returns once it is
        queued; work queued later on the current CUDA stream already sees the data, but the
        host may touch or free the tensor, or hand it to another stream, only after the
        returned transfer's `done()` (which raises `SyncGroupError` if the broadcast failed).

        Args:
            tensor: contiguous, on `self.device` (CPU for gloo, this process's GPU for NCCL).
            src: the sending rank (0 = the learner).
        """
        self._check_alive()
        if not tensor.is_contiguous():
            raise ValueError("broadcast needs a contiguous tensor")
        what = f"broadcast of {tensor.numel()} {tensor.dtype} elements from rank {src}"
        self._transfers += 1
        if self.backend == "gloo":
            self._gloo_transfer(tensor, src, what)
            return COMPLETED
        opts = BroadcastOptions()
        opts.rootRank = src
        try:
            work = self._pg.broadcast([tensor], opts)
            # NCCL: makes the current stream wait for the collective and returns at once
            # (ProcessGroupNCCL's WorkNCCL::wait without a timeout); it also releases the work's
            # own reference to the tensor, so from here on the tensor lives exactly as long as
            # its caller keeps it.
            work.wait()
        except RuntimeError as err:
            raise self.broken(f"{what} failed: {err}") from err
        return _NcclTransfer(work, what, self)

    def _gloo_transfer(self, tensor: torch.Tensor, src: int, what: str) -> None:
        """`src` sends `tensor` to every receiver not yet lost, all sends started before any is
        awaited; a receiver takes it from `src`. A send that fails (the receiver died, or did
        not take the data within timeout_s) loses that receiver only."""
        tag = self._transfers
        if self.rank != src:
            try:
                self._pg.recv([tensor], src, tag).wait()
            except RuntimeError as err:
                raise self.broken(f"{what} failed: {err}") from err
            return
        sends = {}
        for peer in range(self.world_size):
            if peer == src or peer in self.lost:
                continue
            try:
                sends[peer] = self._pg.send([tensor], peer, tag)
            except RuntimeError as err:  # a connection already closed fails the call itself
                self.lost[peer] = f"{what} failed: {err}"
        for peer, work in sends.items():
            try:
                work.wait()
            except RuntimeError as err:
                self.lost[peer] = f"{what} failed: {err}"

    def abort_reason(self) -> str | None:
        """Why someone asked every member to stop waiting on this group (`request_abort`), or
        None. Reads rank 0's store at most every ABORT_POLL_S; a store that cannot be read
        (rank 0 gone) is a reason too."""
        now = time.monotonic()
        if self._store is None or now - self._abort_checked < ABORT_POLL_S:
            return None
        self._abort_checked = now
        try:
            if not self._store.check([ABORT_KEY]):
                return None
            return f"aborted: {self._store.get(ABORT_KEY).decode()}"
        except (RuntimeError, TimeoutError) as err:
            return f"rank 0's store cannot be reached ({err})"

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """`start_broadcast`, then wait until it is done (at most `timeout_s`). Blocking on
        every backend: afterwards the tensor is settled for the host and every stream."""
        started = time.monotonic()
        transfer = self.start_broadcast(tensor, src)
        self._settle(transfer, started, f"broadcast of {tensor.numel()} {tensor.dtype} elements")

    def barrier(self) -> None:
        """Block until every member reached the barrier (a 1-element all-reduce)."""
        self._check_alive()
        started = time.monotonic()
        # An all-reduce on our own device rather than `pg.barrier()`: ProcessGroupNCCL's barrier
        # has to guess a device when the group has no bound one.
        token = torch.zeros(1, device=self.device)
        try:
            work = self._pg.allreduce([token])
            work.wait()
        except RuntimeError as err:
            raise self.broken(f"barrier failed: {err}") from err
        if self.backend == "nccl":
            self._settle(_NcclTransfer(work, "barrier", self), started, "barrier")

    def _settle(self, transfer: Transfer, started: float, what: str) -> None:
        deadline = started + self.timeout_s
        why = wait_until_done(transfer, deadline, SYSTEM_CLOCK, self.abort_reason)
        if why == TIMED_OUT:
            raise self.broken(f"{what} did not complete within {self.timeout_s:g} s")
        if why is not None:
            raise self.broken(f"{what} stopped: {why}")

    def destroy(self) -> None:
        """Release the group's connections (and NCCL communicators). Idempotent.

        Rank 0's store goes with it, so destroy rank 0 last or together with the others: a
        member still waiting on the store would fail.
        """
        # An aborted NCCL group has nothing left to flush (shutdown would wait on it).
        if self._pg is not None and not (self.backend == "nccl" and self._failure is not None):
            self._pg.shutdown()
        self._pg = None
        self._store = None

    close = destroy

    def __enter__(self) -> SyncGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class _NcclTransfer:
    """A queued NCCL collective, polled through its `Work`."""

    def __init__(self, work: Any, what: str, group: SyncGroup) -> None:
        self._work, self._what, self._group = work, what, group

    def done(self) -> bool:
        try:
            # WorkNCCL::isCompleted: queries the collective's end event (never blocks) after
            # checking the communicator for asynchronous NCCL errors; True on error too.
            if not self._work.is_completed():
                return False
            # Cheap now (a stream wait on a finished event); re-raises the error of a failed
            # collective, which `Work.exception()` (deprecated) would only report.
            self._work.wait()
        except RuntimeError as err:
            raise self._group.broken(f"{self._what} failed: {err}") from err
        return True


def init_sync_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: torch.device | str | None = None,
    generation: int = 0,
) -> SyncGroup:
    """Join (rank 0: host) the sync group. Collective: blocks until all `world_size` ranks join.

    Every member calls it concurrently with the same host, port, world size and backend; the
    driver must launch all the calls before waiting on any.

    Args:
        host: rank 0's address, reachable from every member (the cluster finds it on rank 0's node).
        port: a free port on rank 0's node (`find_free_port()` there); rank 0's store binds it.
        rank: 0 for the learner, 1..world_size-1 for rollout workers.
        world_size: 1 + number of rollout workers.
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors; every member on its own GPU).
        timeout_s: bound on the rendezvous and on each collective (see the module docstring).
        device: where collectives' tensors live. Default: CPU for gloo, the current CUDA
            device for NCCL (set it before calling, as DeepSpeed and vLLM do).
        generation: which formation of the group this is. A group cannot take a new member, so
            replacing a dead one means every member forms a new group; rank 0 publishes the
            generation in its store and a member of another one (a stale worker given an old
            address) is refused instead of joining.

    Returns:
        The live group. It has already exchanged one tensor, so the connection works end to end.

    Raises:
        SyncGroupError: a peer did not show up within the timeout, or the connection failed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sync backend {backend!r}; expected one of {BACKENDS}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    timeout = datetime.timedelta(seconds=timeout_s)
    where = (
        f"sync group {host}:{port} (backend {backend}, rank {rank} of world size {world_size}, "
        f"timeout {timeout_s:g} s)"
    )
    try:
        if rank != 0:
            _wait_for_listener(host, port, timeout_s)
        # wait_for_workers: rank 0's constructor returns only once all world_size members have
        # connected, so a missing peer fails here with a count of who joined.
        store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    except (RuntimeError, TimeoutError) as err:
        raise SyncGroupError(f"could not form the store of {where}: {err}") from err
    _check_generation(store, rank, generation, where)
    try:
        pg = _new_backend(backend, store, rank, world_size, timeout)
    except RuntimeError as err:
        raise SyncGroupError(f"could not connect the members of {where}: {err}") from err
    group = SyncGroup(
        host, port, rank, world_size, backend, timeout_s, torch.device(device), store, pg
    )
    # One tiny broadcast so that every member leaves init with a working data path: NCCL
    # creates its communicator lazily on the first collective, and it is better to find a
    # broken link here, while every member is in this call, than inside the first weight push.
    group.broadcast(torch.zeros(1, device=group.device), src=0)
    if group.lost:
        group.destroy()
        raise SyncGroupError(f"{where}: members unreachable after joining: {group.lost}")
    return group


def request_abort(host: str, port: int, reason: str, timeout_s: float = 5.0) -> None:
    """Ask every member of the group whose store is at host:port to stop waiting on it, saying
    why (e.g. "rollout worker 1 died"). Called by whoever saw a member die: the driver, told by
    Ray. NCCL members see it within ABORT_POLL_S and abort their communicator; gloo members
    never wait on a dead peer (see the module docstring), so it changes nothing for them.

    Raises:
        SyncGroupError: rank 0's store could not be reached within `timeout_s`.
    """
    try:
        store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        store.set(ABORT_KEY, reason)
    except (RuntimeError, TimeoutError) as err:
        raise SyncGroupError(f"could not ask sync group {host}:{port} to abort: {err}") from err


_GENERATION_KEY = "gmai_rl/generation"


def _check_generation(store: TCPStore, rank: int, generation: int, where: str) -> None:
    if rank == 0:
        store.set(_GENERATION_KEY, str(generation))
        return
    try:
        published = store.get(_GENERATION_KEY).decode()
    except (RuntimeError, TimeoutError) as err:
        raise SyncGroupError(f"no generation published on {where}: {err}") from err
    if published != str(generation):
        raise SyncGroupError(
            f"{where} is generation {published}, this member was sent to join generation "
            f"{generation}: a stale member may not join"
        )


def _wait_for_listener(host: str, port: int, timeout_s: float) -> None:
    """Return once something accepts TCP connections on host:port; TimeoutError after timeout_s.

    TCPStore's client retries a refused connect after a random backoff of seconds, so a worker
    that comes up before rank 0's store can sit idle ~10 s after the store is up (measured), and
    gives up only after up to ~2 x its timeout. Polling first makes the connect prompt and its
    bound exact. A bare connection does not count as a store client.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, left))):
                return
        except OSError as err:
            if left <= 0:
                raise TimeoutError(
                    f"nothing listened on {host}:{port} for {timeout_s:g} s"
                ) from err
            time.sleep(0.05)


def _new_backend(
    backend: str, store: TCPStore, rank: int, world_size: int, timeout: datetime.timedelta
) -> Any:
    """A gloo or NCCL backend object on `store`, not registered with torch.distributed."""
    if backend == "gloo":
        # The timedelta overload is the one init_process_group uses: it honours
        # GLOO_SOCKET_IFNAME (set it where the hostname resolves to an unroutable address).
        return torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)
    # Imported here: a torch build without NCCL has no such name, and gloo users must not care.
    from torch.distributed import ProcessGroupNCCL

    # As torch's own _create_nccl_process_group builds it, minus the default-world bookkeeping.
    # The communicator is created lazily on the first collective, on that tensor's device.
    # The watchdog's timeout trails ours (see NCCL_WATCHDOG_GRACE_S).
    options = ProcessGroupNCCL.Options()
    options._timeout = timeout + datetime.timedelta(seconds=NCCL_WATCHDOG_GRACE_S)
    return ProcessGroupNCCL(store, rank, world_size, options)
