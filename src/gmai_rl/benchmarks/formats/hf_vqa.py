"""VQA-RAD and PathVQA as Hugging Face datasets (flaviagiammarino/vqa-rad, flaviagiammarino/path-vqa).

`path` is one of:
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (read with
  `datasets.load_from_disk`; a DatasetDict's "test" split);
- a folder of parquet files, such as a hub snapshot with `data/test-00000-of-00001.parquet`
  (every `test-*.parquet` or `test.parquet` under it), or one parquet file (read with pyarrow:
  no `datasets` cache is written);
- for PathVQA, also VLMEvalKit's short-answer TSV (PathVQA_TEST.tsv: no options).

Columns: `image` (an image feature: {"bytes", "path"}), `question`, `answer`. An answer that is
"yes" or "no" (any case) is a closed question, anything else open, as MedEvalKit splits them; the
answer text is kept as written. Images are written once into the cache folder, named by a hash of
their bytes (many questions share one image). The datasets have no id column: an item's id is its
0-based row in the test split (over the shards in name order).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gmai_rl.benchmarks.formats.common import ReadContext, Row, closed_or_open, item, text
from gmai_rl.benchmarks.formats.vlmeval_tsv import TsvRules, read_tsv
from gmai_rl.benchmarks.images import CACHE_FOLDER
from gmai_rl.benchmarks.items import BenchItem
from gmai_rl.data.records import (
    EMPTY_QUESTION,
    MISSING_IMAGE,
    NO_ANSWER,
    WRONG_TYPE,
    RecordError,
    resolve_image_path,
)

_COLUMNS = ("image", "question", "answer")


def read_hf_vqa(path: Path, ctx: ReadContext) -> Iterator[Row]:
    if path.is_file() and path.suffix == ".tsv":
        yield from read_tsv(path, ctx, TsvRules(without_options="closed_or_open"))
    elif path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json")
    ):
        yield from _saved_rows(path, ctx)
    else:
        yield from _parquet_rows(path, ctx)


def _saved_rows(folder: Path, ctx: ReadContext) -> Iterator[Row]:
    import datasets  # heavy; only this layout needs it

    loaded = datasets.load_from_disk(str(folder))
    label = str(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if "test" not in loaded:
            raise ctx.wrong_path(folder, f"its splits are {', '.join(loaded)}; no 'test'")
        loaded, label = loaded["test"], f"{folder}[test]"
    _check_columns(list(loaded.column_names), label)
    if isinstance(loaded.features.get("image"), datasets.Image):
        loaded = loaded.cast_column("image", datasets.Image(decode=False))
    for index, record in enumerate(loaded):
        yield Row(f"{label} row {index}", _item(record, index, folder, folder, ctx), index)


def _parquet_rows(path: Path, ctx: ReadContext) -> Iterator[Row]:
    import pyarrow.parquet as pq

    if path.is_file() and path.suffix == ".parquet":
        files = [path]
    elif path.is_dir():
        found = {*path.glob("**/test-*.parquet"), *path.glob("**/test.parquet")}
        files = sorted(f for f in found if CACHE_FOLDER not in f.parts)
    else:
        files = []
    if not files:
        raise ctx.wrong_path(path)
    index = 0
    for file in files:
        parquet = pq.ParquetFile(file)
        _check_columns(parquet.schema_arrow.names, str(file))
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=list(_COLUMNS)):
            for record in batch.to_pylist():
                location = f"{file} row {row}"
                yield Row(location, _item(record, index, path, file.parent, ctx), index)
                row += 1
                index += 1


def _check_columns(names: list[str], label: str) -> None:
    missing = [name for name in _COLUMNS if name not in names]
    if missing:
        raise ValueError(
            f"{label}: no column {', '.join(missing)}; expected image, question, answer "
            f"(columns: {', '.join(names)})"
        )


def _item(
    record: Mapping[str, Any], index: int, source: Path, folder: Path, ctx: ReadContext
) -> BenchItem | RecordError:
    """`source`: what the user pointed at (the cache goes beside it); `folder`: where relative
    image paths start."""
    try:
        question = text(record.get("question"), "question", EMPTY_QUESTION)
        answer = text(record.get("answer"), "answer", NO_ANSWER)
        kind, fields = closed_or_open(answer)
        image = _image(record.get("image"), source, folder, ctx)
        return item(
            benchmark=ctx.benchmark,
            id=str(index),
            question=question,
            kind=kind,
            answer=answer,
            images=(image,),
            fields=fields,
            source=f"{ctx.benchmark}:test:{index}",
        )
    except RecordError as error:
        return error


def _image(value: object, source: Path, folder: Path, ctx: ReadContext) -> str:
    """The file of an image cell: its bytes written to the cache, or the file its path names."""
    if isinstance(value, Mapping):
        data, ref = value.get("bytes"), value.get("path")
    else:
        data, ref = (value, None) if isinstance(value, bytes) else (None, value)
    if isinstance(data, bytes) and data:
        return ctx.image_store(source).from_bytes(data)
    if isinstance(ref, str) and ref.strip():
        return resolve_image_path(ref.strip(), os.path.abspath(folder))
    if data is None and ref is None:
        raise RecordError(MISSING_IMAGE, "the row has no image")
    raise RecordError(WRONG_TYPE, f"'image' holds neither bytes nor a path: {type(value).__name__}")
