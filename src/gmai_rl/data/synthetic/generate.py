"""In-memory synthetic MCQ items: balanced labels, option order, question text and pixels.

Each (seed, split, task) triple owns independent random streams, one per concern (labels, question
wording, option order, pixels). So the train and eval splits never share an image, and switching
`shuffle_options` changes only the option order: the same seed gives the same images and classes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from gmai_rl.data.synthetic.drawing import MODALITIES, to_rgb_uint8
from gmai_rl.data.synthetic.tasks import STUDY_NAMES, TASKS

LETTERS = "ABCDEFGH"

SPLIT_STREAMS = {"train": 1, "eval": 2, "sft": 3}
"""Seed-sequence keys that keep the splits' random streams apart."""

GENERIC_REASONING = (
    "I examine the image and compare the options.",
    "I look at the image carefully and weigh each option.",
    "I review the image and the answer choices before deciding.",
    "I inspect the whole image and consider every option in turn.",
)
"""Reasoning that says nothing about the image, for the format-only cold start."""


@dataclass(frozen=True, eq=False)  # eq would compare pixel arrays, which numpy refuses to reduce
class SyntheticItem:
    id: str
    task: str
    modality: str
    pixels: np.ndarray
    """(size, size, 3) uint8 RGB."""
    question: str
    options: dict[str, str]
    """Letter -> option text, in presentation order."""
    answer: str
    finding: str
    """One sentence naming the visual cue that decides the answer."""

    @property
    def prompt(self) -> str:
        """The human turn of a GMAI-Reasoning10K record: `<image>`, question, one line per option."""
        option_lines = [f"{letter}. {text}" for letter, text in self.options.items()]
        return "\n".join(["<image>", self.question, *option_lines])

    @property
    def truthful_reasoning(self) -> str:
        return f"{self.finding} This matches option {self.answer}: {self.options[self.answer]}."


def task_stream(seed: int, split: str, task: str) -> np.random.SeedSequence:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    return np.random.SeedSequence([seed, SPLIT_STREAMS[split], zlib.crc32(task.encode())])


def balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n labels in [0, k), each appearing floor(n/k) or ceil(n/k) times, in random order."""
    return rng.permutation(np.arange(n) % k)


def presentation_order(
    rng: np.random.Generator, gold_class: int, gold_position: int, k: int
) -> list[int]:
    """Class indices in the order the options are shown, with `gold_class` at `gold_position`.

    The distractors fill the other positions in random order, so the order as a whole is a uniform
    random permutation that says nothing about the class.
    """
    distractors = [c for c in range(k) if c != gold_class]
    rng.shuffle(distractors)
    distractors.insert(gold_position, gold_class)
    return distractors


def option_orders(
    rng: np.random.Generator, classes: np.ndarray, k: int, shuffle: bool
) -> list[list[int]]:
    """Per item, the class indices in the order its options are shown."""
    if not shuffle:
        return [list(range(k)) for _ in classes]
    # The gold letter is balanced on its own, independently of the class.
    gold_positions = balanced_labels(rng, len(classes), k)
    return [
        presentation_order(rng, int(gold_class), int(position), k)
        for gold_class, position in zip(classes, gold_positions, strict=True)
    ]


def generate_items(
    task: str,
    n: int,
    seed: int,
    *,
    split: str = "train",
    image_size: int = 56,
    shuffle_options: bool = False,
) -> list[SyntheticItem]:
    """n items of one task, in random class order.

    Gold classes, gold letters and (for the lesion tasks) modalities are each balanced to within one
    item, exactly when n is a multiple of the option count (of 4 for modalities).
    """
    spec = TASKS[task]
    k = len(spec.classes)
    labels_rng, wording_rng, order_rng, pixels_rng = (
        np.random.default_rng(stream) for stream in task_stream(seed, split, task).spawn(4)
    )
    classes = balanced_labels(labels_rng, n, k)
    random_modalities = balanced_labels(labels_rng, n, len(MODALITIES))
    orders = option_orders(order_rng, classes, k, shuffle_options)

    items = []
    for i, (gold_class, order) in enumerate(zip(classes.tolist(), orders, strict=True)):
        modality = MODALITIES[gold_class if spec.modality_is_answer else random_modalities[i]]
        template = spec.questions[int(wording_rng.integers(len(spec.questions)))]
        image, finding = spec.draw(pixels_rng, gold_class, modality, image_size)
        items.append(
            SyntheticItem(
                id=f"synth_{split}_{task}_{i:05d}",
                task=task,
                modality=modality,
                pixels=to_rgb_uint8(image),
                question=template.format(study=STUDY_NAMES[modality]),
                options={LETTERS[position]: spec.classes[c] for position, c in enumerate(order)},
                answer=LETTERS[order.index(gold_class)],
                finding=finding,
            )
        )
    return items
