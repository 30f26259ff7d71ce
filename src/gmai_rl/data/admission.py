"""What a load lets in and what it skips: the error a bad record raises (`DataError`), the
report of a load that skips them (`LoadReport`), and `admit`, which decides for one parsed record.
Shared by the training data's loader (`gmai_rl.data.loader`) and the benchmarks' readers
(`gmai_rl.benchmarks.loaders`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from gmai_rl.data.records import DUPLICATE_ID, RecordError

OnError = Literal["raise", "skip"]


def add_on_error_argument(parser: argparse.ArgumentParser) -> None:
    """`--on-error raise|skip` for a command that loads questions (`gmai-rl eval`, `synth`), as
    `data.on_error` is for a training run."""
    parser.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a bad record stops the load, naming its file and line (raise, the default), or is "
        "skipped and counted by reason with its location (skip)",
    )


class DataError(ValueError):
    """A record that cannot be loaded, with where it is and why."""

    def __init__(self, location: str, reason: str, detail: str) -> None:
        super().__init__(f"{location}: {reason}: {detail}")
        self.location = location
        """Where the record is: "path/file.jsonl:12" (1-based line) or "<dataset> row 11"."""
        self.reason = reason
        """A short machine-readable reason, one of the constants in `gmai_rl.data.records`."""
        self.detail = detail

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, str]]:
        return type(self), (self.location, self.reason, self.detail)  # Ray pickles errors


@dataclass
class LoadReport:
    """What one load kept and what it skipped, by reason."""

    source: str
    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of records skipped for it."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the first few errors of that reason, as "location: detail"."""
    max_examples: int = 3

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, error: DataError) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{error.location}: {error.detail}")

    def summary(self) -> str:
        total = self.loaded + self.skipped_total
        lines = [f"{self.source}: loaded {self.loaded} of {total} records"]
        if self.skipped_total:
            lines[0] += f", skipped {self.skipped_total}:"
        for reason, count in sorted(self.skipped.items(), key=lambda item: -item[1]):
            lines.append(f"  {reason}: {count}, e.g.")
            lines.extend(f"    {example}" for example in self.examples[reason])
        return "\n".join(lines)


class Loaded(Protocol):
    """What `admit` reads of a loaded record."""

    @property
    def id(self) -> str: ...

    @property
    def images(self) -> tuple[str, ...]: ...


L = TypeVar("L", bound=Loaded)


def admit(
    parsed: L | RecordError,
    location: str,
    first_seen: dict[str, str],
    image_checks: Mapping[str, Future[RecordError | None]] | None,
    on_error: OnError,
    report: LoadReport,
) -> L | None:
    """A parsed record, or None when it is skipped: a parse error, an id `first_seen` has
    (id -> location), or an image whose check (`image_checks`, started earlier; None: images not
    checked) failed. With on_error="raise" that is a DataError naming `location`; with "skip" it
    is counted in `report`. A record let in is added to `first_seen`."""
    try:
        if isinstance(parsed, RecordError):
            raise parsed
        if parsed.id in first_seen:
            raise RecordError(
                DUPLICATE_ID, f"id {parsed.id!r} is also used at {first_seen[parsed.id]}"
            )
        if image_checks is not None:
            for image in parsed.images:
                if (problem := image_checks[image].result()) is not None:
                    raise problem
    except RecordError as error:
        data_error = DataError(location, error.reason, error.detail)
        if on_error == "raise":
            raise data_error from None
        report.add_skip(data_error)
        return None
    first_seen[parsed.id] = location
    return parsed
