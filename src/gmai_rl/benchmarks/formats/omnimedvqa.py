"""OmniMedVQA: the dataset folder, with `QA_information/Open-access/*.json` and
`QA_information/Restricted-access/*.json` (each a JSON list; either folder may be absent), images
under the folder by the paths the records give. VLMEvalKit's OmniMedVQA TSV (a `.tsv` path) is read
as any VLMEvalKit TSV.

Keys: `question_id`, `question`, `gt_answer` (the TEXT of the right option), `option_A`..`option_D`
(some absent), `image_path` (relative to the dataset folder), `modality_type` (one file says
`modality`), `question_type`, `dataset`. `gt_answer` is mapped to the letter of the one option with
exactly that text (as MedEvalKit does); one that matches no option, or several, is a bad row.
Fields: modality, question_type, the source `dataset`, and `access` ("open"/"restricted").
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from gmai_rl.benchmarks.formats.common import (
    ReadContext,
    Row,
    check_options,
    item,
    json_list,
    letter_of_text,
    normalized,
    optional_text,
    text,
)
from gmai_rl.benchmarks.formats.vlmeval_tsv import TsvRules, read_tsv
from gmai_rl.benchmarks.items import MODALITY, QUESTION_TYPE, BenchItem, Kind
from gmai_rl.data.records import (
    BAD_IMAGE_REFERENCE,
    EMPTY_QUESTION,
    NO_ANSWER,
    NO_OPTIONS,
    NOT_AN_OBJECT,
    RecordError,
    resolve_image_path,
)

_ACCESS = (("Open-access", "open"), ("Restricted-access", "restricted"))
_OPTION_KEY = re.compile(r"^option_([A-Z])$")


def read_omnimedvqa(path: Path, ctx: ReadContext) -> Iterator[Row]:
    if path.is_file() and path.suffix == ".tsv":
        yield from read_tsv(path, ctx, TsvRules())
        return
    files = [
        (file, access)
        for folder, access in _ACCESS
        for file in sorted((path / "QA_information" / folder).glob("*.json"))
    ]
    if not files:
        raise ctx.wrong_path(path)
    root = os.path.abspath(path)
    order = 0
    for file, access in files:
        for number, record in enumerate(json_list(file), start=1):
            order += 1
            result = _item(record, file, number, access, root, ctx)
            yield Row(f"{file}:{number}", result, order)


def _item(
    record: object, file: Path, number: int, access: str, root: str, ctx: ReadContext
) -> BenchItem | RecordError:
    try:
        if not isinstance(record, Mapping):
            raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
        options = {
            match[1]: text(value, key, NO_OPTIONS)
            for key, value in sorted(record.items())
            if (match := _OPTION_KEY.match(key)) and optional_text(value) is not None
        }
        if not options:
            raise RecordError(NO_OPTIONS, "no option_A, option_B, ... keys")
        check_options(options)
        fields = {"access": access}
        for key, name in (("modality_type", MODALITY), ("modality", MODALITY),
                          ("question_type", QUESTION_TYPE), ("dataset", "dataset")):  # fmt: skip
            if (value := optional_text(record.get(key))) is not None:
                fields.setdefault(name, value)
        question_id = optional_text(record.get("question_id"))
        return item(
            benchmark=ctx.benchmark,
            id=question_id or f"{file.stem}-{number}",
            question=text(record.get("question"), "question", EMPTY_QUESTION),
            kind=Kind.MCQ,
            answer=letter_of_text(text(record.get("gt_answer"), "gt_answer", NO_ANSWER), options),
            options=options,
            images=(
                resolve_image_path(
                    text(record.get("image_path"), "image_path", BAD_IMAGE_REFERENCE), root
                ),
            ),
            fields=normalized(fields),
            source=f"{file.name}:{number}",
        )
    except RecordError as error:
        return error
