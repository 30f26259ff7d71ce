"""What every benchmark reader shares: the row it yields, the context it reads in, and the small
rules of turning raw values into a `BenchItem` or a `RecordError`.

Locations name the file and the row as the training loader does: "path:N" with N the 1-based data
row of a TSV/CSV (header not counted), element of a JSON list or line of a JSONL file; tables that
`datasets`/parquet hold are "<file or folder> row N", 0-based as in `dataset[i]`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmai_rl.benchmarks.images import CHECKS_FILE, ImageStore, default_cache_dir
from gmai_rl.benchmarks.items import ANSWER_TYPE, MODALITY, BenchItem, Kind
from gmai_rl.data.modality import normalize_modality
from gmai_rl.data.records import (
    ANSWER_NOT_IN_OPTIONS,
    BAD_OPTIONS,
    WRONG_TYPE,
    RecordError,
)

# Reasons of this package, beside those of `gmai_rl.data.records`.
MALFORMED_ROW = "malformed_row"
"""A TSV/CSV row whose field count differs from the header's."""
UNKNOWN_SUBJECT = "unknown_subject"
"""An MMMU row whose subject none of its columns names."""


@dataclass(frozen=True)
class Row:
    """One row of a benchmark file: the question it holds, or why it cannot be read."""

    location: str
    """For errors: "path/file.tsv:12" or "<folder> row 11"."""
    result: BenchItem | RecordError
    order: int
    """Reading order; a row whose image comes from a later row is yielded late but keeps its
    place."""


@dataclass
class ReadContext:
    """What a reader gets besides the path: the benchmark, where decoded images go, and what it
    leaves out on purpose (reported, never silent)."""

    benchmark: str
    expects: str
    """What `path` must be, for the error when it is not."""
    cache_dir: Path | None = None
    """The user's `cache_dir`; None: beside the source (`images.default_cache_dir`)."""
    store: ImageStore | None = None
    left_out: dict[str, int] = field(default_factory=dict)
    """Why -> rows left out on purpose (mmmu-med: other subjects), logged by the loader."""

    def image_store(self, source: Path) -> ImageStore:
        """The store for images decoded from `source`, made on first use."""
        if self.store is None:
            self.store = ImageStore(self.cache_dir or default_cache_dir(source))
        return self.store

    @property
    def checks_file(self) -> Path | None:
        """Where image checks are recorded: the cache folder in use, if any."""
        if self.store is not None:
            return self.store.folder / CHECKS_FILE
        return self.cache_dir / CHECKS_FILE if self.cache_dir is not None else None

    def wrong_path(self, path: Path, why: str = "") -> FileNotFoundError:
        detail = f" ({why})" if why else ""
        return FileNotFoundError(f"{self.benchmark}: expected {self.expects}; got {path}{detail}")

    def leave_out(self, why: str) -> None:
        self.left_out[why] = self.left_out.get(why, 0) + 1


def blank(value: object) -> bool:
    """Whether a cell holds nothing: None, NaN, "", whitespace, or the text "nan" pandas writes
    for a missing value that was stringified."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip() in ("", "nan", "NaN")


def text(value: object, key: str, missing_reason: str) -> str:
    """A cell as stripped text: strings, and numbers (SLAKE's "2", a numeric index) as text."""
    if blank(value):
        raise RecordError(missing_reason, f"'{key}' is missing or empty")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(WRONG_TYPE, f"'{key}' is a {type(value).__name__}, not text")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def optional_text(value: object) -> str | None:
    return None if blank(value) else str(value).strip()


def closed_or_open(answer: str) -> tuple[Kind, dict[str, str]]:
    """VQA-RAD/PathVQA's rule (and MedEvalKit's): a yes/no answer is closed, anything else open."""
    if answer.strip().lower() in ("yes", "no"):
        return Kind.CLOSED, {ANSWER_TYPE: "closed"}
    return Kind.OPEN, {ANSWER_TYPE: "open"}


def check_options(options: dict[str, str]) -> None:
    """Two options with the same text make a letter answer ambiguous."""
    seen: dict[str, str] = {}
    for letter, option in options.items():
        key = " ".join(option.lower().split())
        if key in seen:
            raise RecordError(BAD_OPTIONS, f"options {seen[key]} and {letter} are both {option!r}")
        seen[key] = letter


def mcq_letter(answer: str, options: dict[str, str]) -> str:
    """The gold letter `answer` names; it must be one of the options' letters."""
    letter = answer.strip()
    if letter in options:
        return letter
    raise RecordError(
        ANSWER_NOT_IN_OPTIONS,
        f"gold answer {letter!r} is not one of the options {', '.join(options)}",
    )


def letter_of_text(answer: str, options: dict[str, str]) -> str:
    """The letter of the one option whose text is `answer` (OmniMedVQA's `gt_answer`)."""
    matches = [letter for letter, option in options.items() if option.strip() == answer.strip()]
    if len(matches) != 1:
        found = "no option" if not matches else f"options {', '.join(matches)}"
        raise RecordError(
            ANSWER_NOT_IN_OPTIONS,
            f"gold answer {answer!r} matches {found} (options: {options}); it must match "
            "exactly one",
        )
    return matches[0]


KNOWN_MODALITIES = frozenset(
    {"x_ray", "ct", "mri", "pet", "oct", "ultrasound", "fundus", "dermoscopy", "endoscopy",
     "pathology", "microscopy", "mammography"}
)  # fmt: skip
"""The labels `gmai_rl.data.modality` knows; others are kept in snake case."""


def normalized(fields: dict[str, str]) -> dict[str, str]:
    """`fields` with the modality in the project's spelling. Labels that spell the modality out
    in parentheses ("MR (Mag-netic Resonance Imaging)", OmniMedVQA's) are read by either part."""
    value = fields.get(MODALITY)
    if value is not None:
        outside, _, inside = value.partition("(")
        candidates = [
            normalize_modality(v) for v in (value, outside, inside.rstrip(")")) if v.strip()
        ]
        fields[MODALITY] = next((c for c in candidates if c in KNOWN_MODALITIES), candidates[0])
    return fields


def snake(name: str) -> str:
    """A column name as a field name: "clinical VQA task" -> "clinical_vqa_task"."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def item(**kwargs: Any) -> BenchItem:
    """A `BenchItem`; its own checks (answer among the options...) raise `RecordError`."""
    try:
        return BenchItem(**kwargs)
    except ValueError as error:
        raise RecordError(ANSWER_NOT_IN_OPTIONS, str(error)) from None


def json_list(path: Path) -> list[Any]:
    """A JSON file that holds a list (SLAKE, OmniMedVQA); anything else is a file-level error."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file: {error}") from None
    if not isinstance(document, list):
        raise ValueError(
            f"{path}: expected a JSON list of questions, got {type(document).__name__}"
        )
    return document
