"""Rejection sampling, as GMAI-VL-R1 builds reasoning data: sample k traces per question with a
policy, keep those in the valid format that reach the right answer, write them as SFT records.

The output is GMAI-Reasoning10K `reasoning_mcq_sft` JSONL (absolute image paths), so
`load_mcq_jsonl` and the trainer's SFT stage read it back directly. Iterating sample -> SFT -> RL
-> sample is the paper's iterative training.

    gmai-rl synth --model CKPT --data train.jsonl --out synth.jsonl --k 8
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmai_rl.data.prompts import build_prompt, format_question
from gmai_rl.reward.mcq import mcq_reward
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams

log = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[Prompt], int, SamplingParams], list[Group]]


@dataclass
class SynthStats:
    questions: int = 0
    sampled: int = 0
    kept: int = 0
    questions_with_a_trace: int = 0
    rejected: dict[str, int] = field(
        default_factory=lambda: {"format": 0, "wrong_answer": 0, "duplicate": 0}
    )


def select_traces(
    group: Group, item: MCQItem, keep_per_question: int, stats: SynthStats
) -> list[str]:
    """The distinct completions of `group` that are well formed and answer `item` correctly."""
    kept: list[str] = []
    for completion in group.completions:
        text = completion.text.strip()
        reward = mcq_reward(text, item.answer, item.options)
        if reward.format < 1.0:
            stats.rejected["format"] += 1
        elif reward.accuracy < 1.0:
            stats.rejected["wrong_answer"] += 1
        elif text in kept:
            stats.rejected["duplicate"] += 1
        elif len(kept) < keep_per_question:
            kept.append(text)
    return kept


def sft_record(item: MCQItem, trace: str, index: int) -> dict[str, Any]:
    """A `reasoning_mcq_sft` record: <image> placeholders + question + options, then the trace."""
    human = "<image>\n" * len(item.images) + format_question(item)
    record: dict[str, Any] = {"id": f"{item.id}-synth{index}"}
    if item.images:
        record["image"] = item.images[0] if len(item.images) == 1 else list(item.images)
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": trace}]
    return record


def rejection_sample(
    generate: GenerateFn,
    items: Sequence[MCQItem],
    k: int,
    sampling: SamplingParams,
    system_prompt: str | None,
    keep_per_question: int = 1,
    batch_size: int = 32,
) -> tuple[list[dict[str, Any]], SynthStats]:
    stats = SynthStats(questions=len(items))
    records: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        groups = generate([build_prompt(item, system_prompt) for item in batch], k, sampling)
        for group, item in zip(groups, batch, strict=True):
            stats.sampled += len(group.completions)
            traces = select_traces(group, item, keep_per_question, stats)
            stats.kept += len(traces)
            stats.questions_with_a_trace += bool(traces)
            records += [sft_record(item, trace, i) for i, trace in enumerate(traces)]
    return records, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="policy checkpoint (HF folder or hub name)")
    parser.add_argument("--data", required=True, help="questions JSONL (any supported format)")
    parser.add_argument("--out", required=True, help="SFT JSONL to write")
    parser.add_argument("--k", type=int, default=8, help="samples per question")
    parser.add_argument("--keep-per-question", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--system-prompt", default=None, help="default: the project's prompt")
    parser.add_argument("--no-system-prompt", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from gmai_rl.data import DEFAULT_SYSTEM_PROMPT, load_mcq_jsonl
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.rollout.hf import HFEngine

    items = load_mcq_jsonl(args.data)[: args.max_items]
    engine = HFEngine(ModelOptions(args.model))
    system = None if args.no_system_prompt else (args.system_prompt or DEFAULT_SYSTEM_PROMPT)
    sampling = SamplingParams(args.temperature, args.top_p, args.max_new_tokens, seed=args.seed)
    records, stats = rejection_sample(
        engine.generate, items, args.k, sampling, system, args.keep_per_question, args.batch_size
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(
        f"kept {stats.kept} traces for {stats.questions_with_a_trace}/{stats.questions} questions "
        f"from {stats.sampled} samples (rejected: {stats.rejected}) -> {out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmai-rl synth", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
