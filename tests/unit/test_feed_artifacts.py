"""The demo's artifacts appear in the cache whole: built aside, renamed into place, built once."""

import pytest

from gmai_rl.feed import build_once


def write_files(calls):
    def build(out):
        calls.append(out)
        assert out.is_dir() and out.name.endswith(".partial")  # never the cache entry itself
        (out / "weights.bin").write_text("w")
        (out / "config.json").write_text("{}")

    return build


def test_an_artifact_is_built_aside_then_moved_into_place(tmp_path):
    calls = []
    target = tmp_path / "cache" / "model"
    build_once(target, "config.json", write_files(calls), "a model")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]  # no leftovers


def test_an_existing_artifact_is_not_built_again(tmp_path):
    calls = []
    build_once(tmp_path / "model", "config.json", write_files(calls), "a model")
    build_once(tmp_path / "model", "config.json", write_files(calls), "a model")
    assert len(calls) == 1


def test_a_copy_finished_by_another_run_first_is_kept(tmp_path):
    target = tmp_path / "model"

    def finished_elsewhere_meanwhile(out):
        target.mkdir()
        (target / "config.json").write_text('{"first": true}')
        (out / "config.json").write_text('{"first": false}')

    build_once(target, "config.json", finished_elsewhere_meanwhile, "a model")
    assert (target / "config.json").read_text() == '{"first": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_half_written_folder_from_elsewhere_is_named(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("half")
    with pytest.raises(RuntimeError, match=f"{target} exists but holds no config.json: delete it"):
        build_once(target, "config.json", write_files([]), "a model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
