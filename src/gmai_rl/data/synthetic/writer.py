"""Write synthetic splits as GMAI-Reasoning10K JSONL files plus PNG images.

Layout under `out_dir` (image paths in the records are relative to it, like the real dataset's):
```
train.jsonl  eval.jsonl   reasoning_mcq_rl records: the gpt turn is the answer letter
sft.jsonl                 reasoning_mcq_sft records over the train images: <think>..</think><answer>
manifest.json             the arguments and the per-task counts
images/2d/cls/<modality>/<id>.png
```
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from gmai_rl.data.synthetic.generate import (
    GENERIC_REASONING,
    LETTERS,
    SyntheticItem,
    balanced_labels,
    generate_items,
    task_stream,
)
from gmai_rl.data.synthetic.tasks import TASKS

SftAnswers = Literal["true", "random", "describe", "name", "check"]
Record = dict[str, Any]
"""One JSONL line: {"id", "image", "conversations"}."""

DEFAULT_TASKS = ("lesion_side", "lesion_quadrant", "modality", "lesion_size", "lesion_presence")


def split_evenly(n: int, parts: int) -> list[int]:
    """n as `parts` counts that differ by at most one, the larger ones first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def interleave(per_task: Sequence[Sequence[SyntheticItem]]) -> list[SyntheticItem]:
    """Round-robin over the tasks, so any prefix of a file mixes them."""
    longest = max((len(items) for items in per_task), default=0)
    return [items[i] for i in range(longest) for items in per_task if i < len(items)]


def image_relpath(item: SyntheticItem) -> str:
    return f"images/2d/cls/{item.modality}/{item.id}.png"


def rl_record(item: SyntheticItem) -> Record:
    return {
        "id": item.id,
        "image": image_relpath(item),
        "conversations": [
            {"from": "human", "value": item.prompt},
            {"from": "gpt", "value": item.answer},
        ],
    }


def sft_record(item: SyntheticItem, reasoning: str, letter: str) -> Record:
    return {
        "id": item.id,
        "image": image_relpath(item),
        "conversations": [
            {"from": "human", "value": item.prompt},
            {"from": "gpt", "value": f"<think>{reasoning}</think>\n<answer>{letter}</answer>"},
        ],
    }


def check_options(item: SyntheticItem, chosen: str) -> str:
    """The options checked one by one in the task's fixed class order, text then its letter, up to
    and including the `chosen` letter's: "X-ray is C: no. CT is A: yes."

    Why this shape: with shuffled options the letter of an answer moves from question to question.
    Each step here looks up the letter of a text the model already knows by its place in the fixed
    order (a lookup the tiny model learns in a few hundred SFT steps), and the answer is the letter
    of the last step, a fixed distance back. What is left to RL is local: at each step, does this
    text match the finding? A trace that names the option only at the end ("This is CT, option
    A.") needs a lookup by the named text, which the tiny model did not learn (RESULTS.md).
    """
    letter_of = {text: letter for letter, text in item.options.items()}
    order = TASKS[item.task].classes
    last = order.index(item.options[chosen])
    return " ".join(
        f"{text} is {letter_of[text]}: {'yes' if i == last else 'no'}."
        for i, text in enumerate(order[: last + 1])
    )


