"""Load a medical VQA benchmark from the files it is published as; no network.

    items, report = load_benchmark("vqa-rad", "/data/vqa-rad")            # save_to_disk or parquet
    items, report = load_benchmark("gmai-mmbench", "/data/LMUData/GMAI-MMBench_VAL.tsv")
    items, report = load_benchmark("slake", "/data/SLAKE", on_error="skip")

`BENCHMARKS` names what each benchmark reads (`BenchmarkSpec.expects`); the readers live in
`gmai_rl.benchmarks.formats`, one module per format. Every row becomes a `BenchItem` or a bad row:
`on_error="raise"` raises `DataError` (location, reason, detail) at the first one, naming the file
and the row (see `formats.common` for how rows are counted); `"skip"` skips it and counts it by
reason in the `LoadReport`, logged as a warning. Rows a benchmark leaves out on purpose (mmmu-med's
non-medical subjects) are logged with their count. Ids must be unique (`DUPLICATE_ID`).

Images go through the training data's check (`gmai_rl.data.loader.image_problem`: present,
decodable to the last pixel, not a decompression bomb, 8-bit), on a pool of threads. Images stored
inside the data (base64 in TSVs, bytes in parquet) are first written once into the cache folder
(`gmai_rl.benchmarks.images`: `cache_dir`, default `<source's folder>/.gmai_rl_images/<source
name>/`). The cache folder also records the images that passed (`image_checks.json`), so a second
load neither decodes base64 nor pixels again; formats whose images are plain files use that record
only when `cache_dir` is given.

`limit` keeps the first `limit` questions (in reading order) and stops reading there.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gmai_rl.benchmarks.formats.common import ReadContext, Row
from gmai_rl.benchmarks.formats.hf_vqa import read_hf_vqa
from gmai_rl.benchmarks.formats.medxpertqa import read_medxpertqa
from gmai_rl.benchmarks.formats.omnimedvqa import read_omnimedvqa
from gmai_rl.benchmarks.formats.pmc_vqa import read_pmc_vqa
from gmai_rl.benchmarks.formats.slake import read_slake
from gmai_rl.benchmarks.formats.vlmeval_tsv import TsvRules, read_tsv
from gmai_rl.benchmarks.items import BenchItem
from gmai_rl.data.admission import LoadReport, OnError, admit
from gmai_rl.data.image_checks import ImageCheckCache
from gmai_rl.data.loader import image_problem
from gmai_rl.data.records import RecordError

logger = logging.getLogger(__name__)

Reader = Callable[[Path, ReadContext], Iterator[Row]]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: what to point at, and the reader of that format."""

    name: str
    expects: str
    """What `path` must be; the error for a wrong path says it."""
    read: Reader


def _tsv(rules: TsvRules) -> Reader:
    return functools.partial(read_tsv, rules=rules)


_GMAI_TEST = (
    "GMAI-MMBench's TEST split ships without answers (its authors removed them to prevent "
    "leakage), so its questions cannot be scored here: use GMAI-MMBench_VAL.tsv"
)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "gmai-mmbench",
            "VLMEvalKit's GMAI-MMBench TSV (GMAI-MMBench_VAL.tsv)",
            _tsv(TsvRules(no_answer=_GMAI_TEST)),
        ),
        BenchmarkSpec(
            "omnimedvqa",
            "the OmniMedVQA folder (with QA_information/Open-access/*.json) or VLMEvalKit's "
            "OmniMedVQA .tsv",
            read_omnimedvqa,
        ),
        BenchmarkSpec(
            "vqa-rad",
            "a Hugging Face dataset folder (save_to_disk, or parquet files such as "
            "data/test-*.parquet) or a .parquet file",
            read_hf_vqa,
        ),
        BenchmarkSpec(
            "slake",
            "a folder with test.json and imgs/, or the test.json file",
            read_slake,
        ),
        BenchmarkSpec(
            "path-vqa",
            "a Hugging Face dataset folder (save_to_disk, or parquet files such as "
            "data/test-*.parquet), a .parquet file, or VLMEvalKit's PathVQA .tsv",
            read_hf_vqa,
        ),
        BenchmarkSpec(
            "pmc-vqa",
            "a PMC-VQA CSV (test_2.csv, test.csv or test_clean.csv) or its folder, with the "
            "images in figures/ or images/ beside it",
            read_pmc_vqa,
        ),
        BenchmarkSpec(
            "mmmu-med",
            "VLMEvalKit's MMMU TSV (MMMU_DEV_VAL.tsv)",
            _tsv(TsvRules(without_options="open", mmmu_medical=True)),
        ),
        BenchmarkSpec(
            "medxpertqa-mm",
            "the MedXpertQA folder (MM/test.jsonl and images/), MM/test.jsonl itself, or "
            "VLMEvalKit's MedXpertQA_MM_test.tsv",
            read_medxpertqa,
        ),
        BenchmarkSpec(
            "vlmeval-mcq",
            "a VLMEvalKit multiple-choice TSV (columns index, image, question, A, B, ..., answer)",
            _tsv(TsvRules()),
        ),
    )
}


