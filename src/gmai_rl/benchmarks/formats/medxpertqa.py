"""MedXpertQA MM (TsinghuaC3I/MedXpertQA, config MM): `MM/test.jsonl` and the images from
`images.zip` in `images/`, beside the JSONL file or one folder up (the hub repo's layout: images/
at the top, MM/test.jsonl below). `path` is the dataset folder, its MM/ folder or the JSONL file;
VLMEvalKit's MedXpertQA_MM_test.tsv (a `.tsv` path) is read as any VLMEvalKit TSV.

Keys: `id` ("MM-26"), `question` (ending in "Answer Choices: (A) ... (E) ...", which is cut off:
the options are in `options`), `options` {"A": ..., "E": ...}, `label` (the gold letter), `images`
(file names under images/), `medical_task`, `body_system`, `question_type` (Reasoning or
Understanding). Fields: question_type, medical_task, body_system.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from gmai_rl.benchmarks.formats.common import (
    ReadContext,
    Row,
    check_options,
    item,
    mcq_letter,
    optional_text,
    text,
)
from gmai_rl.benchmarks.formats.vlmeval_tsv import TsvRules, read_tsv, strip_answer_choices
from gmai_rl.benchmarks.items import QUESTION_TYPE, BenchItem, Kind
from gmai_rl.data.records import (
    BAD_OPTIONS,
    EMPTY_QUESTION,
    INVALID_JSON,
    MISSING_IMAGE,
    NO_ANSWER,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    RecordError,
    resolve_image_path,
)

_FIELDS = (
    ("question_type", QUESTION_TYPE),
    ("medical_task", "medical_task"),
    ("body_system", "body_system"),
)


def read_medxpertqa(path: Path, ctx: ReadContext) -> Iterator[Row]:
    if path.is_file() and path.suffix == ".tsv":
        yield from read_tsv(path, ctx, TsvRules(clean_question=strip_answer_choices))
        return
    if path.is_dir():
        candidates = [path / "MM" / "test.jsonl", path / "test.jsonl"]
        file = next((c for c in candidates if c.is_file()), candidates[0])
    else:
        file = path
    if not file.is_file() or file.suffix != ".jsonl":
        raise ctx.wrong_path(path)
    folders = [file.parent / "images", file.parent.parent / "images"]
    images = next((folder for folder in folders if folder.is_dir()), None)
    if images is None:
        raise ctx.wrong_path(
            path, f"no images/ folder in {file.parent} or {file.parent.parent}: unzip images.zip"
        )
    root = os.path.abspath(images)
    with file.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield Row(
                    f"{file}:{number}", _item(line, f"{file.name}:{number}", root, ctx), number
                )


def _item(line: bytes, source: str, root: str, ctx: ReadContext) -> BenchItem | RecordError:
    try:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordError(INVALID_JSON, f"not a JSON line: {error}") from None
        if not isinstance(record, Mapping):
            raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
        raw_options = record.get("options")
        if not isinstance(raw_options, Mapping) or not raw_options:
            raise RecordError(BAD_OPTIONS, "'options' must be an object {letter: text}")
        options = {
            str(letter).strip(): text(value, f"options.{letter}", BAD_OPTIONS)
            for letter, value in raw_options.items()
        }
        check_options(options)
        names = record.get("images")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise RecordError(WRONG_TYPE, "'images' must be a list of file names")
        if not names:
            raise RecordError(MISSING_IMAGE, "the question has no images")
        fields = {name: value for key, name in _FIELDS if (value := optional_text(record.get(key)))}
        return item(
            benchmark=ctx.benchmark,
            id=text(record.get("id"), "id", WRONG_TYPE),
            question=strip_answer_choices(text(record.get("question"), "question", EMPTY_QUESTION)),
            kind=Kind.MCQ,
            answer=mcq_letter(text(record.get("label"), "label", NO_ANSWER), options),
            options=options,
            images=tuple(resolve_image_path(name, root) for name in names),
            fields=fields,
            source=source,
        )
    except RecordError as error:
        return error
