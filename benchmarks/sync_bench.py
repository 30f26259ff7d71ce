"""Time one weight push between local processes against the raw broadcast: `python benchmarks/sync_bench.py`.

A measurement, not a test. One sender and `--receivers` receivers on this machine form a sync
group (`init_sync_group`, as the trainer does); the sender holds `--params` parameters in tensors
of `--tensor-numel` elements. Every member pins its torch threads (`--threads`, default 1: the
trainer's `learner.torch_threads` / `rollout.torch_threads`), or three processes on two cores
fight over 2 x 2 OpenMP threads and the push takes ~10x longer. Rows, each over `--repeats`
pushes, all in one run:

- raw flat: one `broadcast` of the whole model as one preallocated flat tensor: the wire's limit,
  no copies on either side (with gloo our group sends point to point from rank 0 to each
  receiver, so that a dead receiver is dropped at once: gmai_rl/sync/group.py);
- raw per-tensor: one `broadcast` per parameter, straight from and into the parameters: no
  copies, one collective per tensor;
- gloo collective flat / per-tensor (gloo only): the same through gloo's own broadcast
  collective, which the group used before it sent point to point;
- receiver copy: a receiver's `copy_` of every tensor into its parameters, timed on its own (what
  any loader pays on top of the wire);
- ours: `send_weights` / `receive_weights` over each bucket size in `--bucket-mb` (flatten, cast,
  broadcast, unflatten, and the receiver's copy into its parameters, as an engine's loader does),
  with the bucket buffers kept across pushes as the trainer keeps them (`FlatBuffers`), and with
  `--fresh-buffers` also with a new buffer per bucket and push (the code before they were kept).

The goal column compares ours to raw per-tensor + receiver copy. NCCL needs one GPU per member (a
1-GPU machine cannot run it with a receiver).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gmai_rl.sync.buckets import Bucket, TensorSpec, plan_buckets
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.group import SyncGroup, find_free_port, init_sync_group
from gmai_rl.sync.weights import OpenBucket, receive_weights, send_weights

RAW_FLAT = "raw flat"
RAW_PER_TENSOR = "raw per-tensor"
RECEIVER_COPY = "receiver copy"
COLLECTIVE_FLAT = "gloo collective flat"
COLLECTIVE_PER_TENSOR = "gloo collective per-tensor"


def make_specs(n_params: int, tensor_numel: int, dtype: str) -> list[TensorSpec]:
    """`n_params` elements as square-ish 2-D tensors of about `tensor_numel` elements each."""
    side = max(1, int(tensor_numel**0.5))
    count, rest = divmod(n_params, side * side)
    specs = [TensorSpec(f"layer{i}.weight", (side, side), dtype) for i in range(count)]
    if rest:
        specs.append(TensorSpec("tail.bias", (rest,), dtype))
    return specs


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _raw_flat(group: SyncGroup, flat: torch.Tensor) -> Callable[[], None]:
    return lambda: group.broadcast(flat, src=0)


def _collective(group: SyncGroup, tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
    # gloo's broadcast collective on the group's own backend object (the group itself sends
    # point to point): what a push cost before.
    from torch.distributed import BroadcastOptions  # type: ignore[attr-defined]

    opts = BroadcastOptions()
    opts.rootRank = 0

    def push() -> None:
        for tensor in tensors:
            group._pg.broadcast([tensor], opts).wait()

    return push


def _raw_per_tensor(group: SyncGroup, params: dict[str, torch.Tensor]) -> Callable[[], None]:
    def push() -> None:
        for tensor in params.values():
            group.broadcast(tensor, src=0)

    return push


def _receiver_copy(params: dict[str, torch.Tensor]) -> Callable[[], None]:
    # A second set of tensors stands for the received ones; the copy is what a loader adds.
    incoming = {name: torch.randn_like(t) for name, t in params.items()}

    def copy() -> None:
        for name, tensor in incoming.items():
            params[name].copy_(tensor)

    return copy


def _ours(
    group: SyncGroup, plan: list[Bucket], params: dict[str, torch.Tensor], keep: bool
) -> Callable[[], None]:
    # keep: buffers kept across pushes, as the trainer's learner and HF rollout workers do.
    buffers = FlatBuffers() if keep else None

    def push() -> None:
        if group.rank == 0:
            send_weights(group, plan, _open_from(params), buffers=buffers)
        else:
            for name, tensor in receive_weights(group, plan, buffers=buffers):
                params[name].copy_(tensor)

    return push


def _member(
    rank: int,
    world: int,
    port: int,
    args: argparse.Namespace,
    specs: list[TensorSpec],
    out: Any,
) -> None:
    torch.set_num_threads(args.threads)
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
    device = _device(args.backend, rank)
    params = {
        s.name: torch.randn(s.shape, device=device).to(getattr(torch, s.dtype)) for s in specs
    }
    flat = torch.cat([t.reshape(-1) for t in params.values()])
    group = init_sync_group(
        "127.0.0.1", port, rank, world, args.backend, timeout_s=600, device=device
    )
    runs: list[tuple[str, Callable[[], None]]] = [
        (RAW_FLAT, _raw_flat(group, flat)),
        (RAW_PER_TENSOR, _raw_per_tensor(group, params)),
    ]
    if args.backend == "gloo":
        runs.append((COLLECTIVE_FLAT, _collective(group, [flat])))
        runs.append((COLLECTIVE_PER_TENSOR, _collective(group, list(params.values()))))
    if rank == 1:
        runs.append((RECEIVER_COPY, _receiver_copy(params)))
    for mb in args.bucket_mb:
        plan = plan_buckets(specs, int(mb * 2**20))
        runs.append((f"ours, {mb:g} MB buckets", _ours(group, plan, params, keep=True)))
        if args.fresh_buffers:
            label = f"ours, {mb:g} MB buckets, fresh buffers"
            runs.append((label, _ours(group, plan, params, keep=False)))
    timings: dict[str, list[float]] = {}
    for label, action in runs:
        for _ in range(args.repeats):
            if label != RECEIVER_COPY:
                group.barrier()
            start = time.perf_counter()
            action()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.setdefault(label, []).append(time.perf_counter() - start)
    group.barrier()
    group.destroy()
    out.put((rank, timings))


def _open_from(params: dict[str, torch.Tensor]) -> OpenBucket:
    @contextlib.contextmanager
    def open_bucket(bucket: Bucket) -> Iterator[Sequence[torch.Tensor]]:
        yield [params[name] for name in bucket.names]

    return open_bucket


def push_seconds(timings: dict[int, dict[str, list[float]]], label: str) -> float:
    """Median over the repeats of the slowest member's time: a push is done when all are."""
    members = [t[label] for t in timings.values() if label in t]
    return statistics.median(max(values) for values in zip(*members, strict=True))


