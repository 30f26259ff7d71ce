"""What the driver feeds the stages: the datasets, an endless seeded item order, SFT samples.

prepare_artifacts  the tiny model and synthetic data when the config asks for them and they
                   are absent (the demo), built whole before they appear in the cache, with
                   a progress bar over the images written
load_datasets      train / held-out / SFT items from their JSONL files, with a progress bar per
                   file (checking every image takes a while on real data; images that passed
                   an earlier load unchanged are skipped: data.image_check_cache)
ItemSampler        draws without replacement, reshuffled every epoch (RL prompts, SFT batches)
sft_samples        items as learner samples: prompt + reference reasoning and answer
"""

from __future__ import annotations

import logging
import random
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from gmai_rl.benchmarks.items import BenchItem
from gmai_rl.config import TrainConfig
from gmai_rl.data import build_prompt, load_mcq_jsonl_with_report, sft_target
from gmai_rl.data.admission import LoadReport
from gmai_rl.models.tokens import end_of_turn_id
from gmai_rl.progress import Progress
from gmai_rl.types import MCQItem, TrainSample

log = logging.getLogger(__name__)

T = TypeVar("T")


def prepare_artifacts(cfg: TrainConfig) -> None:
    """Build the offline tiny model and the synthetic dataset when configured and missing."""
    if cfg.model.build_tiny_if_missing:
        from gmai_rl.models.tiny import make_tiny_model

        def tiny(out: Path) -> None:
            make_tiny_model(out, seed=cfg.trainer.seed)

        build_once(Path(cfg.model.path), "config.json", tiny, "the tiny offline model")
    syn = cfg.data.synthetic
    if syn is not None:
        from gmai_rl.data.synthetic import write_synthetic_dataset

        def synthetic(out: Path) -> None:
            with Progress.of(cfg.dashboards, "synthetic images", None, unit="image") as bar:
                write_synthetic_dataset(
                    out,
                    n_train=syn.n_train,
                    n_eval=syn.n_eval,
                    seed=syn.seed,
                    tasks=syn.tasks,
                    image_size=syn.image_size,
                    shuffle_options=syn.shuffle_options,
                    sft_answers=syn.sft_answers.value,
                    on_image=bar.advance_to,
                )

        build_once(Path(syn.dir), "train.jsonl", synthetic, "the synthetic dataset")


def build_once(target: Path, marker: str, build: Callable[[Path], None], what: str) -> None:
    """Build `what` into `target` unless `target/marker` exists.

    The build writes a fresh sibling folder that is then renamed into place, so a run never sees
    a half-written cache entry, even while another run builds the same one; if another run
    finishes first, its copy stays and this one is discarded.
    """
    if (target / marker).exists():
        return
    log.info("building %s at %s", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (mkdtemp would make it private to this user): the cache may be shared.
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError as err:
            if not (target / marker).exists():
                raise RuntimeError(
                    f"{target} exists but holds no {marker}: delete it to rebuild {what}"
                ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Datasets:
    train: list[MCQItem]
    eval: list[MCQItem] = field(default_factory=list)
    sft: list[MCQItem] = field(default_factory=list)
    benchmarks: list[BenchItem] = field(default_factory=list)
    """The questions of every `eval.benchmarks` entry, in order."""


def load_datasets(cfg: TrainConfig) -> Datasets:
    d = cfg.data

    def load(path: str) -> list[MCQItem]:
        with Progress.of(
            cfg.dashboards, f"loading {Path(path).name}", count_records(path), unit="record"
        ) as bar:
            items, report = load_mcq_jsonl_with_report(
                path,
                image_root=d.image_root,
                on_error=d.on_error,
                on_record=bar.update,
                image_cache=d.image_check_cache,
            )
        refuse_empty(report)
        return items

    data = Datasets(train=load(d.train))
    if d.eval:
        data.eval = load(d.eval)[: d.max_eval_items]
    if cfg.sft.enabled and d.sft:
        data.sft = load(d.sft)
        missing = [item.source for item in data.sft if item.reasoning is None]
        if missing:
            raise ValueError(f"SFT records need reasoning; none in {missing[:3]} ...")
    data.benchmarks = load_benchmarks(cfg)
    log.info(
        "data: %d train, %d eval, %d sft items, %d benchmark questions",
        len(data.train),
        len(data.eval),
        len(data.sft),
        len(data.benchmarks),
    )
    return data


def load_benchmarks(cfg: TrainConfig) -> list[BenchItem]:
    """Every `eval.benchmarks` entry's questions (bad rows as `data.on_error` says)."""
    from gmai_rl.benchmarks.loaders import load_benchmarks as load_all

    sources = [(b.name, b.path, b.max_items) for b in cfg.eval.benchmarks]
    items, reports = load_all(sources, cache_dir=cfg.eval.cache_dir, on_error=cfg.data.on_error)
    for _, report in reports:
        refuse_empty(report)
    return items


def refuse_empty(report: LoadReport) -> None:
    """A configured source of which nothing loaded (every record skipped, or none there) stops
    the run before it starts, rather than a run without that data."""
    if not report.loaded:
        raise ValueError(f"no question loaded: {report.summary()}")


def count_records(path: str) -> int | None:
    """Non-blank lines of a JSONL file (the records a load goes through); None if unreadable (the
    load then says why)."""
    try:
        with open(path, "rb") as lines:
            return sum(1 for line in lines if line.strip())
    except OSError:
        return None


class ItemSampler(Generic[T]):
    """Endless draws without replacement, reshuffled every epoch (seeded)."""

    def __init__(self, items: Sequence[T], seed: int) -> None:
        if not items:
            raise ValueError("no items to sample from")
        self.items = list(items)
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0

    def state(self) -> dict[str, Any]:
        """Where the sampler is, as JSON-able data (for a resumable checkpoint)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "order": list(self.order),
            "epoch": self.epoch,
            "rng": [version, list(internal), gauss],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state()` was taken (the same items in the same order)."""
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.epoch = list(state["order"]), int(state["epoch"])
        if any(not 0 <= i < len(self.items) for i in self.order):
            raise ValueError("the sampler state does not fit these items (another dataset?)")

    def take(self, k: int) -> list[T]:
        out: list[T] = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            out.append(self.items[self.order.pop()])
        return out


def sft_samples(
    items: Sequence[MCQItem], tokenizer: Any, system_prompt: str | None
) -> list[TrainSample]:
    """Prompt + reference "<think>..</think><answer>X</answer><|im_end|>" as a learner sample."""
    end_of_turn = end_of_turn_id(tokenizer)
    return [
        TrainSample(
            build_prompt(item, system_prompt),
            [],
            [*tokenizer.encode(sft_target(item), add_special_tokens=False), end_of_turn],
        )
        for item in items
    ]
