"""The weight sync across real processes: gloo groups, timeouts, and a ZeRO-3 learner.

Each multi-process test starts its members with `multiprocessing`, collects one result per
process through a queue, and kills whatever is still alive on the way out, so a failing test
leaves no orphan behind. The members fork from a forkserver, a clean interpreter (as Ray actors
are, not a copy of pytest's) that has imported torch once: each spawned interpreter importing
torch itself took 5-15 s on 2 busy cores. Ports come from `find_free_port()`. The timeout tests run their peers as threads of this process: the
behaviour under test is a member waiting on the network, which threads show just as well, and
they skip the seconds a spawned interpreter takes to import torch.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

from gmai_rl.sync import (
    SyncGroupError,
    find_free_port,
    init_sync_group,
    param_specs,
    plan_buckets,
    push_weights,
    receive_weights,
)
from gmai_rl.sync.weights import checksums

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


# --- running functions in processes -------------------------------------------------------------


def _child(index: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    try:
        results.put((index, True, fn(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))
    # Skip interpreter finalization: with torch and DeepSpeed loaded, clearing the modules
    # alone takes seconds on a busy 2-core machine. Flush the result first.
    results.close()
    results.join_thread()
    os._exit(0)


def run_in_processes(
    jobs: list[tuple[Callable[..., Any], tuple]],
    timeout_s: float,
    may_die: frozenset[int] | set[int] = frozenset(),
) -> list[Any]:
    """Run fn(*args) for each job in its own spawned process; their return values, in order.

    Fails on the first child exception (with its traceback), on a child that dies without a
    result (unless its index is in `may_die`: its result is then None), or when the results are
    not all in after timeout_s. Every child is dead on return.
    """
    ctx = mp.get_context("forkserver")
    # Takes effect when this session's forkserver starts (its first use). Only torch: the
    # DeepSpeed members set DS_ACCELERATOR before they import deepspeed.
    ctx.set_forkserver_preload(["torch"])
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(i, fn, args, results), daemon=True)
        for i, (fn, args) in enumerate(jobs)
    ]
    try:
        for proc in procs:
            proc.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(procs) - len(may_die):
            try:
                index, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                crashed = [
                    i
                    for i, p in enumerate(procs)
                    if i not in out and i not in may_die and p.exitcode is not None
                ]
                if crashed:
                    raise AssertionError(f"processes {crashed} died without a result") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(len(procs))) - set(out))
                    raise AssertionError(
                        f"no result from processes {missing} in {timeout_s} s"
                    ) from None
                continue
            if not ok:
                raise AssertionError(f"process {index} failed:\n{value}")
            out[index] = value
        return [out.get(i) for i in range(len(procs))]
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(blob))


# --- a real gloo group: 1 sender, 2 receivers ---------------------------------------------------


def mixed_model() -> torch.nn.Module:
    """fp32 layers plus a bf16 one (mixed native dtypes); its first weight (2 KB) is oversize."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)
    )
    model[2].to(torch.bfloat16)
    return model


def _own_default_group(port: int) -> None:
    # Every real member already has a default group (DeepSpeed's, vLLM's); the sync group must
    # live beside it. A world-size-1 gloo group per process stands in for it.
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://{HOST}:{port}", rank=0, world_size=1
    )


def _sender(port: int, default_port: int, plans: list) -> dict:
    _own_default_group(default_port)
    model = mixed_model()
    sent, cksums = [], []
    with init_sync_group(HOST, port, rank=0, world_size=3, timeout_s=60) as group:
        for step, plan in enumerate(plans):
            with torch.no_grad():  # a "training step" between pushes
                for param in model.parameters():
                    param.add_(0.5 * step)
            cksums.append(push_weights(model, plan, group, zero_stage=0, verify=True))
            wire = {s.name: s.dtype for b in plan for s in b.specs}
            sent.append(
                to_bytes(
                    {n: p.detach().to(getattr(torch, wire[n])) for n, p in model.named_parameters()}
                )
            )
        group.barrier()
    return {"sent": sent, "checksums": cksums, "default_world": torch.distributed.get_world_size()}


def _receiver(port: int, rank: int, default_port: int, plans: list) -> dict:
    _own_default_group(default_port)
    got, cksums = [], []
    with init_sync_group(HOST, port, rank=rank, world_size=3, timeout_s=60) as group:
        for plan in plans:
            # Copy out of the bucket buffers, as an engine's loader does.
            weights = {name: tensor.clone() for name, tensor in receive_weights(group, plan)}
            cksums.append(checksums(weights.items()))
            got.append(to_bytes(weights))
        group.barrier()
    return {"got": got, "checksums": cksums}


