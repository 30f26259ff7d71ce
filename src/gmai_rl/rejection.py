"""Rejection sampling, as GMAI-VL-R1 builds reasoning data: a policy samples k traces per
question; the finished, well-formed, correct, distinct ones become GMAI-Reasoning10K
`reasoning_mcq_sft` records. Used by `gmai-rl synth` (gmai_rl.synth) and by the rounds of a
training run (`trainer.rounds`, gmai_rl.loop).

Streaming and resumable: questions go out a batch at a time; each batch's kept traces are
appended to the output, then its questions to `<out>.done.jsonl` (one line per question with
its counts). Started again on the same output, the questions listed done are skipped and any
trace of a question not listed (a batch cut off between the two writes) is dropped, so each
question's traces are written exactly once. `<out>.provenance.json` records the model, policy
version, sampling settings, filters and the source data's hash; a resume with other settings is
refused.

A question's traces are kept when its group's accuracy (correct samples / k) lies in
[min_accuracy, max_accuracy]: a maximum below 1 keeps only questions the policy gets wrong
sometimes (difficulty filtering). Rejected samples are counted by reason: too_long (cut at the
token limit), format, wrong_answer, duplicate; and per modality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmai_rl.data.prompts import build_prompt, format_question
from gmai_rl.reward.mcq import mcq_reward
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams

if TYPE_CHECKING:
    from gmai_rl.cluster.protocol import TrainingCluster
    from gmai_rl.config import DashboardsConfig, TrainConfig

log = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[Prompt], int, SamplingParams], list[Group]]
ScoreFn = Callable[[Sequence[Group], Sequence[MCQItem]], None]
"""Fills each group's `rewards` with one breakdown per completion ("format", "accuracy")."""

REJECTIONS = ("too_long", "format", "wrong_answer", "duplicate")


@dataclass
class SynthStats:
    questions: int = 0
    sampled: int = 0
    kept: int = 0
    questions_with_a_trace: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Samples by reason (REJECTIONS)."""
    filtered: Counter[str] = field(default_factory=Counter)
    """Questions left out by the difficulty filter: too_easy, too_hard."""
    by_modality: dict[str, Counter[str]] = field(default_factory=dict)
    """Modality -> questions, kept, and each rejection reason."""

    def count(self, modality: str | None, key: str, n: int = 1) -> None:
        self.by_modality.setdefault(modality or "unknown", Counter())[key] += n

    def line(self) -> str:
        rejected = ", ".join(f"{r} {self.rejected[r]}" for r in REJECTIONS)
        return (
            f"kept {self.kept} traces for {self.questions_with_a_trace}/{self.questions} "
            f"questions from {self.sampled} samples (rejected: {rejected}; filtered questions: "
            f"{dict(self.filtered) or 'none'})"
        )


def mcq_breakdowns(groups: Sequence[Group], items: Sequence[MCQItem]) -> None:
    """The MCQ rule's breakdowns, in this process (what the reward workers compute by default)."""
    for group, item in zip(groups, items, strict=True):
        group.rewards = [
            mcq_reward(c.text.strip(), item.answer, item.options).as_dict()
            for c in group.completions
        ]


def select_traces(
    group: Group, item: MCQItem, keep_per_question: int, stats: SynthStats
) -> list[str]:
    """The distinct completions of a scored `group` that ran to their end, are well formed and
    answer `item` correctly, at most `keep_per_question`; every other sample counted by reason."""
    kept: list[str] = []
    for completion, reward in zip(group.completions, group.rewards, strict=True):
        text = completion.text.strip()
        if completion.finish_reason == "length":
            why = "too_long"
        elif reward["format"] < 1.0:
            why = "format"
        elif reward["accuracy"] < 1.0:
            why = "wrong_answer"
        elif text in kept:
            why = "duplicate"
        else:
            if len(kept) < keep_per_question:
                kept.append(text)
            continue
        stats.rejected[why] += 1
        stats.count(item.modality, why)
    return kept


def check_breakdowns(groups: Sequence[Group]) -> None:
    """Rejection sampling reads each sample's "format" and "accuracy" (the MCQ rule's)."""
    for group in groups:
        for reward in group.rewards:
            if not {"format", "accuracy"} <= reward.keys():
                raise ValueError(
                    "rejection sampling needs the reward's breakdowns to hold 'format' and "
                    f"'accuracy', as the default MCQ rule's do; got {sorted(reward)} (reward.fn)"
                )


def group_accuracy(group: Group) -> float:
    return sum(r["accuracy"] for r in group.rewards) / max(len(group.rewards), 1)


def question_id(record_id: str) -> str:
    """The question an SFT record was made from, by the record's id (`sft_record`)."""
    return record_id.rsplit("-synth", 1)[0]


def sft_record(item: MCQItem, trace: str, index: int) -> dict[str, Any]:
    """A `reasoning_mcq_sft` record: <image> placeholders + question + options, then the trace."""
    human = "<image>\n" * len(item.images) + format_question(item)
    record: dict[str, Any] = {"id": f"{item.id}-synth{index}"}
    if item.images:
        record["image"] = item.images[0] if len(item.images) == 1 else list(item.images)
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": trace}]
    return record


@dataclass(frozen=True)
class Filters:
    k: int = 8
    keep_per_question: int = 1
    min_accuracy: float = 0.0
    max_accuracy: float = 1.0


