"""The image check cache: a second load decodes only the images that are new or changed since
they passed, and a cache file that is broken, foreign or unwritable never fails a load."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import gmai_rl.data.loader as loader
from gmai_rl.data import DataError, load_mcq_jsonl
from gmai_rl.data.image_checks import ImageCheckCache, checker_id, signature
from gmai_rl.data.records import RecordError

QUESTION = "<image>\nWhich finding?\nA. Normal\nB. Mass"


def record(i: int, image: str) -> dict[str, object]:
    turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "B"}]
    return {"id": f"q{i}", "conversations": turns, "image": image}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """data.jsonl: four questions about three images (two share one)."""
    for name, shade in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        Image.new("L", (8, 6), shade).save(tmp_path / name)
    lines = [record(i, image) for i, image in enumerate(["a.png", "b.png", "c.png", "a.png"])]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the images the loader decodes, in the order it does."""
    names: list[str] = []
    check = loader.image_problem

    def counting(path: str) -> RecordError | None:
        names.append(Path(path).name)
        return check(path)

    monkeypatch.setattr(loader, "image_problem", counting)
    return names


def test_a_second_load_decodes_no_image_that_passed_the_first(
    dataset: Path, tmp_path: Path, decoded: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache" / "image-checks.json"  # its folder is made on the first save
    first = load_mcq_jsonl(dataset, image_cache=cache)
    assert sorted(decoded) == ["a.png", "b.png", "c.png"]
    decoded.clear()
    with caplog.at_level(logging.INFO, logger="gmai_rl.data.loader"):
        second = load_mcq_jsonl(dataset, image_cache=cache)
    assert second == first and decoded == []
    assert "0 images decoded, 3 more known good" in caplog.text
    assert load_mcq_jsonl(dataset) == first and len(decoded) == 3  # no cache: every image


def test_a_touched_or_replaced_image_is_checked_again(
    dataset: Path, tmp_path: Path, decoded: list[str]
) -> None:
    cache = tmp_path / "checks.json"
    load_mcq_jsonl(dataset, image_cache=cache)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    stat_a = a.stat()
    os.utime(a, ns=(stat_a.st_atime_ns, stat_a.st_mtime_ns + 10**9))  # touched
    stat_b = b.stat()
    Image.new("L", (8, 6), 99).save(b)  # replaced by an image of the same size ...
    os.utime(b, ns=(stat_b.st_atime_ns, stat_b.st_mtime_ns))  # ... given the old mtime back
    assert b.stat().st_size == stat_b.st_size and b.stat().st_mtime_ns == stat_b.st_mtime_ns
    decoded.clear()
    load_mcq_jsonl(dataset, image_cache=cache)
    assert sorted(decoded) == ["a.png", "b.png"]


def test_only_passes_are_recorded_so_a_fixed_image_loads_next_time(
    dataset: Path, tmp_path: Path, decoded: list[str]
) -> None:
    cache = tmp_path / "checks.json"
    good = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(good[: len(good) // 2])
    for _ in range(2):  # failed both times: a failure is never taken from the cache
        with pytest.raises(DataError, match=r"b\.png"):
            load_mcq_jsonl(dataset, image_cache=cache)
    assert decoded.count("b.png") == 2
    # The load stopped at b.png, but a.png's pass was saved all the same.
    assert str(tmp_path / "a.png") in json.loads(cache.read_text())["images"]
    (tmp_path / "b.png").write_bytes(good)
    decoded.clear()
    assert len(load_mcq_jsonl(dataset, image_cache=cache)) == 4
    assert "a.png" not in decoded and "b.png" in decoded


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        b'{"format": 99}',
        b'{"format": 1, "checker": CHECKER, "images": {"/x.png": [1, 2]}}',
        b'{"format": 1, "checker": CHECKER, "images": ["/x.png"]}',
    ],
)
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(
    dataset: Path,
    tmp_path: Path,
    decoded: list[str],
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    cache = tmp_path / "checks.json"
    cache.write_bytes(content.replace(b"CHECKER", json.dumps(checker_id()).encode()))
    with caplog.at_level(logging.WARNING):
        assert len(load_mcq_jsonl(dataset, image_cache=cache)) == 4
    assert "ignoring the image check cache" in caplog.text and str(cache) in caplog.text
    assert len(decoded) == 3
    decoded.clear()
    load_mcq_jsonl(dataset, image_cache=cache)  # the rewritten file serves
    assert decoded == []


def test_records_of_another_check_are_void(
    dataset: Path, tmp_path: Path, decoded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "checks.json"
    load_mcq_jsonl(dataset, image_cache=cache)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)  # a stricter check
    decoded.clear()
    load_mcq_jsonl(dataset, image_cache=cache)
    assert len(decoded) == 3


def test_an_unwritable_cache_is_a_warning_not_a_failed_load(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    cache = tmp_path / "not-a-folder" / "checks.json"
    with caplog.at_level(logging.WARNING):
        assert len(load_mcq_jsonl(dataset, image_cache=cache)) == 4
    assert "cannot write the image check cache" in caplog.text
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path).glob("**/.*.tmp"))


def test_concurrent_loads_merge_their_records(tmp_path: Path) -> None:
    """Two jobs of a multirun, each with its own images, write to the same file."""
    cache = tmp_path / "checks.json"
    images = []
    for name in ("x.png", "y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
        images.append(str(tmp_path / name))
    first, second = ImageCheckCache(cache), ImageCheckCache(cache)  # both read before writing
    first.check(images[0], loader.image_problem)
    second.check(images[1], loader.image_problem)
    first.save()
    second.save()
    known = ImageCheckCache(cache).known
    assert known == {path: signature(path) for path in images}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checks.json", "x.png", "y.png"]


def test_an_image_changed_while_it_was_decoded_is_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)

    def check_while_rewritten(image: str) -> None:
        Image.new("RGB", (5, 5)).save(image)
        return None

    cache = ImageCheckCache(tmp_path / "checks.json")
    assert cache.check(str(path), check_while_rewritten) is None
    assert cache.passed == {}


def test_the_run_config_keeps_the_cache_in_the_artifacts_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from support import train_config

    monkeypatch.setenv("GMAI_RL_CACHE", str(tmp_path))
    assert train_config().data.image_check_cache == str(tmp_path / "image-checks.json")
    assert train_config("data.image_check_cache=null").data.image_check_cache is None


def test_load_datasets_passes_the_configured_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gmai_rl import feed
    from support import train_config

    seen: list[object] = []
    real: Callable[..., object] = feed.load_mcq_jsonl_with_report

    def spy(path: str, **kwargs: object) -> object:
        seen.append(kwargs["image_cache"])
        return real(path, **kwargs)

    monkeypatch.setattr(feed, "load_mcq_jsonl_with_report", spy)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("L", (8, 6)).save(data / "a.png")
    (data / "train.jsonl").write_text(json.dumps(record(0, "a.png")) + "\n")
    cfg = train_config(
        f"data.train={data / 'train.jsonl'}",
        "data.eval=null",
        "sft.enabled=false",
        f"data.image_check_cache={tmp_path / 'checks.json'}",
    )
    assert len(feed.load_datasets(cfg).train) == 1
    assert seen == [str(tmp_path / "checks.json")] and (tmp_path / "checks.json").exists()
