"""The bounded in-flight weight sync on a real CUDA device: one GPU, plain torch, no Ray.

NCCL cannot hold two ranks of one group on one GPU, so the pair tests link a sender thread and
a receiver thread through `CudaLink`, which behaves towards the host as a NCCL broadcast does:
the copy runs on a side stream behind a spin kernel (the GPU lags the host by a millisecond or
more per bucket), the caller's stream is made to wait for it (as `WorkNCCL::wait()` does), and
the host learns that it finished only by querying an event. The receiver's loader reads each
tensor on a stream of its own, which nothing orders after the copy: only the host-side wait in
`receive_weights` makes what it reads right.

The sync group's own NCCL path runs in a world of one, in a child process (a crash there must
not take the test session with it): a push must arrive exact, and a broadcast held back behind
a long kernel must fail as `SyncGroupError` at the group's timeout, with the process still alive
after NCCL's watchdog has had its turn.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gmai_rl.sync.buckets import Bucket, plan_buckets
from gmai_rl.sync.group import SyncGroupError
from gmai_rl.sync.inflight import Transfer
from gmai_rl.sync.weights import param_specs, push_weights, receive_weights

pytestmark = pytest.mark.gpu

SPIN_CYCLES = 2_000_000  # GPU clock cycles of the spin before each copy: about 1 ms
LOADER_PAUSE_S = 0.002  # per tensor: a loader slower than the sender's host loop


@dataclass
class _Post:
    """One sender broadcast waiting for the receiver to take it."""

    source: torch.Tensor
    ready: torch.cuda.Event  # the sender's stream reached the broadcast
    landed: torch.cuda.Event  # recorded on the side stream after the copy
    taken: threading.Event  # `landed` has been recorded


class _EventTransfer:
    def __init__(self, post: _Post) -> None:
        self._landed, self._taken = post.landed, post.taken

    def done(self) -> bool:
        # CUDA reports an event that was never recorded as complete: ask only once it was.
        return self._taken.is_set() and self._landed.query()


class _End:
    def __init__(self, link: CudaLink, rank: int) -> None:
        self.link, self.rank = link, rank
        self.device = link.device
        self.timeout_s = 60.0

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> Transfer:
        return self.link.send(tensor) if self.rank == src else self.link.receive(tensor)

    def broken(self, message: str) -> Exception:
        return SyncGroupError(message)


class CudaLink:
    """A broadcast between two threads on one GPU (see the module docstring).

    Counts the sender's bucket buffers still alive each time a new one is sent (the first send
    is the plan fingerprint and is not counted).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.posts: queue.Queue[_Post] = queue.Queue()
        self.sender, self.receiver = _End(self, 0), _End(self, 1)
        self.sends = 0
        self.buffers: list[weakref.ref[torch.Tensor]] = []
        self.most_alive = 0

    def send(self, tensor: torch.Tensor) -> Transfer:
        if self.sends > 0:
            self.buffers.append(weakref.ref(tensor))
            self.most_alive = max(self.most_alive, sum(b() is not None for b in self.buffers))
        self.sends += 1
        ready = torch.cuda.Event()
        ready.record()
        post = _Post(tensor, ready, torch.cuda.Event(), threading.Event())
        self.posts.put(post)
        return _EventTransfer(post)

    def receive(self, tensor: torch.Tensor) -> Transfer:
        post = self.posts.get(timeout=60)
        # NaN until the copy lands, so a premature read cannot pass for the data.
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        # As NCCL's stream does: wait for what both sides queued before the collective.
        self.side.wait_event(post.ready)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(SPIN_CYCLES)
            tensor.copy_(post.source)
            post.landed.record()
        # The caching allocator must not hand either buffer out again before the copy ran.
        post.source.record_stream(self.side)
        tensor.record_stream(self.side)
        post.taken.set()
        torch.cuda.current_stream().wait_event(post.landed)  # as WorkNCCL::wait()
        return _EventTransfer(post)


