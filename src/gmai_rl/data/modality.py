"""Infer the imaging modality of a question from what its record says.

GMAI-Reasoning10K keeps images under folders named for the task and modality
(e.g. `2d/cls/mri/brain_042.png`) and its questions usually name the modality ("in this brain
MRI"). `infer_modality` reads, in order of trust:

1. an explicit `modality` value of the record (normalised: "X-ray" -> "x_ray", "MR" -> "mri");
2. the image paths as the record wrote them (relative, so the user's own folders such as
   `/home/ct_lab/` do not count), deepest path component first: a component that names exactly one
   modality decides;
3. the question text, when it names exactly one modality.

Otherwise the modality is None: a wrong label is worse than none. Known modalities: x_ray, ct,
mri, pet, oct, ultrasound, fundus, dermoscopy, endoscopy, pathology, microscopy, mammography.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Words that name a modality in running text (questions, path components split at _ - .).
_TEXT_PATTERNS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "x_ray": r"\bx[\s-]?rays?\b|\bcxr\b|\bradiograph(?:s|y)?\b|\bchest\s?x\b",
        "ct": r"\bct\b|\bcta\b|\bcect\b|\bncct\b|\bcomputed\s+tomography\b",
        "mri": r"\bmri\b|\bmagnetic\s+resonance\b|\bmr\s+(?:image|images|imaging|scan|scans)\b"
        r"|\bflair\b|\bt[12][\s-]?weighted\b",
        "pet": r"\bpet\b|\bpositron\s+emission\b",
        "oct": r"\boct\b|\boptical\s+coherence\s+tomography\b",
        "ultrasound": r"\bultrasound\b|\bultrasonograph(?:y|ic)\b|\bsonograph(?:y|ic)?\b"
        r"|\bsonogram\b|\busg\b|\bechocardiograph(?:y|ic|s)?\b",
        "fundus": r"\bfundus\b|\bfundoscop(?:y|ic)\b|\bretinal\s+photograph",
        "dermoscopy": r"\bdermo?scop(?:y|ic)\b|\bdermatoscop(?:y|ic)\b",
        "endoscopy": r"\bendoscop(?:y|ic)\b|\bcolonoscop(?:y|ic)\b|\bgastroscop(?:y|ic)\b"
        r"|\blaparoscop(?:y|ic)\b",
        # "pathology" alone usually means "disease" in a question, so running text needs a
        # histology word; a folder named "pathology" is matched by _COMPONENT_ALIASES below.
        "pathology": r"\bhistopatholog(?:y|ical)\b|\bhistolog(?:y|ical)\b|\bh\s?&\s?e\b"
        r"|\bwhole[\s-]slide\b|\bpathology\s+(?:slide|image|section)s?\b",
        "microscopy": r"\bmicroscop(?:y|ic)\b",
        "mammography": r"\bmammogra(?:m|ms|phy|phic)\b",
    }.items()
}

# Whole path components (and explicit values) that name a modality but are too short or too
# generic to trust inside running text.
_COMPONENT_ALIASES = {
    "xray": "x_ray",
    "x_ray": "x_ray",
    "x-ray": "x_ray",
    "xr": "x_ray",
    "cxr": "x_ray",
    "ct": "ct",
    "mri": "mri",
    "mr": "mri",
    "pet": "pet",
    "oct": "oct",
    "us": "ultrasound",
    "ultrasound": "ultrasound",
    "fundus": "fundus",
    "cfp": "fundus",
    "dermoscopy": "dermoscopy",
    "derm": "dermoscopy",
    "endoscopy": "endoscopy",
    "pathology": "pathology",
    "histopathology": "pathology",
    "wsi": "pathology",
    "microscopy": "microscopy",
    "mammography": "mammography",
}

# When both are named, the first is the more specific description of the same image:
# PET/CT is reported as PET, a histology slide seen under a microscope as pathology.
_SUBSUMES = (("pet", "ct"), ("pathology", "microscopy"), ("mammography", "x_ray"))


def infer_modality(
    explicit: str | None = None, image_paths: Iterable[str] = (), question: str = ""
) -> str | None:
    """The modality named by the record's value, else its image paths, else its question text."""
    if explicit is not None and explicit.strip():
        return normalize_modality(explicit)
    for path in image_paths:
        found = modality_from_path(path)
        if found is not None:
            return found
    return _single(modalities_in_text(question))


def normalize_modality(value: str) -> str:
    """A modality label in the project's spelling; unknown labels are kept, in snake case."""
    key = value.strip().lower()
    if key in _COMPONENT_ALIASES:
        return _COMPONENT_ALIASES[key]
    named = _single(modalities_in_text(key))
    return named if named is not None else re.sub(r"[\s\-/]+", "_", key)


def modality_from_path(path: str) -> str | None:
    """The modality named by the deepest path component that names exactly one."""
    components = [part for part in re.split(r"[/\\]+", path) if part]
    for depth, component in reversed(list(enumerate(components))):
        is_file_name = depth == len(components) - 1
        stem = component.rsplit(".", 1)[0] if is_file_name else component
        alias = _COMPONENT_ALIASES.get(stem.lower())
        if alias is not None:
            return alias
        found = _single(modalities_in_text(re.sub(r"[_.]+", " ", stem)))
        if found is not None:
            return found
    return None


def modalities_in_text(text: str) -> set[str]:
    """Every modality that `text` names."""
    named = {name for name, pattern in _TEXT_PATTERNS.items() if pattern.search(text)}
    for specific, general in _SUBSUMES:
        if specific in named:
            named.discard(general)
    return named


def _single(names: set[str]) -> str | None:
    return next(iter(names)) if len(names) == 1 else None
