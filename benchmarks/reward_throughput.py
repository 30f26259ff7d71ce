"""Reward throughput: our MCQ rule against a `math_verify`-based MCQ reward of MM-EUREKA's kind, on
the same completions, and the reward stage's share of an RL step.

    .venv-bench/bin/python benchmarks/reward_throughput.py      # both (make bench-env)
    .venv/bin/python benchmarks/reward_throughput.py            # ours only, then exits 1

A measurement, not a test. Completions are built here, seeded: `--prompts` x `--n` (64 x 8 = 512 by
default), each a `<think>` block of ~`--think-chars` characters of clinical reasoning (4,200
characters, ~1k tokens of English BPE), then an answer. A fixed mix: 40% right (the bare letter,
"The answer is (B)", "\\boxed{B}", "B. <option text>"), 30% wrong, 30% malformed (a hedge "B or C",
no answer because the budget ran out inside the think block, two answer blocks, text between the
blocks). The MCQ items are the synthetic tasks' questions and options (2-4 options each).

Ours is `RewardWorker.score`, the function the reward actor runs in training (`mcq_reward` with
format weight 0.5), called in process: the Ray round trip of the reward stage is not in it.

The baseline follows MM-EUREKA's reward for Qwen-Instruct (examples/scripts/
reward_func_qwen_instruct.py in ModalMinds/MM-EUREKA): the first "<answer>...</answer>" span,
tags included (else everything after the last "<answer>"), is `math_verify.parse`d with the string,
LaTeX and expression extractors and `verify`d against the gold letter parsed as "$B$"; when that
fails, the "contains the letter and no other option letter" fallback; plus 0.5 for a format regex of
look-aheads (each tag exactly once, `<think>.+?</think>\\s*<answer>.+?</answer>`). Left out, so the
baseline is if anything faster than the original: its log file (a write per completion) and the
query parsing that finds the response in prompt+response.

The reward's share of a step: our seconds for 512 completions against (a) a lower bound on a 7B
step's time, derived below (`seven_b_step_lower_bound`), and (b) the demo's step on these 2 cores
(`--demo-step-s`, ~1.9 s for 16 prompts x 8), for which the numerator is our time for 128
completions at the demo's length (a ~60-character think block). The recipe's own batch
(conf/experiment/gmai_vl_r1_7b.yaml: 128 prompts x 8) is `--prompts 128`.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gmai_rl.data.synthetic.tasks import STUDY_NAMES, TASKS
from gmai_rl.reward.worker import RewardWorker
from gmai_rl.types import MCQItem

SENTENCES = (
    "The image shows a {study} with adequate penetration and no motion artefact.",
    "I first check the overall anatomy and the symmetry of both sides.",
    "There is a rounded area of altered signal that deserves a closer look.",
    "Its margins are fairly well defined, which argues against an infiltrative process.",
    "The surrounding tissue looks preserved, without obvious oedema or mass effect.",
    "I compare the texture of the background with what each modality usually produces.",
    "Speckle and acoustic shadowing would point to ultrasound, but I do not see them clearly.",
    "The grey levels are smooth and the cortex is sharp, as cross-sectional imaging gives.",
    "Bony structures would appear bright on X-ray and CT and dark on most MRI sequences.",
    "Let me reconsider the size: the finding spans roughly a quarter of the field of view.",
    "That would correspond to more than three centimetres at the usual scale of such a study.",
    "On the other hand, small nodules under one centimetre can look larger when magnified.",
    "I now go through the options one by one and rule out those that contradict the findings.",
    "Option {wrong} does not fit, because the finding is not where that option places it.",
    "Option {gold} matches the location, the texture and the size of what I described.",
    "Wait, I should double-check the laterality, since images are displayed in mirror view.",
    "Radiological convention shows the patient's left on the right side of the image.",
    "After checking again, the position I described earlier still holds.",
    "No second lesion is visible, so a single focal finding is the most consistent reading.",
    "Taken together, the evidence points to one option more than to the others.",
)


OURS = "ours (gmai_rl RewardWorker.score)"
BASELINE = "math_verify, MM-EUREKA's kind"


@dataclass(frozen=True)
class Case:
    text: str
    item: MCQItem
    kind: str


def make_items(count: int, seed: int) -> list[MCQItem]:
    """`count` MCQ items from the synthetic tasks' questions and options (no images needed)."""
    rng = random.Random(seed)
    tasks = list(TASKS.values())
    items = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        options = dict(zip("ABCD", task.classes, strict=False))
        question = rng.choice(task.questions).format(study=rng.choice(list(STUDY_NAMES.values())))
        items.append(MCQItem(f"q{i}", question, options, rng.choice(list(options))))
    return items


def think_text(rng: random.Random, item: MCQItem, chars: int) -> str:
    wrong = next(letter for letter in item.options if letter != item.answer)
    study = rng.choice(list(STUDY_NAMES.values()))
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        sentence = rng.choice(SENTENCES)
        parts.append(sentence.format(study=study, gold=item.answer, wrong=wrong))
    return " ".join(parts)


