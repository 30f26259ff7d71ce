"""Learner throughput against a plain HF forward+backward: `python benchmarks/learner_throughput.py`.

A measurement, not a test. One process, `--threads` torch threads, the demo's tiny Qwen2.5-VL
(`--hidden` / `--layers` make it bigger) built in a temporary folder, and a rollout batch shaped
like the demo's: `--prompts` synthetic questions with their images x `--samples` completions each,
of lengths drawn uniformly from [`--min-tokens`, `--max-tokens`] (the demo's completions run
~20-48 tokens), shuffled as a batch arrives, cut into micro-batches of `--micro-batch`. Rows, each
the median of `--repeats` passes over the batch after one warm-up pass:

- HF forward+backward: `model(**inputs).logits` on the padded micro-batch, the completion rows
  gathered, log-softmax, the sum backward: the in-process limit of what any trainer must compute;
- ours, padded: the learner's micro-step maths (`completion_scores`: backbone, chunked fused LM
  head on completion positions only; `policy_loss`; backward);
- ours, sorted: the same after sorting the batch by length, so each micro-batch pads less;
- ours, packed: `learner.pack_sequences` (`pack_policy_batch`: one row per micro-batch, no
  padding, each sample attending to itself through restarting position ids).

Real tokens/s counts prompt, image and completion tokens, never padding.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gmai_rl.algo import token_logprobs
from gmai_rl.algo.loss import policy_loss
from gmai_rl.data import load_mcq_jsonl
from gmai_rl.data.synthetic import write_synthetic_dataset
from gmai_rl.feed import sft_samples
from gmai_rl.learner.batching import chunk
from gmai_rl.models.inputs import PolicyBatch, build_policy_batch, completion_logits
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.scoring import completion_scores, packed_for
from gmai_rl.models.tiny import make_tiny_model
from gmai_rl.types import TrainSample


def rollout_batch(
    folder: Path, tokenizer: object, prompts: int, samples: int, lengths: tuple[int, int], seed: int
) -> list[TrainSample]:
    """`prompts` x `samples` learner samples over synthetic questions, shuffled."""
    write_synthetic_dataset(
        folder, n_train=prompts, n_eval=4, seed=seed, tasks=["modality"], sft_answers="describe"
    )
    rng = random.Random(seed)
    batch = []
    for sample in sft_samples(load_mcq_jsonl(folder / "sft.jsonl")[:prompts], tokenizer, None):
        for _ in range(samples):
            n = rng.randint(*lengths)
            ids = (sample.completion_ids * (n // len(sample.completion_ids) + 1))[:n]
            batch.append(TrainSample(sample.prompt, [], ids, advantage=rng.gauss(0.0, 1.0)))
    rng.shuffle(batch)
    return batch


def hf_step(model: torch.nn.Module, batch: PolicyBatch) -> None:
    logits = model(**batch.model_inputs, use_cache=False).logits
    logprobs = token_logprobs(completion_logits(logits, batch.logit_index), batch.completion_ids)
    (logprobs * batch.completion_mask).sum().backward()


def our_step(model: torch.nn.Module, batch: PolicyBatch, advantages: torch.Tensor) -> None:
    logprobs, _ = completion_scores(model, batch, with_entropy=True)
    mask = batch.completion_mask
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, num_tokens=mask.sum())
    loss.backward()


def timed_pass(
    model: torch.nn.Module, micros: Sequence[tuple[PolicyBatch, torch.Tensor]], ours: bool
) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for batch, advantages in micros:
        our_step(model, batch, advantages) if ours else hf_step(model, batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=64, help="64: the demo's model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The folder lives until the end: prompts load their images whenever a batch is built.
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, tmp: Path) -> None:
    folder = make_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    options = ModelOptions(str(folder))
    processor, model = load_processor(options), load_model(options)
    tokenizer = tokenizer_of(processor)
    samples = rollout_batch(
        tmp / "data",
        tokenizer,
        args.prompts,
        args.samples,
        (args.min_tokens, args.max_tokens),
        args.seed,
    )

    def micro_batches(
        order: Sequence[TrainSample], pack: bool = False
    ) -> list[tuple[PolicyBatch, torch.Tensor]]:
        out = []
        for micro in chunk(order, args.micro_batch):
            batch = build_policy_batch(processor, micro, tokenizer.pad_token_id)
            advantages = torch.tensor([s.advantage for s in micro])
            out.append((packed_for(model, batch) if pack else batch, advantages))
        return out

    def padding(micros: Sequence[tuple[PolicyBatch, torch.Tensor]]) -> float:
        cells = sum(b.model_inputs["input_ids"].numel() for b, _ in micros)
        return 1 - real_tokens / cells

    padded = micro_batches(samples)
    real_tokens = sum(int(b.model_inputs["attention_mask"].sum()) for b, _ in padded)
    by_length = sorted(samples, key=lambda s: len(s.completion_ids), reverse=True)
    rows: list[tuple[str, list[tuple[PolicyBatch, torch.Tensor]], bool]] = [
        ("HF forward+backward, padded", padded, False),
        ("ours, padded", padded, True),
        ("ours, sorted by length", micro_batches(by_length), True),
        ("ours, packed (pack_sequences)", micro_batches(samples, pack=True), True),
    ]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny Qwen2.5-VL hidden {args.hidden}, {args.layers} layers ({params / 1e6:.2f}M params), "
        f"{len(samples)} samples ({args.prompts} prompts x {args.samples}), micro-batch "
        f"{args.micro_batch}, completions {args.min_tokens}-{args.max_tokens} tokens, "
        f"{real_tokens} real tokens, {args.threads} thread(s), median of {args.repeats}"
    )
    print("| learner pass | padding | s per batch | real tokens/s | vs HF forward+backward |")
    print("|---|---|---|---|---|")
    timings: dict[str, float] = {}
    for label, micros, ours in rows:
        run: Callable[[], float] = lambda m=micros, o=ours: timed_pass(model, m, o)  # noqa: E731
        run()  # warm-up
        timings[label] = statistics.median(run() for _ in range(args.repeats))
    base = timings[rows[0][0]]
    for label, micros, _ in rows:
        seconds = timings[label]
        pad = padding(micros) if "packed" not in label else 0.0
        print(
            f"| {label} | {pad:.1%} | {seconds:.3f} | {real_tokens / seconds:.0f} | "
            f"{seconds / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
