"""One benchmark question, whatever its file format: the record every loader produces and the
scorer, the prompts and the results read.

Benchmarks mix three kinds of question, scored by different rules (`gmai_rl.benchmarks.scoring`):
multiple choice (a gold option letter), closed (a short gold answer from a small set: "yes"/"no",
or SLAKE's closed answers) and open (free text, reported apart: exact match and token F1 are not
comparable to the judge-scored numbers other harnesses publish).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gmai_rl.types import MCQItem


class Kind(StrEnum):
    MCQ = "mcq"
    """Options A, B, ...; `answer` is the gold letter."""
    CLOSED = "closed"
    """A short answer from a closed set ("yes"/"no", SLAKE's CLOSED); `answer` is its text."""
    OPEN = "open"
    """A free-text answer; `answer` is the reference text."""


# Breakdown fields a loader may fill (`BenchItem.fields`); results are grouped by each.
MODALITY = "modality"
"""The imaging modality, normalised as `gmai_rl.data.modality.normalize_modality` does."""
CATEGORY = "category"
L2_CATEGORY = "l2_category"
QUESTION_TYPE = "question_type"
ANSWER_TYPE = "answer_type"
LANGUAGE = "language"
SUBJECT = "subject"
BREAKDOWNS = (MODALITY, CATEGORY, L2_CATEGORY, QUESTION_TYPE, ANSWER_TYPE, LANGUAGE, SUBJECT)


@dataclass(frozen=True)
class BenchItem:
    """One question of a benchmark, with what its results are broken down by."""

    benchmark: str
    """The benchmark's name as `gmai-rl eval --benchmark` takes it ("vqa-rad")."""
    id: str
    """Unique within the benchmark: the dataset's own index or id where it has one."""
    question: str
    """The question text (without option lines; a hint, if any, is in `hint`)."""
    kind: Kind
    answer: str
    """The gold option letter (MCQ) or the gold answer's text."""
    options: dict[str, str] = field(default_factory=dict)
    """Option letter -> text, in order; empty unless MCQ."""
    images: tuple[str, ...] = ()
    """Absolute paths of the images, in the order the question refers to them."""
    hint: str | None = None
    """Context the benchmark gives before the question (VLMEvalKit's `hint` column)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Breakdown field (`BREAKDOWNS`, or a benchmark's own, e.g. GMAI-MMBench's department) ->
    value."""
    source: str = ""
    """Where the row came from: "file.tsv:12" (1-based data row) or "<dataset> row 11"."""

    def __post_init__(self) -> None:
        if self.kind is Kind.MCQ and self.answer not in self.options:
            raise ValueError(
                f"{self.source or self.id}: gold answer {self.answer!r} is not one of the "
                f"options {sorted(self.options)}"
            )
        if self.kind is not Kind.MCQ and self.options:
            raise ValueError(f"{self.source or self.id}: a {self.kind.value} question has options")

    @property
    def asked(self) -> str:
        """The question as the policy is asked it: the hint, if any, on the line before."""
        return f"{self.hint}\n{self.question}" if self.hint else self.question

    def as_mcq(self) -> MCQItem:
        """The MCQ as the training data's item (same prompt format and reward); MCQ only."""
        if self.kind is not Kind.MCQ:
            raise ValueError(f"{self.id} is a {self.kind.value} question, not multiple choice")
        return MCQItem(
            id=f"{self.benchmark}/{self.id}",
            question=self.asked,
            options=dict(self.options),
            answer=self.answer,
            images=self.images,
            modality=self.fields.get(MODALITY),
            source=self.source,
        )

    def for_plan(self) -> MCQItem:
        """The question as the pre-flight plan measures it: its text, options and images (the
        plan reads no answer, so closed and open questions pass with an empty one)."""
        answer = self.answer if self.kind is Kind.MCQ else ""
        return MCQItem(
            self.id, self.asked, dict(self.options), answer, self.images, source=self.source
        )