def sft_records(items: Sequence[SyntheticItem], seed: int, answers: SftAnswers) -> list[Record]:
    """Cold-start records, in one of five flavours:

    "true":     the finding, the option it matches, and the gold letter (a real cold start).
    "random":   a generic sentence and a letter drawn independently of the truth, balanced over the
                options per task: SFT teaches the answer format and nothing else.
    "describe": the finding (what the image shows, naming no letter) and a random letter, drawn as
                for "random": SFT teaches the format and to describe the image, but not which option
                a description means, so accuracy starts at chance and RL must learn the answer.
    "name":     the finding, then the text of a random option and its letter ("This is CT, option
                B."), answered with that letter: SFT teaches to name an option and to answer the
                letter the prompt gives that text, but not which option the image is, so accuracy
                starts at chance. With shuffled options RL then only has to learn which option
                text an image is, a fixed mapping, while the lookup of its letter (which moves
                with every question) is already in place.
    "check":    the finding, then the options checked in the task's fixed class order, text and
                letter, "no" for each until a random one gets "yes" (`check_options`), answered
                with that letter: SFT teaches the format and the lookup of each text's letter, but
                not which text the image is, so accuracy starts at chance; RL learns where to say
                "yes". The cold start for shuffled options.
    """
    if answers == "true":
        return [sft_record(item, item.truthful_reasoning, item.answer) for item in items]
    if answers not in ("random", "describe", "name", "check"):
        raise ValueError(
            f"sft_answers must be 'true', 'random', 'describe', 'name' or 'check', not {answers!r}"
        )
    records: dict[str, Record] = {}
    for task in dict.fromkeys(item.task for item in items):
        task_items = [item for item in items if item.task == task]
        rng = np.random.default_rng(task_stream(seed, "sft", task))
        letters = balanced_labels(rng, len(task_items), len(TASKS[task].classes))
        for item, letter in zip(task_items, letters, strict=True):
            generic = GENERIC_REASONING[int(rng.integers(len(GENERIC_REASONING)))]
            reasoning = {
                "random": generic,
                "describe": item.finding,
                "name": f"{item.finding} This is {item.options[LETTERS[letter]]}, option "
                f"{LETTERS[letter]}.",
                "check": f"{item.finding} {check_options(item, LETTERS[letter])}",
            }[answers]
            records[item.id] = sft_record(item, reasoning, LETTERS[letter])
    return [records[item.id] for item in items]


def write_jsonl(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_images(
    out_dir: Path,
    items: Sequence[SyntheticItem],
    on_image: Callable[[int, int], None] | None = None,
) -> None:
    for folder in {(out_dir / image_relpath(item)).parent for item in items}:
        folder.mkdir(parents=True, exist_ok=True)
    for done, item in enumerate(items, start=1):
        # compress_level 1: ~3x faster than the default for a few percent larger files.
        Image.fromarray(item.pixels, "RGB").save(
            out_dir / image_relpath(item), format="PNG", compress_level=1
        )
        if on_image is not None:
            on_image(done, len(items))


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    image_size: int = 56,
    shuffle_options: bool = False,
    sft_answers: SftAnswers = "true",
    n_sft: int | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> dict[str, Path]:
    """Generate and write train/eval/SFT splits; return the written paths by name.

    `n_train` and `n_eval` are totals, split evenly over `tasks`. Each task's eval count is rounded
    down to a multiple of its option count, so in eval every letter is the gold answer equally often
    (a constant-letter policy scores exactly 1/k per task); manifest.json records the actual counts.
    `n_sft` (default: all) takes the first train items, mixed over tasks, for sft.jsonl.
    `on_image(done, total)` is called after each image written (writing them takes most of the time).
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def generate_split(split: str, counts: Sequence[int]) -> list[SyntheticItem]:
        per_task = [
            generate_items(
                task,
                count,
                seed,
                split=split,
                image_size=image_size,
                shuffle_options=shuffle_options,
            )
            for task, count in zip(tasks, counts, strict=True)
        ]
        return interleave(per_task)

    train_counts = split_evenly(n_train, len(tasks))
    eval_counts = [
        count - count % len(TASKS[task].classes)
        for task, count in zip(tasks, split_evenly(n_eval, len(tasks)), strict=True)
    ]
    train = generate_split("train", train_counts)
    held_out = generate_split("eval", eval_counts)
    sft_items = train if n_sft is None else train[:n_sft]

    paths = {
        "train": out / "train.jsonl",
        "eval": out / "eval.jsonl",
        "sft": out / "sft.jsonl",
        "images": out / "images",
        "manifest": out / "manifest.json",
    }
    write_images(out, [*train, *held_out], on_image)
    write_jsonl(paths["train"], [rl_record(item) for item in train])
    write_jsonl(paths["eval"], [rl_record(item) for item in held_out])
    write_jsonl(paths["sft"], sft_records(sft_items, seed, sft_answers))
    manifest = {
        "generator": "gmai_rl.data.synthetic",
        "seed": seed,
        "tasks": list(tasks),
        "image_size": image_size,
        "shuffle_options": shuffle_options,
        "sft_answers": sft_answers,
        "counts": {
            "train": dict(zip(tasks, train_counts, strict=True)),
            "eval": dict(zip(tasks, eval_counts, strict=True)),
            "sft": len(sft_items),
        },
    }
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return paths
