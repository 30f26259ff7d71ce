"""Offline loaders of medical VQA benchmarks (`gmai_rl.benchmarks.loaders`), on tiny fixtures of
every format (`tests/benchmark_fixtures.py`) with real PNG/JPEG images.

Each format: its rows load with the fields it has, its bad rows raise `DataError` naming the file
and row under on_error="raise" and are counted under "skip", and nothing else is lost. Base64 and
parquet images are decoded once: a second load neither writes nor checks them again. Also: the
training loader reads GMAI-Reasoning10K records as published.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmark_fixtures import (
    BAD_BASE64,
    WRITERS,
    Fixture,
    _write_tsv,
    image_base64,
    write_gmai_mmbench,
    write_gmai_reasoning10k,
    write_medxpertqa,
    write_mmmu,
    write_omnimedvqa,
    write_path_vqa,
    write_pmc_vqa,
    write_slake,
    write_vlmeval_mcq,
    write_vqa_rad,
)
from gmai_rl.benchmarks import loaders
from gmai_rl.benchmarks.images import CACHE_FOLDER, ImageStore
from gmai_rl.benchmarks.items import (
    ANSWER_TYPE,
    CATEGORY,
    L2_CATEGORY,
    LANGUAGE,
    MODALITY,
    QUESTION_TYPE,
    SUBJECT,
    BenchItem,
    Kind,
)
from gmai_rl.benchmarks.loaders import BENCHMARKS, load_benchmark
from gmai_rl.data.admission import DataError, LoadReport, OnError
from gmai_rl.data.loader import load_mcq_jsonl_with_report

NAMES = ["gmai-mmbench", "omnimedvqa", "vqa-rad", "slake", "path-vqa", "pmc-vqa", "mmmu-med",
         "medxpertqa-mm", "vlmeval-mcq"]  # fmt: skip
LOCATION = re.compile(r"(:\d+| row \d+)$")
"""A bad row's location ends in its row: "file.tsv:7" or "<folder> row 3"."""


def load(
    fixture: Fixture, tmp_path: Path, on_error: OnError = "raise", limit: int | None = None
) -> tuple[list[BenchItem], LoadReport]:
    """The fixture loaded with its image cache in tmp_path/cache."""
    cache = tmp_path / "cache"
    return load_benchmark(
        fixture.benchmark, fixture.path, cache_dir=cache, on_error=on_error, limit=limit
    )