def test_gloo_broadcast_one_sender_two_receivers_two_pushes() -> None:
    model = mixed_model()
    plans = [
        plan_buckets(param_specs(model.named_parameters()), 1024),  # native fp32 + bf16
        plan_buckets(param_specs(model.named_parameters(), "bfloat16"), 1024),  # bf16 wire
    ]
    assert len(plans[0]) >= 3 and {b.dtype for b in plans[0]} == {"float32", "bfloat16"}
    port = find_free_port()
    ports = [find_free_port() for _ in range(3)]
    sender, *receivers = run_in_processes(
        [
            (_sender, (port, ports[0], plans)),
            (_receiver, (port, 1, ports[1], plans)),
            (_receiver, (port, 2, ports[2], plans)),
        ],
        timeout_s=120,
    )
    assert sender["default_world"] == 1  # the default group was left alone
    for push in range(2):
        sent = from_bytes(sender["sent"][push])
        for receiver in receivers:
            got = from_bytes(receiver["got"][push])
            assert list(got) == list(sent)
            for name, tensor in sent.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
            assert receiver["checksums"][push] == sender["checksums"][push]
    # the second push really carried new weights, in bf16
    assert sender["checksums"][0] != sender["checksums"][1]
    assert all(t.dtype == torch.bfloat16 for t in from_bytes(sender["sent"][1]).values())


# --- timeouts: a missing or silent peer fails clearly, never hangs ------------------------------

TIMEOUT_S = 2.0


def assert_names_the_group(err: BaseException, port: int, rank: int, world_size: int) -> None:
    text = str(err)
    assert f"{HOST}:{port}" in text, text
    assert f"rank {rank} of world size {world_size}" in text, text
    assert f"timeout {TIMEOUT_S:g} s" in text, text


