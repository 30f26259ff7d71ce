"""Push time and bytes of LoRA adapters against the full weights: `python benchmarks/lora_push.py`.

A measurement, not a test. For each model, the two plans a run pushes, built from the model's
real parameter names and shapes (on the meta device: no weights): every parameter (a full-weight
run's push), and the adapters `model.lora` adds (a LoRA run's only push). Each is pushed by
`send_weights` / `receive_weights` from one sender to `--receivers` receivers, local processes
in a gloo sync group, as `benchmarks/sync_bench.py` pushes its synthetic model (its "ours" row,
buffers kept as the trainer keeps them, the receiver's copy into its parameters included).

Models: the demo's tiny Qwen2.5-VL (`--tiny PATH`, default: the artifacts cache's seed 0) and a
Qwen2.5-0.5B-shaped text model (hidden 896, 24 layers, vocab 151,936: ~0.49B parameters), the
largest whose push three processes hold in this machine's memory.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from sync_bench import push_seconds, run_members

from gmai_rl.models.loading import is_vision_language_config
from gmai_rl.models.lora import LoraOptions, with_lora
from gmai_rl.sync.buckets import TensorSpec, plan_buckets
from gmai_rl.sync.weights import param_specs


def qwen2_5_half_b() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def plans(config: Any, lora: LoraOptions, wire: str) -> dict[str, list[TensorSpec]]:
    """{"full weights": every parameter, "adapters": the LoRA ones} as pushed, in `wire`."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vl = is_vision_language_config(config)
    auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
        full = param_specs(model.named_parameters(), wire)
        wrapped = with_lora(model, lora, vl)
        adapters = param_specs(
            ((n, p) for n, p in wrapped.named_parameters() if p.requires_grad), wire
        )
    return {"full weights": full, "adapters": adapters}


def push(specs: list[TensorSpec], args: argparse.Namespace) -> float:
    """Median seconds of one push of `specs` (the slowest member's), over `args.repeats`."""
    return push_seconds(run_members(specs, args), f"ours, {args.bucket_mb[0]:g} MB buckets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tiny = os.path.join(
        os.environ.get("GMAI_RL_CACHE", os.path.expanduser("~/.cache/gmai-rl")),
        "tiny-qwen2.5-vl-seed0",
    )
    parser.add_argument("--tiny", default=default_tiny, help="the demo's tiny model folder")
    parser.add_argument("--rank", type=int, default=32, help="model.lora.rank (default's)")
    parser.add_argument("--wire", default="bfloat16", help="sync.wire_dtype")
    parser.add_argument("--bucket", type=float, default=256.0, help="sync.bucket_mb")
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # What sync_bench's member reads: one bucket size, gloo, kept buffers only.
    args.bucket_mb, args.backend, args.fresh_buffers = [args.bucket], "gloo", False
    from transformers import AutoConfig

    lora = LoraOptions(enabled=True, rank=args.rank, alpha=2 * args.rank)
    models = {
        "demo's tiny Qwen2.5-VL": AutoConfig.from_pretrained(args.tiny),
        "Qwen2.5-0.5B-shaped text model": qwen2_5_half_b(),
    }
    print(
        f"gloo, 1 sender -> {args.receivers} receivers, {args.wire} on the wire, "
        f"{args.bucket:g} MB buckets, LoRA rank {args.rank}, median of {args.repeats} pushes"
    )
    print("| model | push | parameters | tensors | buckets | bytes | s per push |")
    print("|---|---|---|---|---|---|---|")
    for model, config in models.items():
        for what, specs in plans(config, lora, args.wire).items():
            seconds = push(specs, args)
            size = sum(s.nbytes for s in specs)
            buckets = len(plan_buckets(specs, int(args.bucket * 2**20)))
            numel = sum(s.numel for s in specs)
            print(
                f"| {model} | {what} | {numel / 1e6:.2f}M | {len(specs)} | {buckets} | "
                f"{size / 2**20:.1f} MiB | {seconds:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
