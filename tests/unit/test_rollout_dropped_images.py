"""A prompt whose image went missing or bad after the load is answered with a dropped group, not
a failed generate call: `generate_or_drop` against a fake engine that, like both real ones, reads
a batch's images before generating."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

import gmai_rl.rollout.worker as worker
from gmai_rl.models.inputs import load_images
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.worker import generate_or_drop
from gmai_rl.types import Completion, Group, Prompt, SamplingParams

SAMPLING = SamplingParams(max_new_tokens=4)


class ImageReadingEngine:
    """Loads every image of a call, then 'generates' n one-token completions per prompt."""

    def __init__(self, before_call: list[object] | None = None) -> None:
        self.policy_version = 3
        self.calls: list[list[str]] = []
        self.before_call = list(before_call or [])
        """Per call, something to do first: an exception to raise or a callable to run."""

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        self.calls.append([p.id for p in prompts])
        if self.before_call:
            action = self.before_call.pop(0)
            if isinstance(action, BaseException):
                raise action
            if callable(action):
                action()
        load_images([path for p in prompts for path in p.images])
        return [
            Group(p, [1, 2], [Completion([5], "x") for _ in range(n)], self.policy_version)
            for p in prompts
        ]


@pytest.fixture
def prompts(tmp_path: Path) -> list[Prompt]:
    """p0..p3, one image each (p3 shares p1's), and a text-only p4."""
    paths = []
    for name in ("0.png", "1.png", "2.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    images = [paths[0], paths[1], paths[2], paths[1]]
    return [Prompt(f"p{i}", [], (path,)) for i, path in enumerate(images)] + [Prompt("p4", [])]


def test_a_deleted_image_drops_the_prompts_that_show_it_and_the_rest_generate(
    prompts: list[Prompt],
) -> None:
    Path(prompts[1].images[0]).unlink()
    engine = ImageReadingEngine()
    groups = generate_or_drop(engine, prompts, 2, SAMPLING)
    assert [g.prompt.id for g in groups] == ["p0", "p1", "p2", "p3", "p4"]  # in order
    assert [g.dropped is not None for g in groups] == [False, True, False, True, False]
    dropped = groups[1]
    assert dropped.completions == [] and dropped.rewards == [] and dropped.policy_version == 3
    assert dropped.dropped == f"missing_image: image not found: {prompts[1].images[0]}"
    assert all(len(g.completions) == 2 for g in groups if g.dropped is None)
    assert engine.calls == [["p0", "p1", "p2", "p3", "p4"], ["p0", "p2", "p4"]]


def test_a_truncated_image_is_dropped_with_the_decoders_reason(prompts: list[Prompt]) -> None:
    Image.effect_noise((64, 64), 40).save(prompts[2].images[0])  # noise: data fills the file
    whole = Path(prompts[2].images[0]).read_bytes()
    Path(prompts[2].images[0]).write_bytes(whole[: len(whole) // 2])
    groups = generate_or_drop(ImageReadingEngine(), prompts, 1, SAMPLING)
    assert [g.prompt.id for g in groups if g.dropped] == ["p2"]
    assert groups[2].dropped is not None
    assert groups[2].dropped.startswith("unreadable_image: PIL cannot decode")
    assert prompts[2].images[0] in groups[2].dropped


def test_an_image_lost_while_generating_again_is_dropped_too(prompts: list[Prompt]) -> None:
    Path(prompts[0].images[0]).unlink()
    lose_another = Path(prompts[2].images[0]).unlink
    engine = ImageReadingEngine(before_call=[None, lose_another])
    groups = generate_or_drop(engine, prompts, 1, SAMPLING)
    assert [g.prompt.id for g in groups if g.dropped] == ["p0", "p2"]
    assert engine.calls[1:] == [["p1", "p2", "p3", "p4"], ["p1", "p3", "p4"]]


def test_when_every_prompt_is_dropped_the_engine_is_not_asked_again(
    prompts: list[Prompt],
) -> None:
    for prompt in prompts[:3]:
        Path(prompt.images[0]).unlink()
    engine = ImageReadingEngine()
    groups = generate_or_drop(engine, prompts[:4], 2, SAMPLING)
    assert all(g.dropped for g in groups) and len(engine.calls) == 1


def test_a_failure_that_no_image_explains_is_raised_as_it_was(prompts: list[Prompt]) -> None:
    oom = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        generate_or_drop(ImageReadingEngine(before_call=[oom]), prompts, 1, SAMPLING)
    assert raised.value is oom


def test_a_broken_engine_is_raised_without_looking_at_images(
    prompts: list[Prompt], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path(prompts[0].images[0]).unlink()

    def no_checks(path: str) -> None:
        raise AssertionError("images checked for a broken engine")

    monkeypatch.setattr(worker, "image_problem", no_checks)
    broken = EngineBrokenError("weights half loaded")
    with pytest.raises(EngineBrokenError):
        generate_or_drop(ImageReadingEngine(before_call=[broken]), prompts, 1, SAMPLING)


def test_a_dropped_group_crosses_process_boundaries() -> None:
    import pickle

    group = Group(Prompt("p", [], ("/x.png",)), [], [], 2, dropped="missing_image: /x.png")
    assert pickle.loads(pickle.dumps(group)) == group
