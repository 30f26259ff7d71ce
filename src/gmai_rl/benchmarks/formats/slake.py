"""SLAKE (BoKelvin/SLAKE): `test.json`, a JSON list, and the images under `imgs/` beside it.

Keys: `qid`, `img_name` (relative to imgs/, e.g. "xmlab102/source.jpg"), `question`, `answer`,
`answer_type` ("OPEN"/"CLOSED"), `q_lang` ("en"/"zh"), `modality` ("CT", "MRI", "X-Ray"),
`content_type` (what the question asks about: organ, abnormality, position...), `location` (the
body region). CLOSED questions are `Kind.CLOSED` (yes/no and SLAKE's other closed answers), OPEN ones
`Kind.OPEN`; the answer text is kept as written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from gmai_rl.benchmarks.formats.common import ReadContext, Row, item, json_list, normalized, text
from gmai_rl.benchmarks.items import (
    ANSWER_TYPE,
    LANGUAGE,
    MODALITY,
    QUESTION_TYPE,
    BenchItem,
    Kind,
)
from gmai_rl.data.records import (
    BAD_IMAGE_REFERENCE,
    EMPTY_QUESTION,
    NO_ANSWER,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    RecordError,
    resolve_image_path,
)

_KINDS = {"OPEN": Kind.OPEN, "CLOSED": Kind.CLOSED}
_FIELDS = {
    "modality": MODALITY,
    "q_lang": LANGUAGE,
    "content_type": QUESTION_TYPE,
    "location": "location",
}


def read_slake(path: Path, ctx: ReadContext) -> Iterator[Row]:
    file = path / "test.json" if path.is_dir() else path
    images = file.parent / "imgs"
    if not file.is_file() or file.suffix != ".json" or not images.is_dir():
        raise ctx.wrong_path(path)
    root = os.path.abspath(images)
    for number, record in enumerate(json_list(file), start=1):
        yield Row(f"{file}:{number}", _item(record, f"{file.name}:{number}", root, ctx), number)


def _item(record: object, source: str, root: str, ctx: ReadContext) -> BenchItem | RecordError:
    try:
        if not isinstance(record, Mapping):
            raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
        answer_type = text(record.get("answer_type"), "answer_type", WRONG_TYPE).upper()
        if answer_type not in _KINDS:
            raise RecordError(WRONG_TYPE, f"'answer_type' is {answer_type!r}, not OPEN or CLOSED")
        fields = {
            name: str(record[key]).strip()
            for key, name in _FIELDS.items()
            if isinstance(record.get(key), str) and record[key].strip()
        }
        fields[ANSWER_TYPE] = answer_type.lower()
        return item(
            benchmark=ctx.benchmark,
            id=text(record.get("qid"), "qid", WRONG_TYPE),
            question=text(record.get("question"), "question", EMPTY_QUESTION),
            kind=_KINDS[answer_type],
            answer=text(record.get("answer"), "answer", NO_ANSWER),
            images=(
                resolve_image_path(
                    text(record.get("img_name"), "img_name", BAD_IMAGE_REFERENCE), root
                ),
            ),
            fields=normalized(fields),
            source=source,
        )
    except RecordError as error:
        return error
