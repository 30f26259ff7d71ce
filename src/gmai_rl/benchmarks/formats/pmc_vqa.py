"""PMC-VQA (xmcmic/PMC-VQA, mirrored as RadGenome/PMC-VQA): a CSV of questions and the images
unzipped beside it.

`path` is the CSV file or its folder; in a folder the first of `test_2.csv` (version 2,
non-compound images; what MedEvalKit scores), `test.csv` and `test_clean.csv` (version 1) is read.
Columns: `Figure_path` (an image file name), `Question`, `Choice A`..`Choice D`, each written
"A:text" (the "A:" is cut off), and the gold answer: `Answer_label` (a letter, version 1) or
`Answer` (version 2: a letter; version 1: the option's text). An `index` column, when present, is
the id; else "<csv stem>-<row>".

Images: `images.zip` unzips to images/ and `images_2.zip` to figures/ (MedEvalKit looks in
figures/ and then images/). Each image is looked up in the folders beside the CSV, in this order:
for version 2 `figures/`, `images_2/`, `images2/`, `images/`; for version 1 `images/`, `figures/`.
To use another folder, point at a CSV in a folder where one of these names is (or links to) it.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from pathlib import Path

from gmai_rl.benchmarks.formats.common import (
    MALFORMED_ROW,
    ReadContext,
    Row,
    blank,
    check_options,
    item,
    letter_of_text,
    mcq_letter,
    optional_text,
    text,
)
from gmai_rl.benchmarks.items import BenchItem, Kind
from gmai_rl.data.records import (
    BAD_IMAGE_REFERENCE,
    EMPTY_QUESTION,
    MISSING_IMAGE,
    NO_ANSWER,
    RecordError,
    resolve_image_path,
)

CSV_NAMES = ("test_2.csv", "test.csv", "test_clean.csv")
_V2_FOLDERS = ("figures", "images_2", "images2", "images")
_V1_FOLDERS = ("images", "figures")
_LETTERS = "ABCD"


def read_pmc_vqa(path: Path, ctx: ReadContext) -> Iterator[Row]:
    if path.is_dir():
        file = next(
            (path / name for name in CSV_NAMES if (path / name).is_file()), path / CSV_NAMES[0]
        )
    else:
        file = path
    if not file.is_file() or file.suffix != ".csv":
        raise ctx.wrong_path(path)
    names = _V2_FOLDERS if file.stem.endswith("2") else _V1_FOLDERS
    folders = [
        os.path.abspath(file.parent / name) for name in names if (file.parent / name).is_dir()
    ]
    if not folders:
        raise ctx.wrong_path(
            path, f"no image folder ({', '.join(n + '/' for n in names)}) beside {file.name}"
        )
    with file.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.DictReader(lines)
        _check_header(list(reader.fieldnames or []), file)
        for number, record in enumerate(reader, start=1):
            result = _item(record, file, number, folders, ctx)
            yield Row(f"{file}:{number}", result, number)


def _check_header(columns: list[str], file: Path) -> None:
    needed = ["Figure_path", "Question", *(f"Choice {letter}" for letter in _LETTERS)]
    missing = [name for name in needed if name not in columns]
    if "Answer_label" not in columns and "Answer" not in columns:
        missing.append("Answer_label (or Answer)")
    if missing:
        raise ValueError(
            f"{file}: not a PMC-VQA CSV: no column {', '.join(missing)} (columns: {', '.join(columns)})"
        )


def _item(
    record: dict[str, str], file: Path, number: int, folders: list[str], ctx: ReadContext
) -> BenchItem | RecordError:
    try:
        if None in record or any(value is None for value in record.values()):
            raise RecordError(MALFORMED_ROW, "the row's field count differs from the header's")
        options = {}
        for letter in _LETTERS:
            value = record[f"Choice {letter}"]
            if not blank(value):
                options[letter] = re.sub(rf"^\s*\(?{letter}\)?\s*[:：.]\s*", "", value).strip()
        check_options(options)
        return item(
            benchmark=ctx.benchmark,
            id=optional_text(record.get("index")) or f"{file.stem}-{number}",
            question=text(record.get("Question"), "Question", EMPTY_QUESTION),
            kind=Kind.MCQ,
            answer=_answer(record, options),
            options=options,
            images=(
                _image(
                    text(record.get("Figure_path"), "Figure_path", BAD_IMAGE_REFERENCE), folders
                ),
            ),
            source=f"{file.name}:{number}",
        )
    except RecordError as error:
        return error


def _answer(record: dict[str, str], options: dict[str, str]) -> str:
    label = optional_text(record.get("Answer_label"))
    if label is not None:
        return mcq_letter(label, options)
    answer = text(record.get("Answer"), "Answer", NO_ANSWER)
    if re.fullmatch(r"[A-Z]", answer):
        return mcq_letter(answer, options)
    prefixed = re.match(r"^\s*([A-D])\s*:", answer)
    if prefixed:
        return mcq_letter(prefixed[1], options)
    return letter_of_text(answer, options)


def _image(name: str, folders: list[str]) -> str:
    paths = [resolve_image_path(name, folder) for folder in folders]
    found = next((path for path in paths if os.path.exists(path)), None)
    if found is None:
        raise RecordError(MISSING_IMAGE, f"image {name!r} is in none of {', '.join(folders)}")
    return found