def completion(rng: random.Random, item: MCQItem, think_chars: int) -> tuple[str, str]:
    """(completion text, kind) in the fixed mix: 40% right, 30% wrong, 30% malformed."""
    gold = item.answer
    wrong = rng.choice([letter for letter in item.options if letter != gold])
    think = think_text(rng, item, think_chars)
    roll = rng.random()
    if roll < 0.4:
        answer = rng.choice(
            [gold, f"The answer is ({gold})", f"\\boxed{{{gold}}}", f"{gold}. {item.options[gold]}"]
        )
        return f"<think>{think}</think>\n<answer>{answer}</answer>", "right"
    if roll < 0.7:
        return f"<think>{think}</think>\n<answer>{wrong}</answer>", "wrong"
    malformed = rng.choice(["hedge", "truncated", "two_blocks", "text_between"])
    if malformed == "hedge":
        text = f"<think>{think}</think>\n<answer>{gold} or {wrong}</answer>"
    elif malformed == "truncated":
        text = f"<think>{think}"
    elif malformed == "two_blocks":
        text = f"<think>{think}</think>\n<answer>{wrong}</answer><answer>{gold}</answer>"
    else:
        text = f"<think>{think}</think>\nSo my final choice is below.\n<answer>{gold}</answer>"
    return text, malformed


