"""Load multiple-choice questions from JSON Lines files or `datasets`, validating every record.

`load_mcq_jsonl` reads the record formats described in `gmai_rl.data.records` (GMAI-Reasoning10K
conversations, MM-EUREKA chat messages, the project's plain form), detected per record, and
checks each record: JSON, fields and types, options, answer among the options, images present,
inside the image root when referenced by a relative path, and decodable by PIL to the last pixel
(`image_problem`: truncated or corrupt files, non-images, decompression bombs, 16-bit and float
modes are refused), and ids unique within the load. A record without an `id` gets "<file stem>-<line>".
With `image_cache` (a file, `gmai_rl.data.image_checks`) an image that passed before and is
unchanged since is not decoded again.

Failures raise `DataError` naming the file, the 1-based line and the reason. With
`on_error="skip"` bad records are skipped instead, counted by reason in a `LoadReport` and logged
once as a warning naming the counts and the first few locations of each reason. Only blank lines
are skipped silently. Duplicate ids are an error naming both lines (skipping keeps the first).

`load_mcq_dataset` does the same through Hugging Face `datasets` for a local JSONL file, a local
dataset folder (e.g. a GMAI-Reasoning10K snapshot, whose README declares the configs
`reasoning_mcq_rl` and `reasoning_mcq_sft`) or a hub name; errors name the row index (0-based,
as in `dataset[i]`) instead of a line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmai_rl.data.admission import LoadReport, OnError, admit
from gmai_rl.data.image_checks import ImageCheckCache
from gmai_rl.data.records import (
    IMAGE_TOO_LARGE,
    INVALID_JSON,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    UNSUPPORTED_IMAGE_MODE,
    RecordError,
    parse_record,
)
from gmai_rl.types import MCQItem

logger = logging.getLogger(__name__)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_mcq_jsonl(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    *,
    check_images: bool = True,
    on_record: Callable[[], None] | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> list[MCQItem]:
    """The questions in a JSON Lines file; see the module docstring and `load_mcq_jsonl_with_report`."""
    items, _ = load_mcq_jsonl_with_report(
        path,
        image_root,
        on_error,
        check_images=check_images,
        on_record=on_record,
        image_cache=image_cache,
    )
    return items


def load_mcq_jsonl_with_report(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    *,
    check_images: bool = True,
    on_record: Callable[[], None] | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> tuple[list[MCQItem], LoadReport]:
    """The questions in a JSON Lines file and the report of what was skipped.

    Args:
        path: the JSONL file.
        image_root: folder that relative image paths start from; default: the file's folder.
        on_error: "raise" a `DataError` at the first bad record, or "skip" bad records.
        check_images: decode every image with PIL; off only for trusted data on slow disks.
        on_record: called after each non-blank line, loaded or skipped (progress of a long load).
        image_cache: a file recording the images that passed (`gmai_rl.data.image_checks`): an
            image recorded there and unchanged since is not decoded again. None: decode all.
    """
    jsonl = Path(path)
    if not jsonl.is_file():
        raise FileNotFoundError(f"no such JSONL file: {jsonl}")
    root = os.path.abspath(image_root if image_root is not None else jsonl.parent)
    report = LoadReport(source=str(jsonl))
    items = _collect(
        _jsonl_records(jsonl), root, on_error, check_images, report, on_record, image_cache
    )
    return items, report


def load_mcq_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    config: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    *,
    check_images: bool = True,
    revision: str | None = None,
    cache_dir: str | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> list[MCQItem]:
    """The questions of a dataset loaded through `datasets`; see `load_mcq_dataset_with_report`."""
    items, _ = load_mcq_dataset_with_report(
        name_or_path,
        split,
        config,
        image_root,
        on_error,
        check_images=check_images,
        revision=revision,
        cache_dir=cache_dir,
        image_cache=image_cache,
    )
    return items


def load_mcq_dataset_with_report(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    config: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
    *,
    check_images: bool = True,
    revision: str | None = None,
    cache_dir: str | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> tuple[list[MCQItem], LoadReport]:
    """The questions of a dataset loaded through `datasets`, and the report of what was skipped.

    Args:
        name_or_path: a local JSONL file, a local dataset folder, or a hub dataset name such as
            "General-Medical-AI/GMAI-Reasoning10K" (downloaded whole with
            `huggingface_hub.snapshot_download`, images included, because records name their
            images by paths relative to the dataset folder). A folder is read as its dataset
            card's `configs` declare; without such a card, from the JSONL file named by `config`
            (or its only JSONL file).
        split: the split to read ("train" for a single file or a config without splits).
        config: the dataset config, e.g. "reasoning_mcq_rl" or "reasoning_mcq_sft".
        image_root: folder that relative image paths start from; default: the file's folder,
            the dataset folder or the downloaded snapshot.
        on_error, check_images, image_cache: as in `load_mcq_jsonl_with_report`.
        revision: hub revision (branch, tag or commit) to download.
        cache_dir: where `datasets` caches the prepared tables.

    Rows whose columns `datasets` cannot unify (e.g. `image` a string in one row and a list in
    another) make `datasets` itself fail; `load_mcq_jsonl` reads such files record by record.
    """
    import datasets  # heavy; only this path needs it

    local = Path(name_or_path).expanduser()
    id_prefix = config or local.stem
    if local.is_file():
        dataset = datasets.load_dataset(
            "json", data_files={split: str(local)}, split=split, cache_dir=cache_dir
        )
        folder, label = local.parent, str(local)
    else:
        folder = local if local.is_dir() else _download_snapshot(str(name_or_path), revision)
        dataset = _load_folder(folder, config, split, cache_dir)
        label = ":".join(part for part in (str(name_or_path), config, split) if part)
        id_prefix = config or Path(str(name_or_path)).name
    root = os.path.abspath(image_root if image_root is not None else folder)
    rows = _dataset_records(_undecoded_images(dataset), label, id_prefix)
    report = LoadReport(source=label)
    items = _collect(rows, root, on_error, check_images, report, image_cache=image_cache)
    return items, report


# ---------------------------------------------------------------------------------------------
# Reading raw records


@dataclass(frozen=True)
class _RawRecord:
    location: str
    """For errors: "file.jsonl:12" or "<dataset> row 11"."""
    source: str
    """For `MCQItem.source`: "file.jsonl:12" or "<dataset>:11"."""
    default_id: str
    record: Any = None
    problem: RecordError | None = None
    """Set when the record could not even be read (broken JSON, bad encoding)."""


def _jsonl_records(path: Path) -> Iterator[_RawRecord]:
    # Binary lines and per-line decoding: one badly encoded line is one bad record, not a crash.
    with path.open("rb") as lines:
        for number, raw_line in enumerate(lines, start=1):
            if not raw_line.strip():
                continue
            record, problem = _decode_line(raw_line)
            yield _RawRecord(
                location=f"{path}:{number}",
                source=f"{path.name}:{number}",
                default_id=f"{path.stem}-{number}",
                record=record,
                problem=problem,
            )


def _decode_line(raw_line: bytes) -> tuple[Any, RecordError | None]:
    try:
        line = raw_line.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        return None, RecordError(INVALID_JSON, f"not UTF-8: {error}")
    try:
        return json.loads(line), None
    except json.JSONDecodeError as error:
        detail = f"broken JSON: {error.msg} at column {error.colno}"
        if line.strip() in ("[", "{"):
            detail += " (is this a pretty-printed JSON file rather than JSON Lines?)"
        return None, RecordError(INVALID_JSON, detail)


def _dataset_records(dataset: Any, label: str, id_prefix: str) -> Iterator[_RawRecord]:
    for index, row in enumerate(dataset):
        yield _RawRecord(
            location=f"{label} row {index}",
            source=f"{label}:{index}",
            default_id=f"{id_prefix}-{index}",
            record=row,
        )


def _download_snapshot(name: str, revision: str | None) -> Path:
    if not _HUB_NAME.match(name) or name.endswith((".jsonl", ".json")):
        raise FileNotFoundError(f"{name!r} is neither a local file or folder nor a hub dataset")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=name, repo_type="dataset", revision=revision))


def _load_folder(folder: Path, config: str | None, split: str, cache_dir: str | None) -> Any:
    """A dataset folder's split: as its card's `configs` declare, else from its one JSONL file.

    Without declared configs, `datasets` would infer the builder from the commonest file type,
    and a folder of images next to a JSONL file would load as an image-classification dataset.
    """
    import datasets

    if _card_declares_configs(folder / "README.md"):
        return datasets.load_dataset(str(folder), config, split=split, cache_dir=cache_dir)
    candidates = sorted(folder.glob("*.jsonl"))
    chosen = [path for path in candidates if config is None or path.stem == config]
    if len(chosen) != 1:
        names = ", ".join(path.stem for path in candidates) or "none"
        raise FileNotFoundError(
            f"{folder}: no dataset card declares configs, so config must name one of its "
            f"JSONL files ({names}); got config={config!r}"
        )
    return datasets.load_dataset(
        "json", data_files={split: str(chosen[0])}, split=split, cache_dir=cache_dir
    )


def _card_declares_configs(readme: Path) -> bool:
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    front_matter = (
        text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    )
    return re.search(r"(?m)^configs:", front_matter) is not None


def _undecoded_images(dataset: Any) -> Any:
    """The dataset with image columns as {"path", "bytes"} instead of decoded PIL images.

    A dataset card may declare `image` with dtype image; decoding every image just to read its
    path back would be slow, and relative paths would be resolved against the working directory.
    """
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


# ---------------------------------------------------------------------------------------------
# Validation


def _collect(
    raws: Iterable[_RawRecord],
    image_root: str,
    on_error: OnError,
    check_images: bool,
    report: LoadReport,
    on_record: Callable[[], None] | None = None,
    image_cache: str | os.PathLike[str] | None = None,
) -> list[MCQItem]:
    """Parse and check every record, in order. Images are decoded by a thread pool a bounded
    window of records ahead of the one being finished (PIL's decoders release the GIL), so a
    large dataset's check runs on every core while errors still come in file order; those that
    `image_cache` records as passed, unchanged since, are not decoded again."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    cache = ImageCheckCache(image_cache) if check_images and image_cache is not None else None
    check: Callable[[str], RecordError | None] = (
        image_problem if cache is None else functools.partial(cache.check, check=image_problem)
    )
    items: list[MCQItem] = []
    first_seen: dict[str, str] = {}  # id -> location
    checks: dict[str, Future[RecordError | None]] = {}  # many questions share an image
    window: deque[tuple[_RawRecord, MCQItem | RecordError]] = deque()

    def finish(raw: _RawRecord, parsed: MCQItem | RecordError) -> None:
        kept = admit(
            parsed, raw.location, first_seen, checks if check_images else None, on_error, report
        )
        if kept is not None:
            items.append(kept)
        if on_record is not None:
            on_record()

    with ThreadPoolExecutor(_IMAGE_CHECK_THREADS, thread_name_prefix="image-check") as pool:
        try:
            for raw in raws:
                parsed = _parse(raw, image_root)
                if check_images and isinstance(parsed, MCQItem):
                    for image in parsed.images:
                        if image not in checks:
                            checks[image] = pool.submit(check, image)
                window.append((raw, parsed))
                if len(window) > _IMAGE_CHECK_WINDOW:
                    finish(*window.popleft())
            while window:
                finish(*window.popleft())
        finally:
            pool.shutdown(cancel_futures=True)  # a raised error leaves checks queued
            if cache is not None:
                cache.save()  # also when a bad record stopped the load: the passes hold
    report.loaded = len(items)
    if cache is not None:
        logger.info(
            "%s: %d images decoded, %d more known good from %s",
            report.source,
            cache.decoded,
            cache.hits,
            cache.file,
        )
    logger.log(logging.WARNING if report.skipped_total else logging.INFO, "%s", report.summary())
    return items


def _parse(raw: _RawRecord, image_root: str) -> MCQItem | RecordError:
    if raw.problem is not None:
        return raw.problem
    try:
        return parse_record(
            raw.record, default_id=raw.default_id, source=raw.source, image_root=image_root
        )
    except RecordError as error:
        return error


def image_problem(path: str) -> RecordError | None:
    """Why the image at `path` cannot be used, or None.

    Every pixel is decoded: a file cut short mid-way has a valid header, and would otherwise pass
    here and fail inside a rollout worker's step. An image larger than PIL's decompression-bomb
    limit (`PIL.Image.MAX_IMAGE_PIXELS`, ~89M pixels: PIL warns above it and refuses twice it) is
    refused before decoding; so are modes that do not become RGB faithfully (the model's
    processor converts every image to 8-bit RGB, which clips 16-bit and float pixels above 255).
    """
    from PIL import Image

    if not os.path.exists(path):
        return RecordError(MISSING_IMAGE, f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # Between the limit and twice it PIL only warns; the size check below refuses both.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if (problem := _pixels_problem(path, image.size, image.mode)) is not None:
                    return problem
                image.load()
    except Image.DecompressionBombError as error:
        return RecordError(IMAGE_TOO_LARGE, f"{path}: {error}")
    except Exception as error:  # PIL raises many types for unreadable files
        return RecordError(UNREADABLE_IMAGE, f"PIL cannot decode {path}: {error}")
    return None


def _pixels_problem(path: str, size: tuple[int, int], mode: str) -> RecordError | None:
    from PIL import Image

    width, height = size
    if width <= 0 or height <= 0:
        return RecordError(UNREADABLE_IMAGE, f"image has no pixels: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return RecordError(
            IMAGE_TOO_LARGE,
            f"{path} is {width} x {height} = {width * height:,} pixels, over PIL's "
            f"decompression-bomb limit of {limit:,}: downscale it (the model sees at most its "
            "processor's max_pixels anyway)",
        )
    if mode not in RGB_CONVERTIBLE_MODES:
        return RecordError(
            UNSUPPORTED_IMAGE_MODE,
            f"{path} has PIL mode {mode!r} ({_MODE_HINTS.get(mode, 'not convertible to RGB')}); "
            "the model takes 8-bit images: window or rescale it to 8-bit greyscale or RGB first",
        )
    return None


RGB_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
"""PIL modes whose `convert("RGB")` keeps the picture (8 bits per channel or fewer)."""

_MODE_HINTS = {
    "I;16": "16-bit greyscale: converting to RGB clips every value above 255",
    "I;16B": "16-bit greyscale: converting to RGB clips every value above 255",
    "I;16L": "16-bit greyscale: converting to RGB clips every value above 255",
    "I": "32-bit integer: converting to RGB clips every value above 255",
    "F": "32-bit float: converting to RGB clips and truncates the values",
}

_IMAGE_CHECK_THREADS = min(8, os.cpu_count() or 1)
_IMAGE_CHECK_WINDOW = 64 * _IMAGE_CHECK_THREADS
"""Records parsed ahead of the one being finished: the images being decoded meanwhile."""
