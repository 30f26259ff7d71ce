"""Modality labels: right when the record tells, None when it does not."""

from __future__ import annotations

import pytest

from gmai_rl.data.modality import infer_modality, normalize_modality


@pytest.mark.parametrize(
    ("path", "modality"),
    [
        ("images/2d/cls/mri/brain_042.png", "mri"),
        ("2d/cls/ultrasound/thyroid_007.png", "ultrasound"),
        ("2d/cls/x_ray/chest_1.png", "x_ray"),
        ("data/chest-xray/p1.png", "x_ray"),
        ("CXR/p1.png", "x_ray"),
        ("retina/OCT/scan.jpeg", "oct"),
        ("eye/fundus/img.jpg", "fundus"),
        ("isic/dermoscopy/lesion.jpg", "dermoscopy"),
        ("kvasir/endoscopy/polyp.jpg", "endoscopy"),
        ("tcga/pathology/patch.png", "pathology"),
        ("scans/brain_mri_001.png", "mri"),
        ("2d/cls/pet-ct/slice.png", "pet"),
    ],
)
def test_modality_from_path(path: str, modality: str) -> None:
    assert infer_modality(image_paths=[path]) == modality


def test_deepest_path_component_wins() -> None:
    assert infer_modality(image_paths=["ct_archive/2d/cls/mri/x.png"]) == "mri"


def test_unknown_path_falls_back_to_the_question() -> None:
    assert infer_modality(None, ["img/001.png"], "What does this chest X-ray show?") == "x_ray"


@pytest.mark.parametrize(
    "question",
    [
        "What is shown in this image?",
        "Is this finding better seen on MRI or CT?",
        "What pathology is shown?",
        "Is this a common finding?",
    ],
)
def test_unknown_or_ambiguous_gives_none(question: str) -> None:
    assert infer_modality(None, ["img/001.png"], question) is None


def test_generic_pathology_word_does_not_override_a_named_modality() -> None:
    assert infer_modality(question="What pathology is shown in this CT?") == "ct"


def test_explicit_value_wins_and_is_normalised() -> None:
    assert infer_modality("X-Ray", ["2d/cls/mri/x.png"], "brain MRI") == "x_ray"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("MR", "mri"),
        ("Magnetic Resonance Imaging", "mri"),
        ("US", "ultrasound"),
        ("CT scan", "ct"),
        ("Infrared Reflectance", "infrared_reflectance"),
    ],
)
def test_normalize_modality(value: str, expected: str) -> None:
    assert normalize_modality(value) == expected