def load_benchmark(
    name: str,
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    limit: int | None = None,
) -> tuple[list[BenchItem], LoadReport]:
    """The questions of benchmark `name` read from `path`, and what was skipped (module doc)."""
    spec = BENCHMARKS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions, not {limit}")
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{name}: expected {spec.expects}; {source} does not exist")
    ctx = ReadContext(
        benchmark=name,
        expects=spec.expects,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
    )
    report = LoadReport(source=f"{name}: {source}")
    items = _collect(spec.read(source, ctx), ctx, on_error, limit, report)
    for why, count in ctx.left_out.items():
        logger.info("%s: left out %d rows: %s", report.source, count, why)
    if ctx.store is not None:
        logger.info(
            "%s: %d images decoded into %s, %d found there from an earlier load",
            report.source,
            ctx.store.written,
            ctx.store.folder,
            ctx.store.reused,
        )
    return items, report


def load_benchmarks(
    sources: Iterable[tuple[str, str | os.PathLike[str], int | None]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
) -> tuple[list[BenchItem], list[tuple[str, LoadReport]]]:
    """The questions of every (name, path, limit) in order, and each load's (name, report):
    what `gmai-rl eval --benchmark` and a run's `eval.benchmarks` load."""
    items: list[BenchItem] = []
    reports: list[tuple[str, LoadReport]] = []
    for name, path, limit in sources:
        loaded, report = load_benchmark(
            name, path, cache_dir=cache_dir, on_error=on_error, limit=limit
        )
        items += loaded
        reports.append((name, report))
    return items, reports


_CHECK_THREADS = min(8, os.cpu_count() or 1)
_CHECK_WINDOW = 64 * _CHECK_THREADS
"""Rows read ahead of the one being finished: the images being checked meanwhile."""


def _collect(
    rows: Iterable[Row],
    ctx: ReadContext,
    on_error: OnError,
    limit: int | None,
    report: LoadReport,
) -> list[BenchItem]:
    """Check the images of every row on a thread pool a window ahead, then finish the rows in
    order: ids unique, `on_error` applied, at most `limit` items."""
    kept: list[tuple[int, BenchItem]] = []
    first_seen: dict[str, str] = {}  # id -> location
    checks: dict[str, Future[RecordError | None]] = {}  # questions share images
    window: deque[Row] = deque()
    cache: ImageCheckCache | None = None

    def check(path: str) -> RecordError | None:
        return image_problem(path) if cache is None else cache.check(path, image_problem)

    def finish(row: Row) -> None:
        bench_item = admit(row.result, row.location, first_seen, checks, on_error, report)
        if bench_item is not None:
            kept.append((row.order, bench_item))

    def ahead() -> int:
        return _CHECK_WINDOW if limit is None else max(1, min(_CHECK_WINDOW, limit - len(kept)))

    iterator = iter(rows)
    with ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="bench-image-check") as pool:
        try:
            while limit is None or len(kept) < limit:
                while len(window) < ahead() and (row := next(iterator, None)) is not None:
                    if isinstance(row.result, BenchItem):
                        if cache is None and (file := ctx.checks_file) is not None:
                            cache = ImageCheckCache(file)
                        for image in row.result.images:
                            if image not in checks:
                                checks[image] = pool.submit(check, image)
                    window.append(row)
                if not window:
                    break
                finish(window.popleft())
        finally:
            pool.shutdown(cancel_futures=True)
            if cache is not None:
                cache.save()  # also when a bad row stopped the load: the passes hold
            if isinstance(iterator, Iterator) and hasattr(iterator, "close"):
                iterator.close()  # a limit stops reading: release the reader's open file
    report.loaded = len(kept)
    logger.log(logging.WARNING if report.skipped_total else logging.INFO, "%s", report.summary())
    return [bench_item for _, bench_item in sorted(kept, key=lambda pair: pair[0])]
