"""VLMEvalKit's TSV format, as its `ImageBaseDataset`/`ImageMCQDataset` read it.

Columns: `index`; `image`, base64 text, or when 64 characters or fewer the `index` of the row
whose image this row shares (VLMEvalKit stores circular variants that way), or a stringified
Python list of base64 texts for several images; `image_path` (used only when a row has no `image`:
paths relative to the TSV's folder); `question`; `hint` (empty = none); option columns `A`, `B`,
... (empty = the option is absent); `answer`, the gold letter; and any number of breakdown columns
(`category`, `l2-category`, `split`, GMAI-MMBench's `modality`, `clinical VQA task`, `department`,
`perceptual granularity`...), each kept as a field under its snake-case name (but `id`,
MMMU's per-question id, which would make a breakdown of one question per group).

Read with the csv module, one row at a time (GMAI-MMBench_VAL.tsv is 9 GB): cells are text, so an
option that reads "None" or "NA" stays an option (pandas, which VLMEvalKit uses, would make it a
missing value). Rows VLMEvalKit drops silently (no image) are bad rows here. A row whose shared
image comes from a later row is finished when that row has been read; one that refers to a row
left out (mmmu-med's other subjects) gets that row's image from a second pass over the file, which
is made only when needed.

MMMU (`TsvRules.mmmu_medical`): only the five medical subjects are kept (the subject is read from
`category`, else `l2-category`, else the `id` prefix such as "validation_Clinical_Medicine_3"),
`<image k>` placeholders in the question and options become "(image k)" (the images stay in their
order, 1..n), and a question without options is open.
"""

from __future__ import annotations

import ast
import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gmai_rl.benchmarks.formats.common import (
    MALFORMED_ROW,
    UNKNOWN_SUBJECT,
    ReadContext,
    Row,
    blank,
    check_options,
    closed_or_open,
    item,
    normalized,
    optional_text,
    snake,
    text,
)
from gmai_rl.benchmarks.items import SUBJECT, BenchItem, Kind
from gmai_rl.data.admission import DataError
from gmai_rl.data.records import (
    ANSWER_NOT_IN_OPTIONS,
    BAD_ANSWER,
    BAD_IMAGE_REFERENCE,
    CONFLICTING_FIELDS,
    EMPTY_QUESTION,
    MISSING_IMAGE,
    NO_ANSWER,
    NO_OPTIONS,
    RecordError,
    resolve_image_path,
)

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory",
    "Basic_Medical_Science", "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science",
    "Design", "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics",
    "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage", "Marketing",
    "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)  # fmt: skip
"""MMMU's 30 subjects, spelt as its dataset configs are (MMMU's `CAT_SHORT2LONG`)."""
MEDICAL_SUBJECTS = frozenset(
    {
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    }
)
"""MMMU's "Health and Medicine" discipline: what mmmu-med keeps."""

_REFERENCE_MAX = 64  # VLMEvalKit: an `image` cell this short names another row's index
_PLACEHOLDER = re.compile(r"<image (\d+)>")
_MMMU_ID = re.compile(r"^(?:dev|validation|test)_(.+)_\d+$")
_BY_KEY = {subject.lower(): subject for subject in MMMU_SUBJECTS}
_RESERVED = {"index", "id", "image", "image_path", "question", "hint", "answer"}
"""Columns that are not breakdowns (`id`: MMMU's own question id, unique per row)."""


@dataclass(frozen=True)
class TsvRules:
    """How one benchmark reads the common TSV format."""

    without_options: Literal["refuse", "open", "closed_or_open"] = "refuse"
    """A row with no options: a bad row, an open question, or closed when the answer is yes/no."""
    mmmu_medical: bool = False
    no_answer: str = ""
    """Why answers may be missing (GMAI-MMBench's TEST split), said in the error."""
    clean_question: Callable[[str], str] | None = None


@dataclass(frozen=True)
class _Draft:
    """A row read but for its images (which may come from a later row)."""

    id: str
    question: str
    kind: Kind
    answer: str
    options: dict[str, str]
    hint: str | None
    fields: dict[str, str]
    location: str
    number: int


def read_tsv(path: Path, ctx: ReadContext, rules: TsvRules) -> Iterator[Row]:
    if not path.is_file():
        raise ctx.wrong_path(path)
    yield from _TsvReader(path, ctx, rules).rows()