def table(
    timings: dict[int, dict[str, list[float]]], total_bytes: int, plans: dict[str, int]
) -> str:
    """The markdown table: each row's seconds, GB/s and its ratio to raw per-tensor + copy."""
    limit = push_seconds(timings, RAW_PER_TENSOR) + push_seconds(timings, RECEIVER_COPY)
    lines = [
        "| transfer | collectives | s per push | GB/s | vs raw per-tensor + copy |",
        "|---|---|---|---|---|",
    ]
    for label in timings[0] | timings.get(1, {}):
        seconds = push_seconds(timings, label)
        count = plans.get(label, "-")
        ratio = f"{seconds / limit:.2f}x" if label.startswith("ours") else "-"
        lines.append(
            f"| {label} | {count} | {seconds:.3f} | {total_bytes / seconds / 1e9:.2f} | {ratio} |"
        )
    lines.append(f"| raw per-tensor + receiver copy | - | {limit:.3f} | - | 1.00x |")
    return "\n".join(lines)


def run_members(
    specs: list[TensorSpec], args: argparse.Namespace
) -> dict[int, dict[str, list[float]]]:
    """Every member's timings ({rank: {row: seconds per repeat}}): one sender and
    `args.receivers` receivers, each a spawned process holding `specs`."""
    world = 1 + args.receivers
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_member, args=(r, world, port, args, specs, out)) for r in range(world)
    ]
    try:
        for proc in procs:
            proc.start()
        return dict(out.get(timeout=3600) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--tensor-numel", type=float, default=3e5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[0.5, 64.0, 512.0])
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per member")
    parser.add_argument(
        "--fresh-buffers",
        action="store_true",
        help="also time each bucket size with a new buffer per bucket and push (no FlatBuffers)",
    )
    args = parser.parse_args()

    specs = make_specs(int(args.params), int(args.tensor_numel), args.dtype)
    timings = run_members(specs, args)
    total_bytes = sum(s.nbytes for s in specs)
    plans: dict[str, int] = {RAW_FLAT: 1, RAW_PER_TENSOR: len(specs)}
    plans |= {COLLECTIVE_FLAT: 1, COLLECTIVE_PER_TENSOR: len(specs)}
    for mb in args.bucket_mb:
        count = len(plan_buckets(specs, int(mb * 2**20)))
        plans[f"ours, {mb:g} MB buckets"] = plans[f"ours, {mb:g} MB buckets, fresh buffers"] = count
    print(
        f"{args.backend}: {sum(s.numel for s in specs) / 1e6:.1f}M {args.dtype} params "
        f"({total_bytes / 1e9:.2f} GB) in {len(specs)} tensors, 1 sender -> {args.receivers} "
        f"receiver(s), {args.threads} torch thread(s) each, median of {args.repeats} pushes"
    )
    print(table(timings, total_bytes, plans))


if __name__ == "__main__":
    main()