def make_cases(prompts: int, n: int, think_chars: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    items = make_items(prompts, seed)
    cases = []
    for item in items:
        for _ in range(n):
            text, kind = completion(rng, item, think_chars)
            cases.append(Case(text, item, kind))
    return cases


def ours() -> Callable[[Sequence[Case]], list[float]]:
    worker = RewardWorker(format_weight=0.5)

    def score(cases: Sequence[Case]) -> list[float]:
        return [r["total"] for r in worker.score([(c.text, c.item) for c in cases])]

    return score


def eureka_kind() -> Callable[[Sequence[Case]], list[float]]:
    """The baseline (module docstring): math_verify on the answer span, a letter fallback, a
    look-ahead format regex. Raises ImportError without math_verify."""
    import logging

    from math_verify import (
        ExprExtractionConfig,
        LatexExtractionConfig,
        StringExtractionConfig,
        parse,
        verify,
    )

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    extractors = [StringExtractionConfig(), LatexExtractionConfig(), ExprExtractionConfig()]
    answer_span = re.compile(r"<answer>.*?</answer>")
    answer_text = re.compile(r"<answer>(.*?)</answer>")
    each_tag_once = "".join(
        rf"(?=(?:.*{tag}){{1}})(?!.*{tag}.*{tag})"
        for tag in ("<think>", "<\\/think>", "<answer>", "<\\/answer>")
    )
    well_formed = re.compile(
        rf"^{each_tag_once}.*<think>(.+?)</think>\s*<answer>.+?</answer>.*$", re.DOTALL
    )

    def accuracy(text: str, item: MCQItem) -> float:
        letters = [letter.lower() for letter in item.options]
        span = answer_span.search(text)
        content = span.group(0) if span else text.split("<answer>")[-1]
        gold = parse(f"${item.answer}$")
        if not gold:
            return 1.0  # MM-EUREKA skips an unparseable gold label by paying every completion
        try:
            if verify(gold, parse(content, extraction_config=extractors)):
                return 1.0
        except Exception:
            pass
        inner = answer_text.search(text)
        student = (inner.group(1) if inner else content).replace("<answer>", "").strip().lower()
        for parsed in gold:
            letter = str(parsed).lower()
            others = [c for c in letters if c != letter]
            if letter in letters and letter in student and not any(c in student for c in others):
                return 1.0
        return 0.0

    def score(cases: Sequence[Case]) -> list[float]:
        return [
            accuracy(c.text, c.item) + (0.5 if well_formed.search(c.text) else 0.0) for c in cases
        ]

    return score


def time_passes(
    scores: dict[str, Callable[[Sequence[Case]], list[float]]], cases: list[Case], repeats: int
) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (seconds of each timed pass over `cases`, the totals of one pass). The rewards take
    turns pass by pass, so that load from other work on the machine hits them alike."""
    out: dict[str, tuple[list[float], list[float]]] = {
        name: ([], score(cases))
        for name, score in scores.items()  # a warm-up pass each
    }
    for _ in range(repeats):
        for name, score in scores.items():
            start = time.perf_counter()
            score(cases)
            out[name][0].append(time.perf_counter() - start)
    return out


# A lower bound on one RL step of the 7B recipe (conf/experiment/gmai_vl_r1_7b.yaml) on one
# 8-GPU H100 node, for 512 completions of 1,024 tokens: every assumption favours a SHORT step, so
# the reward's share computed against it is an upper bound. Not measured: an estimate.
PARAMS = 7.0e9  # Qwen2.5-VL-7B's language model is ~7.6e9; the vision tower is frozen
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak, SXM
H100_HBM_BYTES_PER_S = 3.35e12
GPUS = 8
MFU = 0.5  # well above what RL training reaches in practice (~0.2-0.4)


def seven_b_step_lower_bound(completions: int, tokens: int) -> tuple[float, list[str]]:
    """(seconds, the arithmetic as lines). Generation: each of `tokens` sequential decode steps
    reads every bf16 weight from HBM at least once on each engine (no engine is faster than its
    memory); prompts' prefill and the KV cache are ignored. Training: 6 x params x completion
    tokens (forward + backward) on all 8 GPUs at MFU 0.5; the learner's old-log-prob pass,
    gradient checkpointing's recompute, attention, prompt tokens and the weight push are
    ignored. Generation and training run one after the other in the synchronous loop."""
    weight_bytes = 2 * PARAMS
    decode_step = weight_bytes / H100_HBM_BYTES_PER_S
    generate = tokens * decode_step
    train_tokens = completions * tokens
    train_flops = 6 * PARAMS * train_tokens
    train = train_flops / (GPUS * H100_BF16_FLOPS * MFU)
    lines = [
        f"generate >= {tokens} decode steps x (2 B x {PARAMS:.1e} params / "
        f"{H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s = {decode_step * 1e3:.2f} ms) = {generate:.2f} s",
        f"train >= 6 x {PARAMS:.1e} x ({completions} x {tokens} = {train_tokens:,} tokens) "
        f"= {train_flops:.2e} FLOP / ({GPUS} x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s x MFU {MFU}) "
        f"= {train:.2f} s",
        f"step >= {generate:.2f} + {train:.2f} = {generate + train:.2f} s",
    ]
    return generate + train, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--think-chars", type=int, default=4200, help="~1k tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per reward")
    parser.add_argument("--tokens", type=int, default=1024, help="7B estimate: tokens/completion")
    parser.add_argument("--demo-step-s", type=float, default=1.9, help="the demo's RL step, s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = make_cases(args.prompts, args.n, args.think_chars, args.seed)
    demo_cases = make_cases(16, 8, 60, args.seed)
    count = len(cases)
    chars = statistics.mean(len(c.text) for c in cases)
    kinds = {k: sum(c.kind == k for c in cases) for k in dict.fromkeys(c.kind for c in cases)}
    print(f"{count} completions ({args.prompts} prompts x {args.n}), mean {chars:.0f} characters;")
    print("mix: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) + "\n")

    scores = {OURS: ours()}
    try:
        scores[BASELINE] = eureka_kind()
        missing = None
    except ImportError as err:
        missing = err
    rows = time_passes(scores, cases, args.repeats)
    demo_s = statistics.median(time_passes({OURS: ours()}, demo_cases, args.repeats)[OURS][0])

    print(
        f"| reward | us / completion | completions/s | s per {count}: median (min) | mean reward |"
    )
    print("|---|---|---|---|---|")
    median = {name: statistics.median(passes) for name, (passes, _) in rows.items()}
    for name, (passes, totals) in rows.items():
        print(
            f"| {name} | {1e6 * median[name] / count:.1f} | {count / median[name]:,.0f} | "
            f"{median[name]:.4f} ({min(passes):.4f}) | {statistics.mean(totals):.3f} |"
        )
    ours_s = median[OURS]
    if BASELINE in median:
        print(
            f"\nthe math_verify baseline takes {median[BASELINE] / ours_s:.0f}x ours per completion"
        )
        # Where the two disagree (totals: accuracy + 0.5 format), by kind of completion.
        differ: dict[str, int] = {}
        for case, x, y in zip(cases, rows[OURS][1], rows[BASELINE][1], strict=True):
            if x != y:
                key = f"{case.kind} (ours {x:g}, baseline {y:g})"
                differ[key] = differ.get(key, 0) + 1
        print("rewards differ: " + ("; ".join(f"{k}: {v}" for k, v in differ.items()) or "never"))

    step_s, arithmetic = seven_b_step_lower_bound(count, args.tokens)
    print(f"\n7B step, lower bound (an estimate, not a measurement; {count} x {args.tokens}):")
    print("\n".join(f"  {line}" for line in arithmetic))
    print("\n| step | step s | our reward s | reward share |")
    print("|---|---|---|---|")
    print(
        f"| 7B recipe, {count} completions x {args.tokens} tokens, 8 H100 (lower bound, "
        f"estimated) | >= {step_s:.2f} | {ours_s:.4f} | <= {100 * ours_s / step_s:.3f}% |"
    )
    print(
        f"| demo, 16 x 8 on 2 CPU cores (--demo-step-s) | {args.demo_step_s:.2f} | "
        f"{demo_s:.4f} | {100 * demo_s / args.demo_step_s:.3f}% |"
    )
    if missing is not None:
        print(
            f"\nmath_verify is not installed here ({missing}): no baseline. It is in the benchmark "
            "environment: make bench-env, then .venv-bench/bin/python "
            "benchmarks/reward_throughput.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