class _TsvReader:
    def __init__(self, path: Path, ctx: ReadContext, rules: TsvRules) -> None:
        self.path, self.ctx, self.rules = path, ctx, rules
        self.columns: list[str] = []
        self.letters: list[str] = []
        self.images: dict[str, list[str] | RecordError] = {}
        """index -> the images of the first row with that index that has its own."""
        self.rows_of: dict[str, int] = {}
        """index -> its first data row."""
        self.shared: set[str] = set()
        """Indices of rows whose image is a reference."""
        self.deferred: list[tuple[_Draft, str]] = []
        """Rows waiting for the image of (draft, the index they refer to)."""

    def rows(self) -> Iterator[Row]:
        for number, record in self._records():
            row = self._row(number, record)
            if row is not None:
                yield row
        if self.deferred:
            self._decode_needed()
            for draft, target in self.deferred:
                images = self._shared_images(target)
                if images is None:
                    images = RecordError(
                        BAD_IMAGE_REFERENCE,
                        f"the image refers to index {target!r}, which no row of "
                        f"{self.path.name} has",
                    )
                yield Row(draft.location, self._finish(draft, images), draft.number)

    # -----------------------------------------------------------------------------------------
    # The file

    def _records(self) -> Iterator[tuple[int, dict[str, str] | RecordError]]:
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # base64 cells are large
        number = 0
        with self.path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, delimiter="\t")
            try:
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"{self.path}: empty file; expected a VLMEvalKit TSV")
                self._read_header(header)
                for number, values in enumerate(reader, start=1):
                    if len(values) == len(self.columns):
                        yield number, dict(zip(self.columns, values, strict=True))
                    elif values:
                        yield (
                            number,
                            RecordError(
                                MALFORMED_ROW,
                                f"{len(values)} fields where the header has {len(self.columns)}",
                            ),
                        )
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{self.path}: not UTF-8 after data row {number}: {error}"
                ) from None

    def _read_header(self, header: list[str]) -> None:
        self.columns = [name.strip() for name in header]
        self.letters = [name for name in self.columns if re.fullmatch(r"[A-Z]", name)]
        missing = [name for name in ("index", "question") if name not in self.columns]
        if "image" not in self.columns and "image_path" not in self.columns:
            missing.append("image (or image_path)")
        if missing:
            raise ValueError(
                f"{self.path}: not a VLMEvalKit TSV: no column {', '.join(missing)} "
                f"(columns: {', '.join(self.columns[:20])})"
            )
        if "answer" not in self.columns:
            if self.rules.no_answer:
                raise DataError(str(self.path), NO_ANSWER, self.rules.no_answer)
            raise ValueError(f"{self.path}: no 'answer' column: its questions cannot be scored")

    # -----------------------------------------------------------------------------------------
    # One row

    def _row(self, number: int, record: dict[str, str] | RecordError) -> Row | None:
        location = f"{self.path}:{number}"
        if isinstance(record, RecordError):
            return Row(location, record, number)
        try:
            index = text(record.get("index"), "index", MALFORMED_ROW)
            subject = self._subject(record) if self.rules.mmmu_medical else None
        except RecordError as error:
            return Row(location, error, number)
        self.rows_of.setdefault(index, number)
        if subject is not None and subject not in MEDICAL_SUBJECTS:
            self.ctx.leave_out("MMMU subjects other than the medical ones")
            return None
        own = self._own_images(index, record)
        try:
            draft = self._draft(index, record, location, number, subject)
        except RecordError as error:
            return Row(location, error, number)
        if own is not None:
            return Row(location, self._finish(draft, own), number)
        target = record["image"].strip()
        images = self._shared_images(target)
        if images is None:
            self.deferred.append((draft, target))
            return None
        return Row(location, self._finish(draft, images), number)

    def _draft(
        self, index: str, record: dict[str, str], location: str, number: int, subject: str | None
    ) -> _Draft:
        """The row but its images; raises RecordError."""
        question = text(record.get("question"), "question", EMPTY_QUESTION)
        if self.rules.clean_question is not None:
            question = self.rules.clean_question(question)
        options = {
            letter: record[letter].strip() for letter in self.letters if not blank(record[letter])
        }
        if blank(record.get("answer")):
            raise RecordError(NO_ANSWER, self.rules.no_answer or "the row has no answer")
        answer = record["answer"].strip()
        fields = self._breakdowns(record)
        if subject is not None:
            fields[SUBJECT] = subject
        if options:
            check_options(options)
            kind = Kind.MCQ
            if answer not in options:
                reason = ANSWER_NOT_IN_OPTIONS if re.fullmatch(r"[A-Z]", answer) else BAD_ANSWER
                raise RecordError(
                    reason, f"gold answer {answer!r} is not one of the options {', '.join(options)}"
                )
        elif self.rules.without_options == "open":
            kind = Kind.OPEN
        elif self.rules.without_options == "closed_or_open":
            kind, answer_type = closed_or_open(answer)
            fields.update(answer_type)
        else:
            raise RecordError(
                NO_OPTIONS, "the row has no options (its columns A, B, ... are empty)"
            )
        hint = optional_text(record.get("hint"))
        return _Draft(index, question, kind, answer, options, hint, fields, location, number)

    def _breakdowns(self, record: dict[str, str]) -> dict[str, str]:
        fields = {}
        for column in self.columns:
            if column in _RESERVED or column in self.letters:
                continue
            value = optional_text(record[column])
            if value is not None:
                fields[snake(column)] = value
        return normalized(fields)

    def _subject(self, record: dict[str, str]) -> str:
        for column in ("category", "l2-category", "subject"):
            value = optional_text(record.get(column))
            if value is not None and (subject := _mmmu_subject(value)) is not None:
                return subject
        match = _MMMU_ID.match(optional_text(record.get("id")) or "")
        if match and (subject := _mmmu_subject(match[1])) is not None:
            return subject
        raise RecordError(
            UNKNOWN_SUBJECT,
            f"no column names an MMMU subject (category={record.get('category')!r}, "
            f"id={record.get('id')!r})",
        )

    def _finish(self, draft: _Draft, images: list[str] | RecordError) -> BenchItem | RecordError:
        if isinstance(images, RecordError):
            return images
        question, options = draft.question, draft.options
        try:
            if self.rules.mmmu_medical:
                question = _placeholders(question, len(images))
                options = {k: _placeholders(v, len(images)) for k, v in options.items()}
            return item(
                benchmark=self.ctx.benchmark,
                id=draft.id,
                question=question,
                kind=draft.kind,
                answer=draft.answer,
                options=options,
                images=tuple(images),
                hint=draft.hint,
                fields=draft.fields,
                source=f"{self.path.name}:{draft.number}",
            )
        except RecordError as error:
            return error

    # -----------------------------------------------------------------------------------------
    # Images

    def _own_images(self, index: str, record: dict[str, str]) -> list[str] | RecordError | None:
        """The row's own images (decoded once into the cache), or None when it shares another
        row's."""
        raw = record.get("image", "").strip()
        if blank(raw):
            result = self._image_paths(record.get("image_path", ""))
        elif len(raw) <= _REFERENCE_MAX:
            self.shared.add(index)
            return None
        else:
            result = self._decode(index, raw)
        self.images.setdefault(index, result)
        return result

    def _decode(self, index: str, raw: str) -> list[str] | RecordError:
        try:
            texts = _text_list(raw, "image") if raw.startswith("[") and raw.endswith("]") else [raw]
            store = self.ctx.image_store(self.path)
            if len(texts) == 1:
                return [store.from_base64(texts[0], index)]
            return [store.from_base64(t, f"{index}_{k}") for k, t in enumerate(texts, start=1)]
        except RecordError as error:
            return error

    def _image_paths(self, value: str) -> list[str] | RecordError:
        if blank(value):
            return RecordError(MISSING_IMAGE, "the row has no image (VLMEvalKit leaves it out)")
        try:
            refs = _text_list(value, "image_path") if value.strip().startswith("[") else [value]
            root = str(self.path.parent.absolute())
            return [resolve_image_path(ref.strip(), root) for ref in refs]
        except RecordError as error:
            return error

    def _shared_images(self, target: str) -> list[str] | RecordError | None:
        """The images of the row `target` names; None while that row has not been read."""
        if target in self.images:
            images = self.images[target]
            if isinstance(images, RecordError):
                return RecordError(
                    images.reason,
                    f"shares the image of index {target!r} (data row {self.rows_of[target]}), "
                    f"which cannot be used: {images.detail}",
                )
            return images
        if target in self.shared:
            return RecordError(
                BAD_IMAGE_REFERENCE,
                f"the image refers to index {target!r}, whose image is itself a reference",
            )
        return None

    def _decode_needed(self) -> None:
        """Decode the images of the rows that deferred rows refer to and that were left out
        (mmmu-med's other subjects): one more pass over the file, only when there are such."""
        needed = {target for _, target in self.deferred if target in self.rows_of}
        needed -= set(self.images) | self.shared
        if not needed:
            return
        for _, record in self._records():
            if isinstance(record, RecordError):
                continue
            index = (record.get("index") or "").strip()
            if index in needed and index not in self.images:
                self._own_images(index, record)