def count_calls(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, path_at: int = 0
) -> list[str]:
    """The image path (argument `path_at`) of every call of `owner.name` from now on."""
    calls: list[str] = []
    original = getattr(owner, name)

    def counted(*args: Any) -> Any:
        calls.append(args[path_at])
        return original(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls


def by_id(items: list[BenchItem]) -> dict[str, BenchItem]:
    return {item.id: item for item in items}


# ---------------------------------------------------------------------------------------------
# Every format


def test_the_benchmarks_are_named_as_the_cli_takes_them() -> None:
    assert sorted(BENCHMARKS) == sorted(NAMES) == sorted(WRITERS)
    with pytest.raises(
        ValueError, match=r"unknown benchmark 'vqarad'; known: gmai-mmbench, .*slake"
    ):
        load_benchmark("vqarad", ".")


@pytest.mark.parametrize("name", NAMES)
def test_each_format_loads_its_rows_and_counts_its_bad_ones(name: str, tmp_path: Path) -> None:
    fixture = WRITERS[name](tmp_path / "data")
    items, report = load(fixture, tmp_path, on_error="skip")

    assert len(items) == report.loaded == fixture.good
    assert report.skipped == fixture.bad
    assert all(item.benchmark == name and item.images for item in items)
    assert all(
        Path(image).is_absolute() and Path(image).is_file() for i in items for image in i.images
    )
    assert len({item.id for item in items}) == len(items)
    for examples in report.examples.values():
        assert all(LOCATION.search(example.split(": ", 1)[0]) for example in examples)

    with pytest.raises(DataError) as raised:
        load(fixture, tmp_path, on_error="raise")
    assert raised.value.reason == fixture.first_bad
    assert LOCATION.search(raised.value.location), raised.value.location
    assert Path(fixture.path).name in raised.value.location


@pytest.mark.parametrize("name", NAMES)
def test_each_format_without_bad_rows_loads_whole_under_raise(name: str, tmp_path: Path) -> None:
    fixture = WRITERS[name](tmp_path / "data", bad_rows=False)
    items, report = load(fixture, tmp_path)
    assert len(items) == fixture.good and not report.skipped


def test_a_wrong_path_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"slake: expected a folder with test\.json and imgs/"
    ):
        load_benchmark("slake", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("vqa-rad", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pmc-vqa: expected a PMC-VQA CSV"):
        load_benchmark("pmc-vqa", tmp_path)
    (tmp_path / "MM").mkdir()
    (tmp_path / "MM" / "test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        load_benchmark("medxpertqa-mm", tmp_path)


def test_loaders_import_no_heavy_framework() -> None:
    code = (
        "import sys, gmai_rl.benchmarks.loaders; "
        "heavy = [m for m in ('datasets', 'pyarrow', 'pandas', 'torch', 'ray') if m in sys.modules]; "
        "sys.exit(str(heavy) if heavy else None)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# VLMEvalKit TSVs and the image cache


def test_vlmeval_tsv_shared_multi_and_forward_images(tmp_path: Path) -> None:
    items, _ = load(write_vlmeval_mcq(tmp_path, bad_rows=False), tmp_path)
    rows = by_id(items)

    assert [item.id for item in items] == ["1", "2", "3", "4", "5", "6"]  # file order, row 5 waited
    assert rows["2"].images == rows["1"].images  # `image` = "1": row 1's image
    assert rows["5"].images == rows["6"].images  # a later row's image
    assert [Path(p).suffix for p in rows["3"].images] == [".png", ".jpg"]  # a stringified list
    assert rows["1"].hint == "An abdominal CT." and rows["4"].hint is None
    assert rows["2"].options == {"A": "Yes", "B": "No"}  # empty C, D: absent
    assert rows["1"].kind is Kind.MCQ and rows["1"].answer == "A"
    assert rows["1"].fields == {CATEGORY: "lesion", L2_CATEGORY: "diagnosis", "split": "dev"}
    assert rows["1"].source == "vlmeval_mcq.tsv:1"
    assert rows["1"].as_mcq().question == "An abdominal CT.\nWhich organ is shown?"


def test_base64_is_decoded_once_and_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixture = write_vlmeval_mcq(tmp_path, bad_rows=False)
    writes = count_calls(monkeypatch, ImageStore, "_write", path_at=1)  # (self, path, data)
    checks = count_calls(monkeypatch, loaders, "image_problem")

    first, _ = load(fixture, tmp_path)
    files = sorted((tmp_path / "cache").glob("*.*"))
    stamps = {file: file.stat().st_mtime_ns for file in files}
    assert len(writes) == len(checks) == 5  # rows 1, 3 (two), 4, 6; rows 2 and 5 share theirs
    assert {Path(w) for w in writes} < set(files)  # + the record of passed checks

    writes.clear()
    checks.clear()
    second, _ = load(fixture, tmp_path)
    assert second == first
    assert writes == [] and checks == []
    assert {file: file.stat().st_mtime_ns for file in files} == stamps


def test_a_changed_row_gets_a_new_image_file(tmp_path: Path) -> None:
    columns = ["index", "question", "A", "B", "answer", "image"]
    row = {"index": "1", "question": "Which?", "A": "x", "B": "y", "answer": "A"}
    path = _write_tsv(tmp_path / "q.tsv", columns, [{**row, "image": image_base64()}])
    (before,), _ = load_benchmark("vlmeval-mcq", path)
    _write_tsv(path, columns, [{**row, "image": image_base64()}])
    (after,), _ = load_benchmark("vlmeval-mcq", path)
    assert before.images != after.images
    assert Path(before.images[0]).parent == tmp_path / CACHE_FOLDER / "q"  # beside the TSV


def test_tsv_bad_rows_of_every_kind(tmp_path: Path) -> None:
    columns = ["index", "question", "A", "B", "answer", "image"]
    good = {"question": "Which?", "A": "x", "B": "y", "answer": "A"}
    path = _write_tsv(
        tmp_path / "bad.tsv",
        columns,
        [
            {**good, "index": "1", "image": image_base64()},
            {**good, "index": "1", "image": image_base64()},  # the same index again
            {**good, "index": "2", "image": "99"},  # refers to no row
            {**good, "index": "3", "image": "4"},  # shares a bad image
            {**good, "index": "4", "image": BAD_BASE64},
            {**good, "index": "5", "question": "", "image": image_base64()},
            {**good, "index": "6", "answer": "", "image": image_base64()},
            {**good, "index": "7", "answer": "x", "image": image_base64()},  # not a letter
            {**good, "index": "8", "A": "", "B": "", "image": image_base64()},  # no options
            {**good, "index": "9", "B": "X ", "A": "x", "image": image_base64()},  # same text twice
        ],
    )
    with path.open("a") as file:
        file.write("10\tshort row\n")
    items, report = load_benchmark("vlmeval-mcq", path, on_error="skip")
    assert [item.id for item in items] == ["1"]
    assert report.skipped == {
        "duplicate_id": 1,
        "bad_image_reference": 1,
        "unreadable_image": 2,
        "empty_question": 1,
        "no_answer": 1,
        "bad_answer": 1,
        "no_options": 1,
        "bad_options": 1,
        "malformed_row": 1,
    }
    assert any(
        "shares the image of index '4' (data row 5)" in e
        for e in report.examples["unreadable_image"]
    )


def test_limit_stops_at_the_first_questions(tmp_path: Path) -> None:
    fixture = write_vlmeval_mcq(tmp_path)  # its bad rows come last
    items, report = load(fixture, tmp_path, limit=2)
    assert [item.id for item in items] == ["1", "2"] and report.loaded == 2
    with pytest.raises(ValueError, match="limit"):
        load(fixture, tmp_path, limit=0)


def test_gmai_mmbench_breakdowns(tmp_path: Path) -> None:
    items, _ = load(write_gmai_mmbench(tmp_path, bad_rows=False), tmp_path)
    assert [item.fields[MODALITY] for item in items] == ["ct", "mri", "x_ray"]
    assert items[1].fields["clinical_vqa_task"] == "Organ Recognition"
    assert items[1].fields["department"] == "Neurology"
    assert items[1].fields["perceptual_granularity"] == "Box Level"
    assert list(items[1].options) == ["A", "B", "C", "D", "E"]


def test_gmai_mmbench_test_split_has_no_answers_and_says_so(tmp_path: Path) -> None:
    fixture = write_gmai_mmbench(tmp_path, split="TEST")
    with pytest.raises(
        DataError, match=r"TEST split ships without answers.*GMAI-MMBench_VAL"
    ) as raised:
        load(fixture, tmp_path, on_error="skip")
    assert raised.value.reason == "no_answer"


def test_mmmu_keeps_medical_subjects_and_rewrites_placeholders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    items, _ = load(write_mmmu(tmp_path, bad_rows=False), tmp_path)
    rows = by_id(items)

    assert sorted(rows) == ["1", "2", "3", "5", "7"]  # 4 is Art
    assert "left out 1 rows: MMMU subjects other than the medical ones" in caplog.text
    assert [rows[i].fields[SUBJECT] for i in ("1", "2", "3", "5")] == [
        "Clinical_Medicine", "Basic_Medical_Science", "Pharmacy", "Public_Health"]  # fmt: skip
    assert rows["2"].question == "Compare (image 1) and (image 2)."
    assert rows["2"].options == {"A": "(image 1) is larger", "B": "(image 2) is larger"}
    assert len(rows["2"].images) == 2
    assert rows["3"].kind is Kind.OPEN and rows["3"].answer == "42 mg" and not rows["3"].options
    assert "id" not in rows["1"].fields
    assert Path(rows["7"].images[0]).name.startswith("4-")  # the Art row's image, second pass


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_vqa_rad_closed_and_open(layout: str, tmp_path: Path) -> None:
    items, _ = load(write_vqa_rad(tmp_path, layout=layout, bad_rows=False), tmp_path)  # type: ignore[arg-type]
    assert [(item.kind, item.answer, item.fields[ANSWER_TYPE]) for item in items] == [
        (Kind.CLOSED, "yes", "closed"),
        (Kind.CLOSED, "No", "closed"),
        (Kind.OPEN, "left lung", "open"),
    ]  # the train shard/split is not read
    assert items[0].images == items[1].images  # one image, written once
    assert len(list((tmp_path / "cache").glob("*.*g"))) == 2


def test_path_vqa_as_vlmeval_short_answer_tsv(tmp_path: Path) -> None:
    items, _ = load(write_path_vqa(tmp_path, layout="tsv", bad_rows=False), tmp_path)
    assert [item.kind for item in items] == [Kind.CLOSED, Kind.OPEN, Kind.OPEN]
    assert items[0].fields == {ANSWER_TYPE: "closed"}


# ---------------------------------------------------------------------------------------------
# Folders of JSON/CSV and images


def test_slake_fields(tmp_path: Path) -> None:
    items, _ = load(write_slake(tmp_path, bad_rows=False), tmp_path)
    rows = by_id(items)
    assert [rows[q].kind for q in ("11", "12", "13", "14")] == [
        Kind.CLOSED,
        Kind.OPEN,
        Kind.CLOSED,
        Kind.OPEN,
    ]
    assert rows["12"].fields == {MODALITY: "x_ray", LANGUAGE: "zh", QUESTION_TYPE: "Organ",
                                 ANSWER_TYPE: "open", "location": "Lung"}  # fmt: skip
    assert rows["13"].answer == "Left" and rows["14"].fields[MODALITY] == "mri"
    items_from_file, _ = load_benchmark("slake", tmp_path / "SLAKE" / "test.json")
    assert items_from_file == items


@pytest.mark.parametrize("version", [1, 2])
def test_pmc_vqa_strips_choice_prefixes(version: int, tmp_path: Path) -> None:
    items, _ = load(write_pmc_vqa(tmp_path, version=version, bad_rows=False), tmp_path)  # type: ignore[arg-type]
    assert items[0].options == {"A": "Diffuse", "B": "Focal", "C": "No uptake", "D": "Cannot tell"}
    assert [item.answer for item in items] == ["B", "D", "A"]
    assert Path(items[0].images[0]).parent.name == ("figures" if version == 2 else "images")


def test_omnimedvqa_maps_the_gold_text_to_its_letter(tmp_path: Path) -> None:
    items, _ = load(write_omnimedvqa(tmp_path, bad_rows=False), tmp_path)
    rows = by_id(items)
    assert [(rows[q].answer, rows[q].fields[MODALITY]) for q in ("ACRIMA_0001", "CT_0001", "H_0001")] == [
        ("B", "fundus"), ("B", "ct"), ("B", "mri")]  # fmt: skip
    assert rows["CT_0001"].options == {"A": "Heart", "B": "Lung", "C": "Liver"}
    assert rows["H_0001"].fields["access"] == "restricted"
    assert rows["ACRIMA_0001"].fields[QUESTION_TYPE] == "Disease Diagnosis"
    tsv = write_vlmeval_mcq(tmp_path / "tsv", bad_rows=False)  # VLMEvalKit's OmniMedVQA TSV
    assert len(load_benchmark("omnimedvqa", tsv.path)[0]) == tsv.good


def test_medxpertqa_cuts_the_inline_choices(tmp_path: Path) -> None:
    fixture = write_medxpertqa(tmp_path, bad_rows=False)
    items, _ = load(fixture, tmp_path)
    assert items[0].question == "A 70-year-old woman has a rash. What is the diagnosis?"
    assert items[1].question == "Which finding do the two images share?"
    assert len(items[1].images) == 2 and items[0].answer == "C"
    assert items[0].fields == {QUESTION_TYPE: "Reasoning", "medical_task": "Diagnosis",
                               "body_system": "Integumentary"}  # fmt: skip
    assert load_benchmark("medxpertqa-mm", fixture.path / "MM" / "test.jsonl")[0] == items


def test_plain_image_files_are_checked_once_with_a_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixture = write_slake(tmp_path, bad_rows=False)
    checks = count_calls(monkeypatch, loaders, "image_problem")
    load(fixture, tmp_path)
    assert len(checks) == 2
    load(fixture, tmp_path)
    assert len(checks) == 2


# ---------------------------------------------------------------------------------------------
# The training loader on GMAI-Reasoning10K as published


def test_training_loader_reads_gmai_reasoning10k_records(tmp_path: Path) -> None:
    path = write_gmai_reasoning10k(tmp_path)
    items, report = load_mcq_jsonl_with_report(path)
    assert report.loaded == 2 and not report.skipped
    assert [(i.answer, i.modality) for i in items] == [("B", "mri"), ("A", "ultrasound")]
    assert items[0].options == {"A": "Glioma", "B": "Meningioma", "C": "No tumour"}
    assert items[0].question == "Which abnormality is visible?"
    assert items[0].images == (str(path.parent / "2d" / "cls" / "mri" / "brain_001.png"),)
