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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gmai_rl.benchmarks.items import BenchItem
from gmai_rl.benchmarks.prompts import PromptStyle, bench_prompt
from gmai_rl.benchmarks.results import summarize as summarize_benchmarks
from gmai_rl.benchmarks.scoring import JudgeFn, score
from gmai_rl.data.admission import LoadReport, add_on_error_argument
from gmai_rl.data.trained_prompt import add_system_prompt_arguments, system_prompt_for
from gmai_rl.reward.mcq import answer_block, extract_choice, mcq_reward
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams

if TYPE_CHECKING:
    from gmai_rl.cluster.protocol import TrainingCluster
    from gmai_rl.config import TrainConfig

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


Generate = Callable[[Sequence[Prompt]], list[Group]]
"""One completion per prompt, in order (a rollout engine's batches, or the cluster's workers)."""


def evaluate_benchmarks(
    generate: Generate,
    items: Sequence[BenchItem],
    style: PromptStyle,
    system_prompt: str | None,
    judge: JudgeFn | None = None,
) -> dict[str, Any]:
    """{benchmark: summary} of one answer per question (`benchmarks.results.summarize`), each
    with its truncation rate and the questions whose images could not be read ("dropped",
    named in a warning and left out of n). `system_prompt`: the run's (None: none), for
    multiple choice in the trained style."""
    groups = generate([bench_prompt(item, style, system_prompt) for item in items])
    scored, truncated, dropped = [], Counter[str](), Counter[str]()
    for item, group in zip(items, groups, strict=True):
        if group.dropped is not None:
            dropped[item.benchmark] += 1
            log.warning(
                "%s %s (%s) left out: %s", item.benchmark, item.id, item.source, group.dropped
            )
            continue
        completion = group.completions[0]
        truncated[item.benchmark] += completion.finish_reason == "length"
        scored.append((item, score(item, completion.text, judge)))
    summary = summarize_benchmarks(scored)
    for name, bench in summary.items():
        bench["truncated_rate"] = truncated[name] / bench["n"]
        bench["dropped"] = dropped[name]
        bench["prompt_style"] = str(style)
        bench["system_prompt"] = system_prompt
    return summary


def generate_on_workers(
    cluster: TrainingCluster,
    prompts: Sequence[Prompt],
    sampling: SamplingParams,
    cfg: TrainConfig,
    label: str,
) -> list[Group]:
    """One completion per prompt on the cluster's rollout workers, in chunks that give every
    worker one full batch (rollout.max_batch_prompts), so the progress bar moves without
    costing batch size."""
    from gmai_rl.progress import Progress

    chunk = cfg.cluster.rollout_workers * cfg.rollout.max_batch_prompts
    groups: list[Group] = []
    with Progress.of(cfg.dashboards, label, len(prompts), unit="question", leave=False) as bar:
        for start in range(0, len(prompts), chunk):
            groups += cluster.generate(prompts[start : start + chunk], 1, sampling)
            bar.advance_to(len(groups))
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmai-rl eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gmai_rl.benchmarks.loaders import BENCHMARKS

    parser.add_argument("--model", required=True, help="HF checkpoint folder or hub name")
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        help="JSONL of questions (any supported format); with --benchmark, the benchmark's "
        "file or folder (once per --benchmark, in the same order)",
    )
    parser.add_argument(
        "--benchmark",
        action="append",
        choices=sorted(BENCHMARKS),
        help="evaluate a medical benchmark in its published format (docs/evaluation.md); "
        "repeat with --data for several",
    )
    parser.add_argument(
        "--prompt-style",
        choices=[s.value for s in PromptStyle],
        default=PromptStyle.TRAINED.value,
        help="trained: the <think>/<answer> format the policy learnt (default); harness: "
        "VLMEvalKit's MCQ prompt and LLaVA's short-answer prompt",
    )
    parser.add_argument("--judge", default=None, help="package.module:function for open questions")
    parser.add_argument("--cache-dir", default=None, help="where decoded benchmark images go")
    add_on_error_argument(parser)
    parser.add_argument(
        "--backend", choices=["hf", "vllm"], default="hf", help="rollout engine (in process)"
    )
    parser.add_argument("--device", default="cpu", help="the in-process HF engine's device")
    parser.add_argument("--max-items", type=int, default=None, help="per file or benchmark")
    add_system_prompt_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default=None, help="write the summary JSON here")