def _text_list(value: str, column: str) -> list[str]:
    """A stringified Python list of strings (VLMEvalKit's multi-image cells), read safely."""
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise RecordError(BAD_IMAGE_REFERENCE, f"'{column}' is not a list of strings") from None
    if not isinstance(parsed, list) or not parsed or not all(isinstance(p, str) for p in parsed):
        raise RecordError(BAD_IMAGE_REFERENCE, f"'{column}' is not a non-empty list of strings")
    return parsed


def _mmmu_subject(value: str) -> str | None:
    return _BY_KEY.get(re.sub(r"[\s&-]+", "_", value.strip()).lower())


def _placeholders(text_: str, images: int) -> str:
    """MMMU's "<image k>" as "(image k)"; a k beyond the row's images is an error."""

    def swap(match: re.Match[str]) -> str:
        k = int(match[1])
        if not 1 <= k <= images:
            raise RecordError(
                CONFLICTING_FIELDS,
                f"the text refers to <image {k}> but the row has {images} images",
            )
        return f"(image {k})"

    return _PLACEHOLDER.sub(swap, text_)


def strip_answer_choices(question: str) -> str:
    """MedXpertQA's question without the "Answer Choices: (A) ... (E) ..." it ends with (the
    options are in their own field)."""
    stem, found, rest = question.rpartition("Answer Choices:")
    return stem.rstrip() if found and rest.lstrip().startswith("(A)") and stem.strip() else question
