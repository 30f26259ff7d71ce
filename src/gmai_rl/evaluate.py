"""Held-out evaluation: one answer per question, scored by the MCQ rule.

Accuracy here is always `mcq_reward`'s (exactly one <answer> block naming the gold letter), whatever
reward the run trains with, so numbers compare across runs. The letter histogram shows a policy that
answers one letter regardless of the image (on a class-balanced split it scores exactly chance); the
truncation rate and one example completion per modality show reasoning that has degenerated into a
loop (greedy decoding then runs to max_new_tokens and never answers).

`python -m gmai_rl.evaluate --model PATH --data eval.jsonl` evaluates a checkpoint in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from gmai_rl.reward.mcq import answer_block, extract_choice, mcq_reward
from gmai_rl.types import Group, MCQItem

log = logging.getLogger(__name__)


def answered_letter(completion: str, item: MCQItem) -> str | None:
    """The letter inside the completion's single answer block, if any."""
    block = answer_block(completion)
    return extract_choice(block, item.options) if block is not None else None


def summarize(groups: Sequence[Group], items: Sequence[MCQItem]) -> dict[str, Any]:
    """Accuracy, format and truncation rates, per-modality accuracy, answer-letter counts and the
    first completion of each modality, over the first completion of each group.

    A question whose images could not be read (`Group.dropped`) is named in a warning, counted
    in "dropped" and left out of `n` and the rates; if every one was, evaluation stops.
    """
    accuracy, formats, truncated, dropped = [], [], 0, 0
    by_modality: dict[str, list[float]] = defaultdict(list)
    examples: dict[str, dict[str, str]] = {}
    letters: Counter[str] = Counter()
    for group, item in zip(groups, items, strict=True):
        if group.dropped is not None:
            dropped += 1
            log.warning("question %s (%s) left out: %s", item.id, item.source, group.dropped)
            continue
        completion = group.completions[0]
        reward = mcq_reward(completion.text, item.answer, item.options)
        accuracy.append(reward.accuracy)
        formats.append(reward.format)
        truncated += completion.finish_reason == "length"
        modality = item.modality or "unknown"
        by_modality[modality].append(reward.accuracy)
        examples.setdefault(
            modality, {"id": item.id, "answer": item.answer, "completion": completion.text}
        )
        letters[answered_letter(completion.text, item) or "none"] += 1
    n = len(accuracy)
    if not n:
        raise RuntimeError(
            f"none of the {dropped} questions could be evaluated: their images cannot be read "
            "any more (the warnings above name them)"
        )
    return {
        "accuracy": sum(accuracy) / n,
        "format_rate": sum(formats) / n,
        "truncated_rate": truncated / n,
        "n": n,
        "dropped": dropped,
        "policy_version": next(g.policy_version for g in groups if g.dropped is None),
        "accuracy_by_modality": {m: sum(v) / len(v) for m, v in sorted(by_modality.items())},
        "answer_letters": dict(sorted(letters.items())),
        "examples": dict(sorted(examples.items())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmai-rl eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint folder or hub name")
    parser.add_argument("--data", required=True, help="JSONL of questions (any supported format)")
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--system-prompt", default=None, help="default: the project's prompt")
    parser.add_argument("--no-system-prompt", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default=None, help="write the summary JSON here")


def run(args: argparse.Namespace) -> int:
    from gmai_rl.data import DEFAULT_SYSTEM_PROMPT, build_prompt, load_mcq_jsonl
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.rollout.hf import HFEngine
    from gmai_rl.rollout.worker import generate_or_drop
    from gmai_rl.types import SamplingParams

    items = load_mcq_jsonl(args.data)[: args.max_items]
    system = None if args.no_system_prompt else (args.system_prompt or DEFAULT_SYSTEM_PROMPT)
    engine = HFEngine(ModelOptions(args.model))
    sampling = SamplingParams(args.temperature, 1.0, args.max_new_tokens, seed=0)
    groups: list[Group] = []
    for start in range(0, len(items), args.batch_size):
        batch = items[start : start + args.batch_size]
        groups += generate_or_drop(engine, [build_prompt(i, system) for i in batch], 1, sampling)
    summary = summarize(groups, items)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