def model_on(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(6)]
    return torch.nn.Sequential(*layers).to(device)


def cuda_plan(model: torch.nn.Module) -> list[Bucket]:
    plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200 * 1024)
    assert len(plan) >= 6
    return plan


def exchange(bound: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], CudaLink]:
    """Push a CUDA model through a `CudaLink` with `max_in_flight=bound`; what arrived."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = model_on(device)
    plan = cuda_plan(model)
    torch.cuda.synchronize()  # the model is written before either thread starts
    link = CudaLink(device)
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            with torch.cuda.stream(torch.cuda.Stream(device)):
                loader = torch.cuda.Stream(device)
                for name, tensor in receive_weights(link.receiver, plan):
                    with torch.cuda.stream(loader):
                        got[name] = tensor.clone()
                    tensor.record_stream(loader)
                    time.sleep(LOADER_PAUSE_S)
                loader.synchronize()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    with torch.cuda.stream(torch.cuda.Stream(device)):
        push_weights(model, plan, link.sender, zero_stage=0, max_in_flight=bound)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the receiver did not finish"
    if errors:
        raise errors[0]
    return model, got, link


@pytest.mark.parametrize("bound", [1, 2])
def test_bounded_push_arrives_exact_and_holds_at_most_bound_buffers(bound: int) -> None:
    model, got, link = exchange(bound)
    assert list(got) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        want = param.detach().to(torch.bfloat16)
        assert torch.equal(got[name], want), name
    assert link.most_alive <= bound
    assert all(b() is None for b in link.buffers)  # nothing kept after the push


def test_unbounded_push_runs_ahead_of_a_slow_receiver() -> None:
    # The control: on a real device the sender's host does run ahead, so the bound is needed.
    model, got, link = exchange(bound=10**6)
    assert link.most_alive >= 3
    assert len(got) == len(list(model.parameters()))


# --- the sync group's NCCL path, in a world of one ---------------------------------------------

_CHILD = """
import json, time, torch
from gmai_rl.sync import SyncGroupError, find_free_port, init_sync_group, param_specs
from gmai_rl.sync import plan_buckets, push_weights
from gmai_rl.sync.weights import checksums

device = torch.device("cuda", 0)
torch.cuda.set_device(device)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)]).to(device)
plan = plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 200 * 1024)
out = {"buckets": len(plan)}
group = init_sync_group("127.0.0.1", find_free_port(), 0, 1, "nccl", timeout_s=TIMEOUT_S)
sent = push_weights(model, plan, group, zero_stage=0, verify=True, max_in_flight=2)
want = checksums((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
out["push_exact"] = sent == want
group.barrier()
# NCCL's stream waits for the current stream, so this broadcast cannot finish before the spin.
torch.cuda._sleep(STALL_CYCLES)
start = time.monotonic()
try:
    group.broadcast(torch.zeros(4, device=device))
    out["stall"] = "returned"
except SyncGroupError as err:
    out["stall"] = str(err)
out["stall_s"] = time.monotonic() - start
try:
    group.broadcast(torch.zeros(4, device=device))
    out["after"] = "returned"
except SyncGroupError as err:
    out["after"] = str(err)
torch.cuda.synchronize()  # the spin ends, the aborted collective's work with it
time.sleep(3.0)  # many rounds of NCCL's watchdog (every 100 ms)
group.destroy()
print(json.dumps(out))
"""


def test_nccl_group_of_one_pushes_exact_and_a_stalled_broadcast_fails_without_killing() -> None:
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    src = Path(__file__).resolve().parents[2] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    # 1e10 cycles: 5 s or more at any H100/H200 clock, well past the 2 s timeout.
    code = _CHILD.replace("TIMEOUT_S", "2.0").replace("STALL_CYCLES", "10_000_000_000")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["push_exact"], out
    assert "did not complete within 2 s" in out["stall"], out
    assert "rank 0 of world size 1" in out["stall"] and "destroy it" in out["stall"], out
    assert "unusable after an earlier failure" in out["after"], out