def test_rank0_fails_clearly_when_a_worker_never_joins() -> None:
    port = find_free_port()
    start = time.monotonic()
    with pytest.raises(SyncGroupError, match="clients joined") as info:
        init_sync_group(HOST, port, rank=0, world_size=2, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert_names_the_group(info.value, port, rank=0, world_size=2)
    # TCPStore's master adds ~1 s to its wait; measured 3.0 s for a 2 s timeout.
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3, elapsed


def test_worker_fails_clearly_when_rank0_never_starts() -> None:
    port = find_free_port()
    start = time.monotonic()
    with pytest.raises(SyncGroupError, match="could not form the store") as info:
        init_sync_group(HOST, port, rank=1, world_size=2, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert_names_the_group(info.value, port, rank=1, world_size=2)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.5, elapsed


def silent_pair(port: int) -> dict[int, Any]:
    """A group of two whose members have both joined; neither transfers anything yet."""
    groups: dict[int, Any] = {}

    def join(rank: int) -> None:
        groups[rank] = init_sync_group(HOST, port, rank=rank, world_size=2, timeout_s=TIMEOUT_S)

    peer = threading.Thread(target=join, args=(1,), daemon=True)
    peer.start()
    join(0)
    peer.join(timeout=30)
    return groups


def test_a_receiver_times_out_when_rank_0_joined_but_stays_silent() -> None:
    port = find_free_port()
    groups = silent_pair(port)
    try:
        start = time.monotonic()
        with pytest.raises(SyncGroupError, match="broadcast of 8") as info:
            groups[1].broadcast(torch.zeros(8), src=0)
        elapsed = time.monotonic() - start
        assert_names_the_group(info.value, port, rank=1, world_size=2)
        assert "destroy it" in str(info.value)
        assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 2, elapsed
        # The group is dead after a timeout, and says so at once.
        start = time.monotonic()
        with pytest.raises(SyncGroupError):
            groups[1].broadcast(torch.zeros(8), src=0)
        assert time.monotonic() - start < 1
    finally:
        for group in groups.values():
            group.destroy()


def test_rank_0_loses_a_receiver_that_joined_but_stays_silent_and_goes_on_without_it() -> None:
    # gloo's send waits for the receiver to take the data: a silent one is a stall, cut by the
    # group's timeout, after which rank 0 no longer sends to it (a dead one is dropped at once:
    # tests/integration/test_sync_deaths.py).
    port = find_free_port()
    groups = silent_pair(port)
    try:
        start = time.monotonic()
        groups[0].broadcast(torch.zeros(8), src=0)
        elapsed = time.monotonic() - start
        assert list(groups[0].lost) == [1] and "Timed out" in groups[0].lost[1]
        assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 2, elapsed
        start = time.monotonic()
        groups[0].broadcast(torch.zeros(8), src=0)  # nobody left to send to
        assert time.monotonic() - start < 1
    finally:
        for group in groups.values():
            group.destroy()


def test_a_destroyed_group_refuses_work_and_a_new_one_forms() -> None:
    group = init_sync_group(HOST, find_free_port(), rank=0, world_size=1, timeout_s=TIMEOUT_S)
    group.barrier()
    group.destroy()
    group.destroy()  # idempotent
    with pytest.raises(SyncGroupError, match="destroyed"):
        group.broadcast(torch.zeros(1))
    with init_sync_group(HOST, find_free_port(), rank=0, world_size=1) as again:
        again.broadcast(torch.ones(3))


def test_a_member_sent_to_another_generation_of_the_group_is_refused() -> None:
    # Re-forming the group around a replaced worker makes a new generation: a member holding
    # an older one must fail with the reason, not join the new group.
    port = find_free_port()
    errors: dict[int, BaseException] = {}

    def join(rank: int, generation: int) -> None:
        try:
            init_sync_group(HOST, port, rank, 2, timeout_s=TIMEOUT_S, generation=generation)
        except SyncGroupError as err:
            errors[rank] = err

    stale = threading.Thread(target=join, args=(1, 4), daemon=True)
    stale.start()
    join(0, 5)
    stale.join(timeout=30)
    assert "is generation 5, this member was sent to join generation 4" in str(errors[1])
    assert 0 in errors  # rank 0 waited for a member that never connected, and said so


def test_members_of_the_same_generation_form_the_group() -> None:
    port = find_free_port()
    groups: dict[int, Any] = {}

    def join(rank: int) -> None:
        groups[rank] = init_sync_group(HOST, port, rank, 2, timeout_s=TIMEOUT_S, generation=7)

    peer = threading.Thread(target=join, args=(1,), daemon=True)
    peer.start()
    join(0)
    peer.join(timeout=30)
    try:
        received = torch.zeros(3)
        sender = threading.Thread(target=groups[0].broadcast, args=(torch.ones(3),))
        sender.start()
        groups[1].broadcast(received)
        sender.join(timeout=30)
        assert received.tolist() == [1.0, 1.0, 1.0]
    finally:
        for group in groups.values():
            group.destroy()


# --- ZeRO-3: two DeepSpeed learner ranks gather, rank 0 broadcasts to a receiver ------------------


def zero3_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _zero3_learner(rank: int, ds_port: int, sync_port: int, plan: list) -> dict:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR=HOST,
        MASTER_PORT=str(ds_port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"
    # init_distributed on CPU JIT-compiles DeepSpeed's shared-memory all-reduce (20-50 s the
    # first time on these machines). Only `inference_all_reduce` (AutoTP inference) uses it, so
    # a trainer can mark it incompatible and skip the build; DeepSpeed keeps this dict for edits.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    model = zero3_model()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            # A tiny model is below the default persistence threshold (1e5 elements), which
            # would keep every parameter whole on every rank and test nothing.
            "stage3_param_persistence_threshold": 0,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    torch.manual_seed(rank)
    loss = engine(torch.randn(1, 16)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    module = engine.module
    partitioned = all(p.numel() < p.ds_numel for p in module.parameters())
    # Each rank builds the plan from its own partitioned params (ds_shape): it must equal the
    # driver's plan built from a plain copy of the model.
    own_plan = plan_buckets(param_specs(module.named_parameters()), 1024)

    group = init_sync_group(HOST, sync_port, 0, 2, timeout_s=60) if rank == 0 else None
    sent = push_weights(module, plan, group, zero_stage=3, verify=True)
    # The reference: full parameters gathered on every rank (a collective), kept on rank 0.
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        full = {n: p.detach().clone() for n, p in module.named_parameters()}
    if group is not None:
        group.barrier()
        group.destroy()
    torch.distributed.destroy_process_group()
    return {
        "partitioned": partitioned,
        "same_plan": own_plan == plan,
        "sent": sent,
        "full": to_bytes(full) if rank == 0 else None,
    }


def _zero3_receiver(sync_port: int, plan: list) -> dict:
    with init_sync_group(HOST, sync_port, 1, 2, timeout_s=60) as group:
        got = {name: tensor.clone() for name, tensor in receive_weights(group, plan)}
        group.barrier()
    return {"got": to_bytes(got), "checksums": checksums(got.items())}


@pytest.mark.timeout(240)
def test_zero3_push_gathers_on_every_learner_rank_and_reaches_the_receiver() -> None:
    initial = dict(zero3_model().named_parameters())
    plan = plan_buckets(param_specs(zero3_model().named_parameters()), 1024)
    assert len(plan) >= 3
    ds_port, sync_port = find_free_port(), find_free_port()
    rank0, rank1, receiver = run_in_processes(
        [
            (_zero3_learner, (0, ds_port, sync_port, plan)),
            (_zero3_learner, (1, ds_port, sync_port, plan)),
            (_zero3_receiver, (sync_port, plan)),
        ],
        timeout_s=200,
    )
    assert rank0["partitioned"] and rank1["partitioned"]
    assert rank0["same_plan"] and rank1["same_plan"]
    assert rank1["sent"] is None  # rank 1 gathered but did not send
    full, got = from_bytes(rank0["full"]), from_bytes(receiver["got"])
    assert list(got) == list(full)
    for name, tensor in full.items():
        assert tensor.shape == initial[name].shape
        assert torch.equal(got[name], tensor), name
        assert not torch.equal(tensor, initial[name].detach()), f"{name}: the step changed nothing"
    assert receiver["checksums"] == rank0["sent"]
