"""Generation throughput of the vLLM and HF rollout engines on one tiny text model, in one run,
and the time of a weight update through the sync group into each.

    .venv-vllm/bin/python benchmarks/rollout_throughput.py [--hidden 128 --layers 2 ...]

(`make test-vllm` builds .venv-vllm; the HF engine runs there too.) Both engines generate the same
prompts with the same sampling settings in the same process, alternating rounds so that machine
load hits both alike; tokens/s counts the tokens actually generated (completions may stop early).
Both use `--threads` intra-op threads (the trainer's rollout.torch_threads, 1 by default).

Weight updates: a learner process (rank 0, `push_weights`) pushes perturbed weights over a gloo
sync group; the time is the receiver's wall time from the call to its return: the broadcast of
every bucket, the load into the model and, for vLLM, the prefix-cache reset.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (4 heads)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine")
    parser.add_argument("--updates", type=int, default=5, help="timed weight updates per engine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args()


def prompts(k: int) -> list[Any]:
    from gmai_rl.data import build_prompt
    from gmai_rl.types import MCQItem

    items = [
        MCQItem(
            id=f"q{i}",
            question=f"Which number is the largest? ({i})",
            options={"A": str(10 + i), "B": str(40 + i), "C": str(20 + i), "D": str(30 + i)},
            answer="B",
        )
        for i in range(k)
    ]
    return [build_prompt(item) for item in items]


def tokens_per_s(engine: Any, batch: list[Any], n: int, sampling: Any) -> float:
    start = time.perf_counter()
    groups = engine.generate(batch, n, sampling)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for g in groups for c in g.completions) / seconds


def _learner(model_path: str, ports: list[int], updates: int, dtype: str) -> None:
    """Rank 0 of one sync group per port, in turn: `updates` perturbed pushes into each."""
    import torch
    from transformers import AutoModelForCausalLM

    from gmai_rl.sync import init_sync_group, param_specs, plan_buckets, push_weights

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    plan = plan_buckets(param_specs(model.named_parameters()), 256 * 2**20)
    previous = None
    for port in ports:
        group = init_sync_group(HOST, port, 0, 2, "gloo", timeout_s=300)
        if previous is not None:
            # The receiver joined this group, so it has taken every bucket of the last one.
            previous.destroy()
        for _ in range(updates):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            push_weights(model, plan, group, zero_stage=0)
        previous = group
    assert previous is not None
    previous.barrier()  # the last receiver (the HF engine's group) is in this process's peer
    previous.destroy()


def time_updates(receive: Any, updates: int) -> list[float]:
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        receive()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: vLLM honours it too
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs to stdout
    import torch

    torch.set_num_threads(args.threads)
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.models.tiny import make_tiny_text_model
    from gmai_rl.rollout.hf import HFEngine
    from gmai_rl.rollout.options import VLLMOptions
    from gmai_rl.rollout.vllm import VLLMEngine
    from gmai_rl.sync import find_free_port, init_sync_group, param_specs, plan_buckets
    from gmai_rl.sync.weights import receive_weights
    from gmai_rl.types import SamplingParams

    workdir = Path(tempfile.mkdtemp(prefix="gmai_bench_"))
    path = make_tiny_text_model(workdir / "model", hidden_size=args.hidden, num_layers=args.layers)
    options = ModelOptions(path=str(path), dtype=args.dtype)
    batch, sampling = prompts(args.prompts), SamplingParams(1.0, 1.0, args.max_new_tokens, seed=0)

    start = time.perf_counter()
    hf = HFEngine(options)
    hf_init = time.perf_counter() - start
    start = time.perf_counter()
    vllm = VLLMEngine(options, VLLMOptions(enforce_eager=True, max_model_len=1024))
    vllm_init = time.perf_counter() - start
    params = sum(p.numel() for p in hf.model.parameters())

    for engine in (hf, vllm):  # warm-up
        engine.generate(batch[:2], 2, sampling)
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    for _ in range(args.rounds):
        rates["hf"].append(tokens_per_s(hf, batch, args.n, sampling))
        rates["vllm"].append(tokens_per_s(vllm, batch, args.n, sampling))

    plan = plan_buckets(param_specs(hf.model.named_parameters()), 256 * 2**20)
    ports = [find_free_port(), find_free_port()]
    learner = mp.get_context("spawn").Process(
        target=_learner, args=(str(path), ports, args.updates + 1, args.dtype), daemon=True
    )
    learner.start()
    vllm.join_sync_group(HOST, ports[0], 1, 2, "gloo", 300)
    vllm_updates = time_updates(lambda: vllm.receive_weights(plan), args.updates + 1)[1:]
    group = init_sync_group(HOST, ports[1], 1, 2, "gloo", timeout_s=300)
    hf_updates = time_updates(
        lambda: hf.load_weights(receive_weights(group, plan)), args.updates + 1
    )[1:]
    group.barrier()
    group.destroy()
    learner.join(timeout=60)

    result = {
        "model": f"Qwen2ForCausalLM hidden {args.hidden}, {args.layers} layers, {params} params",
        "dtype": args.dtype,
        "threads": args.threads,
        "workload": f"{args.prompts} prompts x n={args.n} x <= {args.max_new_tokens} tokens, T=1",
        "init_s": {"hf": round(hf_init, 2), "vllm": round(vllm_init, 2)},
        "tokens_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
        "tokens_per_s_median": {k: round(statistics.median(v)) for k, v in rates.items()},
        "update_ms_median": {
            "hf": round(1000 * statistics.median(hf_updates), 1),
            "vllm": round(1000 * statistics.median(vllm_updates), 1),
        },
        "update_ms": {
            "hf": [round(1000 * t, 1) for t in hf_updates],
            "vllm": [round(1000 * t, 1) for t in vllm_updates],
        },
        "weight_mb": round(sum(b.nbytes for b in plan) / 2**20, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
