"""Pixel primitives and modality-like backgrounds, as pure functions of a numpy RNG.

Images are float32 gray-level arrays in [0, 1], shape (size, size); coordinates are fractions of the
image side (0 = top/left, 1 = bottom/right), so every drawing scales with the image size. Nothing here
knows about questions or answers: the task specs in `tasks.py` decide what to draw.

The backgrounds differ in their coarse layout (what each 28x28 quadrant of a 56x56 image holds on
average), not only in fine texture: a tiny vision tower merges each quadrant into one token, and fine
texture mostly averages away there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

Gray = np.ndarray
"""float32 (size, size) image in [0, 1]."""
Rng = np.random.Generator

MODALITIES = ("x_ray", "ct", "mri", "ultrasound")
"""Modality names, as the real dataset spells them in its `2d/cls/<modality>/` folders."""

LESION_GRAY = 0.97
"""Lesions are the brightest thing in every image, so "where is the bright spot" is always the cue."""


@lru_cache(maxsize=8)
def coordinate_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of pixel centres as fractions of the side, each (size, size)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def soft_ellipse(
    size: int, cy: float, cx: float, ry: float, rx: float, edge: float = 0.15
) -> np.ndarray:
    """Coverage in [0, 1] of an axis-aligned ellipse whose border fades over `edge` of its radius.

    A soft border instead of a hard mask avoids aliasing, which at 56 px would make small shapes look
    different depending on where they fall on the pixel grid.
    """
    rows, cols = coordinate_grid(size)
    radius = np.sqrt(((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2)
    return np.clip((1.0 + edge - radius) / (2 * edge), 0.0, 1.0)


def soft_disk(size: int, cy: float, cx: float, r: float, edge: float = 0.15) -> np.ndarray:
    return soft_ellipse(size, cy, cx, r, r, edge)


def gaussian_blob(size: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    rows, cols = coordinate_grid(size)
    return np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2))


def paint(image: Gray, coverage: np.ndarray, gray: float | np.ndarray) -> Gray:
    """Blend `gray` over `image` where `coverage` (in [0, 1]) says."""
    return image * (1.0 - coverage) + gray * coverage


def noise(rng: Rng, size: int, std: float) -> Gray:
    return std * rng.standard_normal((size, size), dtype=np.float32)


def jitter(rng: Rng, value: float, spread: float) -> float:
    return value + float(rng.uniform(-spread, spread))


# --- modality-like backgrounds -------------------------------------------------------------------
# Each is a caricature chosen for a distinct quadrant layout at 4 visual tokens:
#   x_ray       full frame, no black background; two dark lungs beside a bright vertical spine
#   ct          black band above and below a wide, flat oval body with a bright rim
#   mri         black band left and right of a tall oval head; soft gray blobs, dark ventricles
#   ultrasound  black upper corners outside a fan opening downwards; coarse bright speckle


def chest_xray(rng: Rng, size: int) -> Gray:
    rows, _ = coordinate_grid(size)
    image = 0.50 + 0.20 * rows  # brighter towards the diaphragm and abdomen
    for side in (0.28, 0.72):
        lung = soft_ellipse(
            size, jitter(rng, 0.46, 0.03), jitter(rng, side, 0.02), 0.33, 0.17, edge=0.3
        )
        image = paint(image, lung, 0.16)
    spine = soft_ellipse(size, 0.5, jitter(rng, 0.5, 0.01), 0.9, 0.05, edge=0.4)
    image = paint(image, spine, 0.78)
    return image + noise(rng, size, 0.015)


def abdominal_ct(rng: Rng, size: int) -> Gray:
    cy, cx = jitter(rng, 0.5, 0.02), jitter(rng, 0.5, 0.02)
    ry, rx = jitter(rng, 0.34, 0.02), jitter(rng, 0.46, 0.02)
    image: Gray = np.full((size, size), 0.03, dtype=np.float32)
    image = paint(image, soft_ellipse(size, cy, cx, ry, rx, edge=0.05), 0.62)  # skin and fat rim
    image = paint(image, soft_ellipse(size, cy, cx, ry - 0.05, rx - 0.05, edge=0.08), 0.40)
    for _ in range(3):  # organs: slightly different soft-tissue densities
        organ = gaussian_blob(size, jitter(rng, cy, 0.15), jitter(rng, cx, 0.25), 0.08)
        image = image + float(rng.uniform(-0.08, 0.08)) * organ * (image > 0.2)
    return image + noise(rng, size, 0.03)


def brain_mri(rng: Rng, size: int) -> Gray:
    cy, cx = jitter(rng, 0.5, 0.02), jitter(rng, 0.5, 0.02)
    ry, rx = jitter(rng, 0.44, 0.02), jitter(rng, 0.33, 0.02)
    head = soft_ellipse(size, cy, cx, ry, rx, edge=0.08)
    image = paint(np.full((size, size), 0.02, dtype=np.float32), head, 0.55)
    for _ in range(4):  # gray/white matter: smooth, low-frequency variation
        blob = gaussian_blob(size, jitter(rng, cy, 0.25), jitter(rng, cx, 0.18), 0.1)
        image = image + float(rng.uniform(-0.12, 0.12)) * blob * head
    for side in (-1.0, 1.0):  # lateral ventricles
        ventricle = soft_ellipse(size, cy, cx + side * 0.06, 0.1, 0.035, edge=0.4)
        image = paint(image, ventricle, 0.18)
    return image + noise(rng, size, 0.02)


def ultrasound_fan(rng: Rng, size: int) -> Gray:
    rows, cols = coordinate_grid(size)
    apex_x = jitter(rng, 0.5, 0.02)
    depth = np.sqrt((rows + 0.02) ** 2 + (cols - apex_x) ** 2)
    angle = np.arctan2(cols - apex_x, rows + 0.02)
    half_angle = jitter(rng, 0.75, 0.04)  # radians: a ~85 degree sector
    fan = np.clip((half_angle - np.abs(angle)) * 12, 0, 1) * np.clip((0.96 - depth) * 12, 0, 1)
    # Speckle: multiplicative, Rayleigh-distributed like real envelope-detected echoes.
    speckle = 0.8 * np.sqrt(2.0 * rng.standard_exponential((size, size), dtype=np.float32))
    tissue = (0.40 - 0.15 * depth) * speckle  # attenuation: echoes fade with depth
    return paint(np.zeros((size, size), dtype=np.float32), fan, tissue)


BACKGROUNDS: dict[str, Callable[[Rng, int], Gray]] = {
    "x_ray": chest_xray,
    "ct": abdominal_ct,
    "mri": brain_mri,
    "ultrasound": ultrasound_fan,
}


def draw_lesion(image: Gray, cy: float, cx: float, r: float) -> Gray:
    """A bright round lesion (nodule, mass, hyperintense focus) centred at (cy, cx), radius r."""
    return paint(image, soft_disk(image.shape[0], cy, cx, r, edge=0.2), LESION_GRAY)


def to_rgb_uint8(image: Gray) -> np.ndarray:
    """(size, size, 3) uint8 gray RGB, as PNG files and image processors expect."""
    gray = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
