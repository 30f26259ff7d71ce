"""Time one weight push between local processes: `python benchmarks/sync_bench.py`.

A one-off measurement, not a test. One sender and `--receivers` receivers on this machine form a
sync group; the sender holds `--params` parameters in tensors of `--tensor-numel` elements, and
each bucket size in `--bucket-mb` is timed over `--repeats` pushes. Receivers copy every tensor
into their own preallocated parameters, as an engine's loader would, so the time covers
flatten -> broadcast -> unflatten -> copy. NCCL needs one GPU per member (a 1-GPU machine cannot
run it with a receiver).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gmai_rl.sync.buckets import Bucket, TensorSpec, plan_buckets
from gmai_rl.sync.group import find_free_port, init_sync_group
from gmai_rl.sync.weights import OpenBucket, receive_weights, send_weights


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


def _member(
    rank: int,
    world: int,
    port: int,
    backend: str,
    plans: list[list[Bucket]],
    repeats: int,
    out: Any,
) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = _device(backend, rank)
    specs = [s for bucket in plans[0] for s in bucket.specs]
    params = {
        s.name: torch.randn(s.shape, device=device).to(getattr(torch, s.dtype)) for s in specs
    }
    group = init_sync_group("127.0.0.1", port, rank, world, backend, timeout_s=600, device=device)
    timings = []
    for plan in plans:
        for _ in range(repeats):
            group.barrier()
            start = time.perf_counter()
            if rank == 0:
                send_weights(group, plan, _open_from(params))
            else:
                for name, tensor in receive_weights(group, plan):
                    params[name].copy_(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - start)
    group.barrier()
    group.destroy()
    out.put((rank, timings))


def _open_from(params: dict[str, torch.Tensor]) -> OpenBucket:
    @contextlib.contextmanager
    def open_bucket(bucket: Bucket) -> Iterator[Sequence[torch.Tensor]]:
        yield [params[name] for name in bucket.names]

    return open_bucket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--tensor-numel", type=float, default=4e6)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[256.0])
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    specs = make_specs(int(args.params), int(args.tensor_numel), args.dtype)
    plans = [plan_buckets(specs, int(mb * 1024**2)) for mb in args.bucket_mb]
    world = 1 + args.receivers
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_member, args=(r, world, port, args.backend, plans, args.repeats, out))
        for r in range(world)
    ]
    try:
        for proc in procs:
            proc.start()
        results = dict(out.get(timeout=1800) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    total_bytes = sum(s.nbytes for s in specs)
    print(
        f"{args.backend}: {sum(s.numel for s in specs) / 1e6:.1f}M {args.dtype} params "
        f"({total_bytes / 1e9:.2f} GB) in {len(specs)} tensors, 1 sender -> {args.receivers} "
        f"receiver(s), {args.repeats} pushes per bucket size"
    )
    for index, (mb, plan) in enumerate(zip(args.bucket_mb, plans, strict=True)):
        window = slice(index * args.repeats, (index + 1) * args.repeats)
        sender = results[0][window]
        slowest = [max(results[r][window][i] for r in range(world)) for i in range(args.repeats)]
        print(
            f"  bucket {mb:g} MB ({len(plan)} buckets): sender {min(sender):.3f} s best / "
            f"{sum(sender) / len(sender):.3f} s mean; all members done {min(slowest):.3f} s best "
            f"-> {total_bytes / min(slowest) / 1e9:.2f} GB/s"
        )


if __name__ == "__main__":
    main()
