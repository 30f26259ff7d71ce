"""Does a cold start teach the letter lookup that shuffled options need? `python benchmarks/option_lookup.py`.

A measurement, not a test. With shuffled options the letter of an option text moves from question
to question, so a policy can only answer by finding, in the prompt, the letter of the text it
means. This script runs the cold start alone, in one process (plain AdamW, the trainer's SFT rate
and batch), on the synthetic modality task with shuffled options, and every `--eval-every` steps
measures on held-out SFT records (teacher-forced, argmax):

- lookup: every option letter the trace writes (" B" in "CT is B: no." or "This is CT, option B.")
  is the letter the prompt gives that text;
- decisive lookup: the same for the trace's last letter, the one the answer repeats;
- answer copy: the `<answer>` letter equals the trace's last letter.

Rows are printed as they come, one table per flavour (`--flavours name check`); `--hidden` and
`--layers` size the tiny model (the demo's: 64 and 2).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from gmai_rl.data import load_mcq_jsonl
from gmai_rl.data.synthetic import write_synthetic_dataset
from gmai_rl.feed import sft_samples
from gmai_rl.models.inputs import build_policy_batch
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.scoring import completion_scores
from gmai_rl.models.tiny import make_tiny_model
from gmai_rl.types import TrainSample


def letter_positions(completion: list[int], letter_ids: set[int]) -> list[int]:
    """Indices of the option letters the trace writes (" A".." D": the answer's "A" is another id)."""
    return [i for i, token in enumerate(completion) if token in letter_ids]


@torch.no_grad()
def measure(
    model: Any,
    processor: Any,
    held_out: list[TrainSample],
    letter_ids: set[int],
    answer_ids: set[int],
) -> dict[str, float]:
    model.eval()
    hits = {"lookup": 0, "decisive lookup": 0, "answer copy": 0}
    letters = 0
    for start in range(0, len(held_out), 32):
        micro = held_out[start : start + 32]
        batch = build_policy_batch(processor, micro, tokenizer_of(processor).pad_token_id)
        logits = model(**batch.model_inputs).logits
        for row, sample in enumerate(micro):
            ids = list(sample.completion_ids)
            guess = logits[row, batch.logit_index[row, : len(ids)]].argmax(-1).tolist()
            written = letter_positions(ids, letter_ids)
            answer = [i for i, token in enumerate(ids) if token in answer_ids][-1]
            letters += len(written)
            hits["lookup"] += sum(guess[i] == ids[i] for i in written)
            hits["decisive lookup"] += guess[written[-1]] == ids[written[-1]]
            hits["answer copy"] += guess[answer] == ids[answer]
    model.train()
    n = len(held_out)
    return {
        "lookup": hits["lookup"] / letters,
        "decisive lookup": hits["decisive lookup"] / n,
        "answer copy": hits["answer copy"] / n,
    }


def run(flavour: str, args: argparse.Namespace, work: Path) -> None:
    data = work / flavour
    paths = write_synthetic_dataset(
        data,
        n_train=args.records,
        n_eval=0,
        seed=args.seed,
        tasks=["modality"],
        shuffle_options=True,
        sft_answers=flavour,
    )
    model_dir = make_tiny_model(
        work / f"model-{flavour}", hidden_size=args.hidden, num_layers=args.layers, seed=args.seed
    )
    options = ModelOptions(path=str(model_dir))
    processor, model = load_processor(options), load_model(options)
    tokenizer = tokenizer_of(processor)
    samples = sft_samples(load_mcq_jsonl(paths["sft"], data), tokenizer, None)
    train, held_out = samples[: -args.held_out], samples[-args.held_out :]
    letter_ids = {tokenizer.convert_tokens_to_ids(f"Ġ{letter}") for letter in "ABCD"}
    answer_ids = {tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"}

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    print(f"\n{flavour}: {len(train)} SFT records, {len(held_out)} held out")
    print("| SFT steps | lookup | decisive lookup | answer copy |")
    print("|---|---|---|---|")
    for step in range(1, args.steps + 1):
        batch = build_policy_batch(processor, rng.sample(train, args.batch), tokenizer.pad_token_id)
        logprobs, _ = completion_scores(model, batch)
        loss = -(logprobs * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            got = measure(model, processor, held_out, letter_ids, answer_ids)
            row = " | ".join(f"{value:.1%}" for value in got.values())
            print(f"| {step} | {row} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavours", nargs="+", default=["name", "check"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3, help="the demo's SFT rate")
    parser.add_argument("--batch", type=int, default=32, help="the demo's SFT batch")
    parser.add_argument("--records", type=int, default=2000, help="SFT records written")
    parser.add_argument("--held-out", type=int, default=200, help="records kept out of training")
    parser.add_argument("--hidden", type=int, default=64, help="the demo's model: 64")
    parser.add_argument("--layers", type=int, default=2, help="the demo's model: 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in args.flavours:
            run(flavour, args, Path(tmp))


if __name__ == "__main__":
    main()
