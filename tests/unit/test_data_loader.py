"""Loading MCQ records from JSONL and `datasets`: every format, every rejection, the skip report."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from gmai_rl.data import (
    DataError,
    load_mcq_dataset,
    load_mcq_dataset_with_report,
    load_mcq_jsonl,
    load_mcq_jsonl_with_report,
)
from gmai_rl.data.records import parse_record
from gmai_rl.types import MCQItem

# The two records of shared/examples/gmai_reasoning10k/sample.jsonl, one per dataset config.
GMAI_SAMPLE = Path(__file__).parent / "data" / "gmai_reasoning10k_sample.jsonl"
GMAI_IMAGES = ("images/2d/cls/mri/brain_042.png", "images/2d/cls/ultrasound/thyroid_007.png")


def draw_png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 128).save(path)
    return path


def write_jsonl(path: Path, *lines: object) -> Path:
    """One line per argument: strings are written as they are, anything else as JSON."""
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def gmai(question: str, reply: str | None, image: object = "img.png", **extra: object) -> dict:
    """A GMAI-Reasoning10K-shaped record; `extra` adds keys such as id, answer, options."""
    turns = [{"from": "human", "value": question}]
    if reply is not None:
        turns.append({"from": "gpt", "value": reply})
    record: dict[str, object] = {"conversations": turns, **extra}
    if image is not None:
        record["image"] = image
    return record


MRI_QUESTION = (
    "<image>\nWhat is the most likely finding?\nA. Normal brain\nB. Glioma\nC. Meningioma"
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    draw_png(tmp_path / "img.png")
    draw_png(tmp_path / "img2.png")
    return tmp_path


def load_one(folder: Path, record: object, **kwargs: object) -> MCQItem:
    (item,) = load_mcq_jsonl(write_jsonl(folder / "data.jsonl", record), **kwargs)  # type: ignore[arg-type]
    return item


# ---------------------------------------------------------------------------------------------
# GMAI-Reasoning10K


def test_gmai_sample_records_of_both_configs(tmp_path: Path) -> None:
    for relative in GMAI_IMAGES:
        draw_png(tmp_path / relative)
    rl, sft = load_mcq_jsonl(GMAI_SAMPLE, image_root=tmp_path)
    assert rl == MCQItem(
        id="gmai_reasoning10k_sample-1",
        question="What is the most likely finding in this brain MRI?",
        options={"A": "Normal brain", "B": "Glioma", "C": "Meningioma", "D": "Pituitary tumor"},
        answer="B",
        images=(str(tmp_path / GMAI_IMAGES[0]),),
        modality="mri",
        reasoning=None,
        source="gmai_reasoning10k_sample.jsonl:1",
    )
    assert sft.question == "Is the thyroid nodule in this ultrasound image benign or malignant?"
    assert sft.options == {"A": "Benign", "B": "Malignant"}
    assert sft.answer == "A"
    assert sft.modality == "ultrasound"
    assert sft.reasoning is not None
    assert sft.reasoning.startswith("The nodule is well circumscribed")
    assert "<think>" not in sft.reasoning and "</think>" not in sft.reasoning


def test_relative_images_default_to_the_jsonl_folder(tmp_path: Path) -> None:
    shutil.copy(GMAI_SAMPLE, tmp_path / "rl.jsonl")
    for relative in GMAI_IMAGES:
        draw_png(tmp_path / relative)
    items = load_mcq_jsonl(tmp_path / "rl.jsonl")
    assert [item.images for item in items] == [(str(tmp_path / r),) for r in GMAI_IMAGES]


@pytest.mark.parametrize(
    ("response", "reasoning"),
    [
        ("B", None),
        ("B.", None),
        ("(B)", None),
        ("B. Glioma", None),
        ("<think>Enhancing mass.</think>\n<answer>B</answer>", "Enhancing mass."),
        ("Enhancing mass with oedema.\n<answer>B</answer>", "Enhancing mass with oedema."),
        ("Enhancing mass with oedema. The answer is B.", "Enhancing mass with oedema."),
    ],
)
def test_gmai_answer_turn_shapes(folder: Path, response: str, reasoning: str | None) -> None:
    item = load_one(folder, gmai(MRI_QUESTION, response))
    assert (item.answer, item.reasoning) == ("B", reasoning)


def test_record_id_and_extra_keys(folder: Path) -> None:
    record = gmai(MRI_QUESTION, "C", id=42, source="BraTS", modality="MR", unknown_key=[1])
    item = load_one(folder, record)
    assert (item.id, item.modality, item.answer) == ("42", "mri", "C")


def test_several_images_in_order(folder: Path) -> None:
    record = gmai("<image>\n<image>\n" + MRI_QUESTION.removeprefix("<image>\n"), "A")
    record["image"] = ["img2.png", "img.png"]
    item = load_one(folder, record)
    assert item.images == (str(folder / "img2.png"), str(folder / "img.png"))


def test_text_only_question(folder: Path) -> None:
    item = load_one(folder, gmai(MRI_QUESTION.removeprefix("<image>\n"), "A", image=None))
    assert item.images == ()


def test_conversations_as_columns_and_images_as_dataset_dicts(folder: Path) -> None:
    # The shapes `datasets` hands over for a list-of-structs column and an undecoded image.
    record = {
        "image": {"path": "img.png", "bytes": None},
        "conversations": {"from": ["human", "gpt"], "value": [MRI_QUESTION, "B"]},
    }
    item = parse_record(record, default_id="x", source=None, image_root=str(folder))
    assert (item.answer, item.images) == ("B", (str(folder / "img.png"),))


# ---------------------------------------------------------------------------------------------
# MM-EUREKA and the plain form


def eureka_message(image: str, text: str) -> str:
    return json.dumps(
        [
            {"role": "system", "content": "Solve it."},
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
            },
        ]
    )


@pytest.mark.parametrize("answer", ["B", "\\boxed{B}", "$B$", "Glioma"])
def test_mm_eureka_record(folder: Path, answer: str) -> None:
    text = "What is the most likely finding?\nA. Normal brain\nB. Glioma"
    record = {"id": "e1", "message": eureka_message(f"file://{folder}/img.png", text)}
    item = load_one(folder, {**record, "answer": answer})
    assert (item.id, item.answer, item.images) == ("e1", "B", (str(folder / "img.png"),))
    assert item.question == "What is the most likely finding?"


def test_mm_eureka_relative_file_uri(folder: Path) -> None:
    message = eureka_message("file://img2.png", "Which? (A) Cyst (B) Abscess")
    item = load_one(folder, {"id": "e2", "message": message, "answer": "A"})
    assert item.images == (str(folder / "img2.png"),)


def test_single_slash_file_uri(folder: Path) -> None:
    message = eureka_message(f"file:{folder}/img.png", "Which? (A) Cyst (B) Abscess")
    item = load_one(folder, {"id": "e3", "message": message, "answer": "A"})
    assert item.images == (str(folder / "img.png"),)


def test_mm_eureka_internvl_release_shape(folder: Path) -> None:
    record = {
        "id": "0",
        "conversations": [{"role": "user", "content": "Which? (A) Cyst (B) Abscess"}],
        "answer": "A",
        "image_urls": [f"file://{folder}/img.png"],
    }
    assert load_one(folder, record).images == (str(folder / "img.png"),)


def test_plain_form(folder: Path) -> None:
    record = {
        "id": "p1",
        "question": "Which lesion is shown?",
        "options": ["Cyst", "Abscess", "Tumour"],
        "answer": "Abscess",
        "images": ["img.png"],
        "modality": "CT",
        "reasoning": "<think>Rim enhancement.</think>",
    }
    item = load_one(folder, record)
    assert item == MCQItem(
        id="p1",
        question="Which lesion is shown?",
        options={"A": "Cyst", "B": "Abscess", "C": "Tumour"},
        answer="B",
        images=(str(folder / "img.png"),),
        modality="ct",
        reasoning="Rim enhancement.",
        source="data.jsonl:1",
    )


def test_plain_form_parses_options_from_the_question(folder: Path) -> None:
    record = {"question": "Which lesion?\nA. Cyst\nB. Abscess", "answer": "A"}
    item = load_one(folder, record)
    assert (item.question, item.options, item.images) == (
        "Which lesion?",
        {"A": "Cyst", "B": "Abscess"},
        (),
    )


def test_absolute_image_path_ignores_image_root(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = draw_png(tmp_path_factory.mktemp("elsewhere") / "x.png")
    record = {"question": "Q? (A) x (B) y", "answer": "A", "image": str(elsewhere)}
    assert load_one(folder, record, image_root=folder / "nowhere").images == (str(elsewhere),)


# ---------------------------------------------------------------------------------------------
# Rejections


BAD_RECORDS = [
    ('{"conversations": [', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ({"prompt": "Q?", "answer": "A"}, "unknown_format"),
    (gmai(MRI_QUESTION, None), "no_answer"),
    (gmai(MRI_QUESTION, "<think>Hmm.</think>"), "no_answer"),
    ({"conversations": [{"from": "gpt", "value": "A"}], "image": "img.png"}, "bad_conversation"),
    (
        {"conversations": [{"from": "human", "value": "Q? (A) x (B) y"}] * 2, "answer": "A"},
        "bad_conversation",
    ),
    (gmai("<image>\nWhat is shown?", "A"), "no_options"),
    (gmai("<image>\nWhich?\nA. x\nC. y", "A"), "bad_options"),
    (gmai("<image>\nWhich?\nA. Yes\nB. yes", "A"), "bad_options"),
    (gmai(MRI_QUESTION, "D"), "answer_not_in_options"),
    (gmai(MRI_QUESTION, "B. Meningioma"), "answer_not_in_options"),
    (gmai(MRI_QUESTION, "probably a tumour"), "bad_answer"),
    (gmai(MRI_QUESTION, "B", answer="C"), "conflicting_fields"),
    (gmai(MRI_QUESTION, "B", options=["Normal brain", "Glioma"]), "conflicting_fields"),
    (gmai("<image>\n<image>\n" + MRI_QUESTION, "B"), "conflicting_fields"),
    (gmai(MRI_QUESTION, "B", images=["img.png"]), "conflicting_fields"),
    (gmai("<image>\nA. x\nB. y", "A"), "empty_question"),
    ({"conversations": "Q? (A) x (B) y", "image": "img.png"}, "wrong_type"),
    (gmai(MRI_QUESTION, "B", image=7), "wrong_type"),
    ({"question": "Q? (A) x (B) y", "answer": 1}, "wrong_type"),
    ({"question": "Q? (A) x (B) y", "answer": "A", "id": ""}, "wrong_type"),
    (gmai(MRI_QUESTION, "B", image="https://example.org/x.png"), "bad_image_reference"),
    (gmai(MRI_QUESTION, "B", image=""), "bad_image_reference"),
    (gmai(MRI_QUESTION, "B", image="missing.png"), "missing_image"),
    (gmai(MRI_QUESTION, "B", image="not_an_image.png"), "unreadable_image"),
    ({"id": "e", "message": "[{not json", "answer": "A"}, "invalid_json"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_RECORDS)
def test_bad_record_raises_naming_file_line_and_reason(
    folder: Path, bad: object, reason: str
) -> None:
    (folder / "not_an_image.png").write_text("this is text")
    path = write_jsonl(folder / "data.jsonl", gmai(MRI_QUESTION, "B"), "", bad)
    with pytest.raises(DataError) as raised:
        load_mcq_jsonl(path)
    assert raised.value.reason == reason
    assert raised.value.location == f"{path}:3"
    assert str(raised.value).startswith(f"{path}:3: {reason}: ")
    assert isinstance(raised.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Images: decoded to the last pixel at load, so a bad one stops the load naming its record, not
# a rollout worker in the middle of a step.


def truncated_png(path: Path) -> Path:
    """The first half of a valid PNG: its header reads, its pixels do not."""
    whole = path.with_name("whole.png")
    Image.effect_noise((64, 64), 40).save(whole)  # noise: the compressed data fills the file
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def test_a_truncated_image_stops_the_load_at_its_record(folder: Path) -> None:
    truncated_png(folder / "cut.png")
    records = [gmai(MRI_QUESTION, "B", id=f"q{i}") for i in range(5)]
    path = write_jsonl(folder / "data.jsonl", *records, gmai(MRI_QUESTION, "B", image="cut.png"))
    with pytest.raises(DataError) as raised:
        load_mcq_jsonl(path)
    assert (raised.value.location, raised.value.reason) == (f"{path}:6", "unreadable_image")
    assert "cut.png" in raised.value.detail and "truncated" in raised.value.detail


def test_a_corrupt_image_body_is_unreadable(folder: Path) -> None:
    whole = draw_png(folder / "ok.png", (32, 32))
    data = bytearray(whole.read_bytes())
    data[60:80] = bytes(20)  # inside the image data: the header still parses
    (folder / "corrupt.png").write_bytes(bytes(data))
    item = gmai(MRI_QUESTION, "B", image="corrupt.png")
    with pytest.raises(DataError, match="unreadable_image: PIL cannot decode"):
        load_one(folder, item)


@pytest.mark.parametrize("times_the_limit", [1.5, 3.0])  # PIL warns at 1x and refuses at 2x
def test_an_image_over_the_decompression_bomb_limit_is_refused_before_decoding(
    folder: Path, monkeypatch: pytest.MonkeyPatch, times_the_limit: float
) -> None:
    draw_png(folder / "huge.png", (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / times_the_limit))
    with pytest.raises(DataError) as raised:
        load_one(folder, gmai(MRI_QUESTION, "B", image="huge.png"))
    assert raised.value.reason == "image_too_large"
    assert "huge.png" in raised.value.detail


def test_sixteen_bit_and_float_images_are_refused_with_the_reason(folder: Path) -> None:
    Image.new("I;16", (8, 8), 3000).save(folder / "ct16.png")
    Image.new("F", (8, 8), 0.5).save(folder / "float.tiff")
    for name, words in (("ct16.png", "16-bit greyscale"), ("float.tiff", "32-bit float")):
        with pytest.raises(DataError) as raised:
            load_one(folder, gmai(MRI_QUESTION, "B", image=name))
        assert raised.value.reason == "unsupported_image_mode"
        assert words in raised.value.detail and "8-bit" in raised.value.detail


def test_palette_greyscale_and_rgba_images_load(folder: Path) -> None:
    for mode in ("1", "P", "LA", "RGBA", "CMYK"):
        Image.new(mode, (8, 8)).save(folder / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
        image = f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        assert load_one(folder, gmai(MRI_QUESTION, "B", image=image)).answer == "B"


@pytest.mark.parametrize("ref", ["../img.png", "sub/../../img.png", "file://../img.png"])
def test_a_relative_path_may_not_leave_the_image_root(folder: Path, ref: str) -> None:
    (folder / "data").mkdir()
    with pytest.raises(DataError, match=r"bad_image_reference: .*leaves the image root"):
        load_mcq_jsonl(write_jsonl(folder / "data" / "d.jsonl", gmai(MRI_QUESTION, "B", image=ref)))


def test_a_relative_path_that_stays_inside_the_root_loads(folder: Path) -> None:
    item = load_one(folder, gmai(MRI_QUESTION, "B", image="sub/../img.png"))
    assert item.images == (str(folder / "img.png"),)


def test_bad_images_beyond_the_check_window_are_reported_in_file_order(folder: Path) -> None:
    # More records than the decoding pool looks ahead, two bad images far apart: the first one
    # in the file is the error, and skipping counts both.
    truncated_png(folder / "cut.png")
    records: list[object] = [gmai(MRI_QUESTION, "B", id=f"q{i}") for i in range(1500)]
    records[1200] = gmai(MRI_QUESTION, "B", id="late", image="missing.png")
    records[700] = gmai(MRI_QUESTION, "B", id="early", image="cut.png")
    path = write_jsonl(folder / "data.jsonl", *records)
    with pytest.raises(DataError) as raised:
        load_mcq_jsonl(path)
    assert raised.value.location == f"{path}:701"
    items, report = load_mcq_jsonl_with_report(path, on_error="skip")
    assert len(items) == 1498 and [item.id for item in items][699:701] == ["q699", "q701"]
    assert report.skipped == {"unreadable_image": 1, "missing_image": 1}


def test_a_gpt_turn_with_two_answers_is_a_bad_record(folder: Path) -> None:
    reply = "<think>Mass effect.</think><answer>B</answer><answer>C</answer>"
    with pytest.raises(DataError, match=r"bad_answer: the answer turn: .*several answers"):
        load_one(folder, gmai(MRI_QUESTION, reply))


def test_data_error_survives_pickling() -> None:
    # Ray ships exceptions between processes by pickling them.
    error = DataError("d.jsonl:3", "no_options", "no lettered option list")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.location, copy.reason, copy.detail, str(copy)) == (
        error.location,
        error.reason,
        error.detail,
        str(error),
    )


def test_invalid_utf8_is_a_bad_record(folder: Path) -> None:
    path = folder / "data.jsonl"
    path.write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:1: invalid_json: not UTF-8"):
        load_mcq_jsonl(path)


def test_skip_reports_every_bad_record_once(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(
        folder / "data.jsonl",
        gmai(MRI_QUESTION, "B"),
        "{broken",
        gmai(MRI_QUESTION, "D"),
        "",
        "   ",
        gmai(MRI_QUESTION, "E"),
        gmai(MRI_QUESTION, "A", image="missing.png"),
        gmai(MRI_QUESTION, "C"),
    )
    with caplog.at_level(logging.WARNING, logger="gmai_rl.data"):
        items, report = load_mcq_jsonl_with_report(path, on_error="skip")

    assert [item.answer for item in items] == ["B", "C"]
    assert [item.source for item in items] == ["data.jsonl:1", "data.jsonl:8"]
    assert report.loaded == 2
    assert report.skipped == {"invalid_json": 1, "answer_not_in_options": 2, "missing_image": 1}
    assert report.skipped_total == 4
    assert report.examples["answer_not_in_options"][0].startswith(f"{path}:3: ")
    assert report.examples["answer_not_in_options"][1].startswith(f"{path}:6: ")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "loaded 2 of 6 records, skipped 4" in message
    assert "answer_not_in_options: 2" in message and f"{path}:7" in message


def test_on_record_counts_every_non_blank_line_loaded_or_skipped(folder: Path) -> None:
    path = write_jsonl(
        folder / "data.jsonl",
        gmai(MRI_QUESTION, "B"),
        "{broken",
        "",
        gmai(MRI_QUESTION, "E"),
        gmai(MRI_QUESTION, "C"),
    )
    calls: list[int] = []
    items = load_mcq_jsonl(path, on_error="skip", on_record=lambda: calls.append(len(calls)))
    assert len(items) == 2 and len(calls) == 4
    calls.clear()
    with pytest.raises(DataError):  # stops at the bad record, uncounted
        load_mcq_jsonl(path, on_record=lambda: calls.append(len(calls)))
    assert len(calls) == 1


def test_report_keeps_only_the_first_few_examples(folder: Path) -> None:
    path = write_jsonl(folder / "data.jsonl", *["{broken"] * 5)
    items, report = load_mcq_jsonl_with_report(path, on_error="skip")
    assert items == []
    assert report.skipped == {"invalid_json": 5}
    assert len(report.examples["invalid_json"]) == 3


def test_blank_lines_alone_are_skipped_silently(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jsonl(folder / "data.jsonl", "", gmai(MRI_QUESTION, "B"), "  \t", "")
    with caplog.at_level(logging.WARNING):
        items, report = load_mcq_jsonl_with_report(path, on_error="skip")
    assert (len(items), report.skipped_total, caplog.records) == (1, 0, [])


def test_duplicate_ids_name_both_lines(folder: Path) -> None:
    path = write_jsonl(
        folder / "data.jsonl",
        gmai(MRI_QUESTION, "A", id="q1"),
        gmai(MRI_QUESTION, "B", id="q2"),
        gmai(MRI_QUESTION, "C", id="q1"),
    )
    with pytest.raises(DataError, match=rf"data\.jsonl:3: duplicate_id: .*{path}:1"):
        load_mcq_jsonl(path)
    items, report = load_mcq_jsonl_with_report(path, on_error="skip")
    assert [item.answer for item in items] == ["A", "B"]
    assert report.skipped == {"duplicate_id": 1}


def test_images_can_go_unchecked(folder: Path) -> None:
    item = load_one(folder, gmai(MRI_QUESTION, "B", image="later.png"), check_images=False)
    assert item.images == (str(folder / "later.png"),)


def test_unknown_on_error_value(folder: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        load_mcq_jsonl(write_jsonl(folder / "d.jsonl", gmai(MRI_QUESTION, "B")), on_error="warn")  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_mcq_jsonl(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------------------
# Through `datasets` (offline: tests/conftest.py sets HF_DATASETS_OFFLINE=1)


def test_dataset_from_a_local_jsonl_matches_the_jsonl_loader(tmp_path: Path) -> None:
    shutil.copy(GMAI_SAMPLE, tmp_path / "reasoning_mcq_rl.jsonl")
    for relative in GMAI_IMAGES:
        draw_png(tmp_path / relative)
    path = tmp_path / "reasoning_mcq_rl.jsonl"
    from_datasets = load_mcq_dataset(path, cache_dir=str(tmp_path / "cache"))
    from_jsonl = load_mcq_jsonl(path)
    assert [item.id for item in from_datasets] == ["reasoning_mcq_rl-0", "reasoning_mcq_rl-1"]
    assert from_datasets[1].source == f"{path}:1"
    # Same content; only the default ids and the sources say where each came from.
    assert [replace(item, id="", source=None) for item in from_datasets] == [
        replace(item, id="", source=None) for item in from_jsonl
    ]


def test_dataset_folder_with_configs_like_the_hub_snapshot(tmp_path: Path) -> None:
    snapshot = tmp_path / "GMAI-Reasoning10K"
    rl, sft = GMAI_SAMPLE.read_text().splitlines()
    snapshot.mkdir()
    write_jsonl(snapshot / "reasoning_mcq_rl.jsonl", rl)
    write_jsonl(snapshot / "reasoning_mcq_sft.jsonl", sft)
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: reasoning_mcq_rl\n  data_files:\n  - reasoning_mcq_rl.jsonl\n"
        "- config_name: reasoning_mcq_sft\n  data_files:\n  - reasoning_mcq_sft.jsonl\n---\n"
    )
    for relative in GMAI_IMAGES:
        draw_png(snapshot / relative)
    (item,) = load_mcq_dataset(snapshot, config="reasoning_mcq_sft", cache_dir=str(tmp_path / "c"))
    assert (item.id, item.answer, item.modality) == ("reasoning_mcq_sft-0", "A", "ultrasound")
    assert item.reasoning is not None
    assert item.images == (str(snapshot / GMAI_IMAGES[1]),)


def test_hub_name_loads_from_the_downloaded_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No network in tests: stand in for the download and check what it is asked for.
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(GMAI_SAMPLE, snapshot / "reasoning_mcq_rl.jsonl")
    for relative in GMAI_IMAGES:
        draw_png(snapshot / relative)
    calls = []

    def fake_snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    items = load_mcq_dataset(
        "General-Medical-AI/GMAI-Reasoning10K", revision="main", cache_dir=str(tmp_path / "c")
    )
    assert calls == [
        {
            "repo_id": "General-Medical-AI/GMAI-Reasoning10K",
            "repo_type": "dataset",
            "revision": "main",
        }
    ]
    assert [item.images for item in items] == [(str(snapshot / r),) for r in GMAI_IMAGES]
    assert items[0].source == "General-Medical-AI/GMAI-Reasoning10K:train:0"
    assert items[0].id == "GMAI-Reasoning10K-0"


def test_dataset_folder_without_a_card_needs_a_config_naming_its_jsonl(tmp_path: Path) -> None:
    for name in ("reasoning_mcq_rl", "reasoning_mcq_sft"):
        shutil.copy(GMAI_SAMPLE, tmp_path / f"{name}.jsonl")
    with pytest.raises(FileNotFoundError, match="reasoning_mcq_rl, reasoning_mcq_sft"):
        load_mcq_dataset(tmp_path, cache_dir=str(tmp_path / "c"), check_images=False)
    items = load_mcq_dataset(
        tmp_path, config="reasoning_mcq_sft", cache_dir=str(tmp_path / "c"), check_images=False
    )
    assert [item.id for item in items] == ["reasoning_mcq_sft-0", "reasoning_mcq_sft-1"]


def test_dataset_rows_are_reported_by_index(tmp_path: Path) -> None:
    draw_png(tmp_path / "img.png")
    path = write_jsonl(
        tmp_path / "d.jsonl",
        gmai(MRI_QUESTION, "B"),
        gmai(MRI_QUESTION, "E"),
        gmai(MRI_QUESTION, "C"),
    )
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"d\.jsonl row 1: answer_not_in_options"):
        load_mcq_dataset(path, cache_dir=cache)
    items, report = load_mcq_dataset_with_report(path, on_error="skip", cache_dir=cache)
    assert [item.answer for item in items] == ["B", "C"]
    assert report.skipped == {"answer_not_in_options": 1}


def test_image_columns_are_not_decoded(tmp_path: Path) -> None:
    import datasets

    from gmai_rl.data.loader import _undecoded_images

    image = draw_png(tmp_path / "img.png")
    table = datasets.Dataset.from_dict({"image": [str(image)], "images": [[str(image)]]})
    table = table.cast_column("image", datasets.Image())
    table = table.cast_column("images", datasets.List(datasets.Image()))
    row = _undecoded_images(table)[0]
    assert row["image"]["path"] == str(image)
    assert row["images"][0]["path"] == str(image)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_mcq_dataset(tmp_path / "absent.jsonl")


def test_public_api() -> None:
    import gmai_rl.data as data

    assert set(data.__all__) >= {
        "load_mcq_jsonl",
        "load_mcq_dataset",
        "DataError",
        "LoadReport",
        "split_question_options",
        "build_messages",
        "build_prompt",
        "format_question",
        "sft_target",
        "DEFAULT_SYSTEM_PROMPT",
        "infer_modality",
    }
    assert all(hasattr(data, name) for name in data.__all__)
    assert issubclass(data.DataError, ValueError)
