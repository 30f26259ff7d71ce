"""The synthetic tasks as small declarative specs: question templates, option texts, and a drawing.

Every `draw_*` function gets the index of the correct option (the class) and the item's modality, and
returns the image and a one-sentence finding that names the decisive visual cue (the truthful SFT
reasoning). The question text never depends on the class: only the pixels do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gmai_rl.data.synthetic.drawing import BACKGROUNDS, MODALITIES, Gray, Rng, draw_lesion

Drawing = Callable[[Rng, int, str, int], tuple[Gray, str]]
"""(rng, class index, modality, image size) -> (gray image, finding sentence)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classes: tuple[str, ...]
    """Option texts in their fixed (unshuffled) order; class i is option letter i by default."""
    questions: tuple[str, ...]
    """Paraphrases, picked at random per item; `{study}` becomes e.g. "axial CT slice"."""
    draw: Drawing
    modality_is_answer: bool = False
    """True for the modality task (the class picks the texture); else the modality is random."""


STUDY_NAMES = {
    "x_ray": "chest X-ray",
    "ct": "axial CT slice",
    "mri": "brain MRI slice",
    "ultrasound": "ultrasound image",
}

LESION_NAMES = {
    "x_ray": "nodular opacity",
    "ct": "hyperdense lesion",
    "mri": "hyperintense lesion",
    "ultrasound": "hyperechoic lesion",
}


def uniform(rng: Rng, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


# Lesion positions keep the whole lesion inside the half or quadrant that the answer names, so on a
# 56x56 image exactly one or two of the four visual tokens (one per 28x28 quadrant) see it.


def draw_lesion_side(rng: Rng, label: int, modality: str, size: int) -> tuple[Gray, str]:
    side = ("left", "right")[label]
    cx = uniform(rng, 0.14, 0.36) if side == "left" else uniform(rng, 0.64, 0.86)
    image = draw_lesion(BACKGROUNDS[modality](rng, size), uniform(rng, 0.2, 0.8), cx, 0.09)
    return image, f"A bright round {LESION_NAMES[modality]} lies in the {side} half of the image."


QUADRANTS = ("upper left", "upper right", "lower left", "lower right")


def draw_lesion_quadrant(rng: Rng, label: int, modality: str, size: int) -> tuple[Gray, str]:
    cy = uniform(rng, 0.2, 0.3) + 0.5 * (label // 2)
    cx = uniform(rng, 0.2, 0.3) + 0.5 * (label % 2)
    image = draw_lesion(BACKGROUNDS[modality](rng, size), cy, cx, 0.1)
    finding = f"A bright round {LESION_NAMES[modality]} sits in the {QUADRANTS[label]} quadrant."
    return image, finding


MODALITY_OPTIONS = {"x_ray": "X-ray", "ct": "CT", "mri": "MRI", "ultrasound": "Ultrasound"}

MODALITY_LOOKS = {
    "x_ray": "a frontal chest projection filling the frame: dark lung fields beside a bright spine",
    "ct": "a wide, flat oval body section with a bright rim on a black background",
    "mri": "a tall oval head section with soft gray-matter contrast and dark ventricles",
    "ultrasound": "a fan-shaped sector opening downwards, filled with granular speckle",
}


def draw_modality(rng: Rng, label: int, modality: str, size: int) -> tuple[Gray, str]:
    return BACKGROUNDS[modality](rng, size), f"The image shows {MODALITY_LOOKS[modality]}."


def draw_lesion_size(rng: Rng, label: int, modality: str, size: int) -> tuple[Gray, str]:
    # Radii 2.5-3.4 px versus 8-10 px at 56 px; the same centre range for both, so position says
    # nothing about size.
    radius = uniform(rng, 0.045, 0.06) if label == 0 else uniform(rng, 0.14, 0.18)
    cy, cx = uniform(rng, 0.22, 0.78), uniform(rng, 0.22, 0.78)
    image = draw_lesion(BACKGROUNDS[modality](rng, size), cy, cx, radius)
    extent = ("a small", "a large")[label]
    diameter = ("about a tenth", "about a third")[label]
    finding = f"There is {extent} {LESION_NAMES[modality]}, {diameter} of the image width across."
    return image, finding


def draw_lesion_presence(rng: Rng, label: int, modality: str, size: int) -> tuple[Gray, str]:
    image = BACKGROUNDS[modality](rng, size)
    if label == 0:
        return image, "No bright focal spot stands out from the background anatomy."
    image = draw_lesion(
        image, uniform(rng, 0.2, 0.8), uniform(rng, 0.2, 0.8), uniform(rng, 0.07, 0.1)
    )
    return image, f"A bright round {LESION_NAMES[modality]} stands out from the background."


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="lesion_side",
            classes=("Left side of the image", "Right side of the image"),
            questions=(
                "In this {study}, on which side of the image is the lesion?",
                "Which side of this {study} contains the focal lesion?",
                "Where is the abnormality in this {study}, relative to the image midline?",
            ),
            draw=draw_lesion_side,
        ),
        TaskSpec(
            name="lesion_quadrant",
            classes=tuple(f"{name.capitalize()} quadrant" for name in QUADRANTS),
            questions=(
                "In this {study}, which quadrant of the image contains the lesion?",
                "Where is the focal lesion located in this {study}?",
                "Which image quadrant shows the abnormality in this {study}?",
            ),
            draw=draw_lesion_quadrant,
        ),
        TaskSpec(
            name="modality",
            classes=tuple(MODALITY_OPTIONS[modality] for modality in MODALITIES),
            questions=(
                "What imaging modality was used to acquire this image?",
                "Which imaging technique produced this image?",
                "Identify the imaging modality of this scan.",
            ),
            draw=draw_modality,
            modality_is_answer=True,
        ),
        TaskSpec(
            name="lesion_size",
            classes=("Small nodule (under 1 cm)", "Large mass (over 3 cm)"),
            questions=(
                "How large is the focal lesion in this {study}?",
                "What best describes the size of the lesion in this {study}?",
                "In this {study}, is the lesion a small nodule or a large mass?",
            ),
            draw=draw_lesion_size,
        ),
        TaskSpec(
            name="lesion_presence",
            classes=("No focal lesion", "Focal lesion present"),
            questions=(
                "Is there a focal lesion in this {study}?",
                "Does this {study} show a focal abnormality?",
                "Is any focal lesion visible in this {study}?",
            ),
            draw=draw_lesion_presence,
        ),
    )
}