def run(args: argparse.Namespace, ray: TrainConfig | None = None) -> int:
    """`gmai-rl eval`; `ray`: generate on the rollout workers of a generation cluster of this
    training config (`gmai-rl eval --ray OVERRIDES`) instead of in this process."""
    from gmai_rl.data import build_prompt
    from gmai_rl.models.loading import ModelOptions
    from gmai_rl.rollout.engines import engine_spec
    from gmai_rl.rollout.worker import generate_or_drop
    from gmai_rl.types import SamplingParams

    system, whose = system_prompt_for(args.model, args.system_prompt, args.no_system_prompt)
    log.info("system prompt: %s", whose)
    items: list[MCQItem] = []
    if args.benchmark:
        benchmarks, reports = load_benchmark_args(args)
    else:
        benchmarks, (items, report) = None, load_questions(args)
    sampling = SamplingParams(args.temperature, 1.0, args.max_new_tokens, seed=0)

    def answer(generate: Generate) -> dict[str, Any]:
        if benchmarks is None:
            summary = summarize(generate([build_prompt(i, system) for i in items]), items)
            summary["system_prompt"] = system
            summary["skipped"] = skipped_by_reason([report])
            return summary
        from gmai_rl.benchmarks.scoring import load_judge

        summary = evaluate_benchmarks(
            generate, benchmarks, PromptStyle(args.prompt_style), system, load_judge(args.judge)
        )
        for name, bench in summary.items():
            bench["skipped"] = skipped_by_reason([r for n, r in reports if n == name])
            log.info("%s", benchmark_line(name, bench))
        return summary

    if ray is not None:
        from gmai_rl.cluster.cluster import generation_cluster

        with generation_cluster(ray) as cluster:
            summary = answer(
                lambda prompts: generate_on_workers(cluster, prompts, sampling, ray, "eval")
            )
    else:
        engine = engine_spec(args.backend).make(ModelOptions(args.model), args.device, 0)

        def generate(prompts: Sequence[Prompt]) -> list[Group]:
            groups: list[Group] = []
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                groups += generate_or_drop(engine, batch, 1, sampling)
            return groups

        summary = answer(generate)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def load_benchmark_args(
    args: argparse.Namespace,
) -> tuple[list[BenchItem], list[tuple[str, LoadReport]]]:
    """The items of each --benchmark NAME --data PATH pair, in order, and each load's report."""
    from gmai_rl.benchmarks.loaders import load_benchmarks

    if len(args.benchmark) != len(args.data):
        raise SystemExit(
            f"gmai-rl eval: {len(args.benchmark)} --benchmark but {len(args.data)} --data: give "
            "one --data (the benchmark's file or folder) after each --benchmark"
        )
    pairs = zip(args.benchmark, args.data, strict=True)
    items, reports = load_benchmarks(
        [(name, path, args.max_items) for name, path in pairs],
        cache_dir=args.cache_dir,
        on_error=args.on_error,
    )
    empty = [report.source for _, report in reports if not report.loaded]
    if empty:
        raise SystemExit(f"gmai-rl eval: no question loaded from {'; '.join(empty)} (see above)")
    return items, reports


def load_questions(args: argparse.Namespace) -> tuple[list[MCQItem], LoadReport]:
    """The questions of the one --data JSONL (no --benchmark), and the load's report."""
    from gmai_rl.data import load_mcq_jsonl_with_report

    if len(args.data) != 1:
        raise SystemExit(
            f"gmai-rl eval: {len(args.data)} --data without --benchmark: give one questions "
            "JSONL, or name each file's benchmark with --benchmark"
        )
    items, report = load_mcq_jsonl_with_report(args.data[0], on_error=args.on_error)
    if not items:
        raise SystemExit(
            f"gmai-rl eval: no question loaded from {args.data[0]} ({report.summary()})"
        )
    return items[: args.max_items], report


def skipped_by_reason(reports: Sequence[LoadReport]) -> dict[str, int]:
    """Records the loads skipped (on_error=skip), by reason, over `reports`."""
    skipped: Counter[str] = Counter()
    for report in reports:
        skipped.update(report.skipped)
    return dict(sorted(skipped.items()))


def benchmark_line(name: str, bench: dict[str, Any]) -> str:
    """One benchmark's result in a line: accuracy with its 95% interval, n, open-question F1."""
    parts = [f"{name}: n {bench['n']}"]
    if bench["accuracy"] is not None:
        lo, hi = bench["ci95"]
        parts.append(f"accuracy {bench['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%})")
    if bench["open"] is not None:
        parts.append(f"open F1 {bench['open']['f1']:.3f} (not comparable to judge scores)")
    return ", ".join(parts)