def rejection_sample(
    generate: GenerateFn,
    items: Sequence[MCQItem],
    sampling: SamplingParams,
    system_prompt: str | None,
    filters: Filters = Filters(),
    batch_size: int = 32,
    score: ScoreFn = mcq_breakdowns,
) -> Iterator[tuple[list[MCQItem], list[dict[str, Any]], list[dict[str, Any]], SynthStats]]:
    """Per batch of questions: (the batch, its SFT records, one line per question with its
    counts, the running stats). Generation by `generate`, scoring by `score`."""
    stats = SynthStats()
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        groups = generate(
            [build_prompt(item, system_prompt) for item in batch], filters.k, sampling
        )
        score(groups, batch)
        check_breakdowns(groups)
        records, done = [], []
        for group, item in zip(groups, batch, strict=True):
            stats.questions += 1
            stats.sampled += len(group.completions)
            stats.count(item.modality, "questions")
            before = sum(stats.rejected.values())
            traces = select_traces(group, item, filters.keep_per_question, stats)
            accuracy = group_accuracy(group)
            if accuracy < filters.min_accuracy or accuracy > filters.max_accuracy:
                stats.filtered["too_easy" if accuracy > filters.max_accuracy else "too_hard"] += 1
                traces = []
            stats.kept += len(traces)
            stats.questions_with_a_trace += bool(traces)
            stats.count(item.modality, "kept", len(traces))
            records += [sft_record(item, trace, i) for i, trace in enumerate(traces)]
            done.append(
                {
                    "id": item.id,
                    "kept": len(traces),
                    "accuracy": accuracy,
                    "rejected": sum(stats.rejected.values()) - before,
                }
            )
        yield batch, records, done, stats


# ------------------------------------------------------------------------ the output files


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(
    model: str,
    policy_version: int,
    data: str,
    sampling: SamplingParams,
    filters: Filters,
    max_items: int | None,
    system_prompt: str | None,
    **more: Any,
) -> dict[str, Any]:
    """What an output's traces came from (`<out>.provenance.json`): a resume must match it."""
    return {
        "model": model,
        "policy_version": policy_version,
        "data": str(Path(data).resolve()),
        "data_sha256": file_sha256(data),
        "max_items": max_items,
        "sampling": asdict(sampling),
        "filters": asdict(filters),
        "system_prompt": system_prompt,
        **more,
    }


class SynthOutput:
    """The SFT JSONL, `<out>.done.jsonl` and `<out>.provenance.json` (module docstring)."""

    def __init__(self, out: str | os.PathLike[str], provenance: dict[str, Any]) -> None:
        self.out = Path(out)
        self.done_file = self.out.with_name(self.out.name + ".done.jsonl")
        self.provenance_file = self.out.with_name(self.out.name + ".provenance.json")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.done = self._resume(provenance)

    def _resume(self, provenance: dict[str, Any]) -> set[str]:
        """The questions done by an earlier synth into the same output (none: a fresh start)."""
        if not self.provenance_file.exists():
            for stale in (self.out, self.done_file):
                stale.unlink(missing_ok=True)
            self.provenance_file.write_text(json.dumps(provenance, indent=2) + "\n")
            return set()
        earlier = json.loads(self.provenance_file.read_text())
        changed = sorted(
            k for k in provenance.keys() | earlier.keys() if provenance.get(k) != earlier.get(k)
        )
        if changed:
            raise SystemExit(
                f"{self.out} was written by a synth with other settings ({', '.join(changed)} "
                f"differ; see {self.provenance_file}): give another --out, or delete it to start "
                "again"
            )
        done = set()
        if self.done_file.exists():
            done = {json.loads(line)["id"] for line in self.done_file.read_text().splitlines()}
        if self.out.exists():  # drop the traces of a batch cut off before it was listed done
            lines = self.out.read_text().splitlines(keepends=True)
            kept = [x for x in lines if question_id(json.loads(x)["id"]) in done]
            if len(kept) != len(lines):
                log.warning(
                    "%s: dropped %d trace(s) of an unfinished batch",
                    self.out,
                    len(lines) - len(kept),
                )
                _write_atomically(self.out, "".join(kept))
        log.info("%s: resuming, %d question(s) done already", self.out, len(done))
        return done

    def append(self, records: Sequence[dict[str, Any]], done: Sequence[dict[str, Any]]) -> None:
        """One batch: its traces, then its questions listed done (each on disk before the
        next)."""
        _append_lines(self.out, records)
        _append_lines(self.done_file, done)
        self.done.update(d["id"] for d in done)


def _append_lines(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


Batches = Iterator[tuple[list[MCQItem], list[dict[str, Any]], list[dict[str, Any]], SynthStats]]


def write_all(
    batches: Batches, output: SynthOutput, dashboards: DashboardsConfig, total: int
) -> SynthStats:
    """Append every batch to `output` as it comes, with a progress bar; the final stats."""
    from gmai_rl.progress import Progress

    stats = SynthStats()
    with Progress.of(dashboards, "synth", total, unit="question") as bar:
        for batch, records, done, stats in batches:
            output.append(records, done)
            bar.update(len(batch), kept=stats.kept)
    return stats


def sample_on_cluster(
    cluster: TrainingCluster,
    cfg: TrainConfig,
    items: Sequence[MCQItem],
    sampling: SamplingParams,
    system_prompt: str | None,
    filters: Filters,
    output: SynthOutput,
) -> SynthStats:
    """Rejection sampling on `cluster`'s rollout workers, scored by its reward workers, into
    `output`: a batch is one full share per rollout worker (rollout.max_batch_prompts each)."""
    batch = cfg.cluster.rollout_workers * cfg.rollout.max_batch_prompts
    batches = rejection_sample(
        cluster.generate, items, sampling, system_prompt, filters, batch, score=cluster.score
    )
    return write_all(batches, output, cfg.dashboards, len(items))
