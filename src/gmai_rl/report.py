"""The end-of-run report, beside metrics.jsonl: report.png (curves) and report.md (summary).

    curves_figure(records)            reward, accuracy, response length, KL and entropy against
                                      the RL step, held-out evaluations marked
    report_markdown(...)              configuration, held-out accuracy before/after RL (overall
                                      and per modality), the time split
    time_split(records, wall_s)       where the wall time went: stages that add up to it, and
                                      the RL steps' parts within them
    write_report(out, cfg, result)    both files from metrics.jsonl and eval.json's content

Both builders are pure: they take metrics.jsonl's records (dicts) and return a matplotlib Figure or
the markdown text. matplotlib is imported only when a figure is made, and the figure is drawn with
its Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmai_rl.config import TrainConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Record = dict[str, Any]

PANELS = ("reward", "accuracy", "response length", "KL", "entropy")
"""The figure's panels, in order (their axes titles)."""
STAGE_LABELS = {
    "generate": "generate",
    "reward": "reward",
    "train": "train",
    "wait_rollout": "wait for the batches ahead",
    "sync": "weight sync",
}
"""metrics.jsonl's time_<stage>_s keys of an RL step's parts, in the time table's order and
names (time_step_s is the step's wall time, not a part)."""
RL_STEPS = "RL steps"
OTHER = "other (checkpoints, shutdown)"


def read_records(path: Path) -> list[Record]:
    """metrics.jsonl's records, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_stage(records: Sequence[Record], stage: str) -> list[Record]:
    return [r for r in records if r.get("stage") == stage]


# ------------------------------------------------------------------------------------- figure


def curves_figure(records: Sequence[Record]) -> Figure:
    """One panel per `PANELS` entry against RL steps done (1 = after the first step); held-out
    evaluations (0 = before RL) are dotted verticals everywhere and points on the accuracy panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rl, evals = by_stage(records, "rl"), by_stage(records, "eval")
    x = [r["step"] + 1 for r in rl]
    fig = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    for ax, title in zip(axes, PANELS, strict=False):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for e in evals:
            ax.axvline(e["step"], color="grey", linestyle=":", linewidth=0.8)
    reward, accuracy, length, kl, entropy = axes[:5]
    _line(reward, x, rl, "reward_mean", "mean", band="reward_std")
    _line(accuracy, x, rl, "accuracy", "rollouts")
    _line(accuracy, x, rl, "format_rate", "format rate", style="--")
    if evals:
        accuracy.plot(
            [e["step"] for e in evals],
            [e["accuracy"] for e in evals],
            "o",
            color="black",
            label="held-out",
        )
    _line(length, x, rl, "response_length_mean", "mean")
    _line(length, x, rl, "response_length_max", "max", style="--")
    _line(kl, x, rl, "ref_kl", "to reference")
    _line(kl, x, rl, "approx_kl", "to rollout policy", style="--")
    _line(entropy, x, rl, "entropy", "token entropy")
    for ax in axes[:5]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[5].set_visible(False)
    return fig


def _line(
    ax: Any,
    x: Sequence[int],
    rl: Sequence[Record],
    key: str,
    label: str,
    style: str = "-",
    band: str | None = None,
) -> None:
    """Plot `key` of the RL records that have it (none: nothing)."""
    points = [(step, r) for step, r in zip(x, rl, strict=True) if _finite(r.get(key))]
    if not points:
        return
    xs, ys = [p[0] for p in points], [float(p[1][key]) for p in points]
    (handle,) = ax.plot(xs, ys, style, marker="." if len(xs) < 30 else None, label=label)
    if band and all(_finite(r.get(band)) for _, r in points):
        spread = [float(r[band]) for _, r in points]
        lower = [y - s for y, s in zip(ys, spread, strict=True)]
        upper = [y + s for y, s in zip(ys, spread, strict=True)]
        ax.fill_between(xs, lower, upper, alpha=0.2, color=handle.get_color())


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ----------------------------------------------------------------------------------- markdown


def config_summary(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(what, value) rows: model, data, layout, algorithm, SFT, seed."""
    c, loss, rollout = cfg.cluster, cfg.algo.loss, cfg.rollout
    device = "GPU" if c.gpus_per_learner else "CPU"
    layout = (
        f"{c.learner_ranks} learner rank(s) (DeepSpeed ZeRO-{cfg.learner.zero_stage}, {device}), "
        f"{c.rollout_workers} rollout worker(s) ({rollout.backend}, "
        f"{c.gpus_per_rollout_worker:g} GPU each), {'colocated' if c.colocate else 'separate'}, "
        f"{cfg.reward.num_workers} reward worker(s)"
    )
    algorithm = (
        f"{cfg.algo.estimator}, {cfg.trainer.steps} steps of {cfg.algo.prompts_per_step} prompts "
        f"x {rollout.samples_per_prompt} samples, lr {cfg.optim.lr:g}, clip "
        f"{loss.clip_eps_low:g}/{loss.clip_eps_high:g}, KL coef {loss.kl_coef:g} "
        f"({loss.kl_estimator}), temperature {rollout.temperature:g}, "
        f"max {rollout.max_new_tokens} new tokens, accuracy filter "
        + (
            f"[{cfg.algo.filter_low:g}, {cfg.algo.filter_high:g}]"
            if cfg.algo.accuracy_filter
            else "off"
        )
    )
    sft = (
        f"{cfg.sft.steps} steps of {cfg.sft.batch_size} samples, lr {cfg.sft.optim.lr:g}"
        if cfg.sft.enabled
        else "off"
    )
    return [
        ("model", f"{cfg.model.path} ({cfg.model.dtype})"),
        ("data", f"train {cfg.data.train}; held-out {cfg.data.eval or 'none'}"),
        ("layout", layout),
        ("algorithm", algorithm),
        ("SFT cold start", sft),
        ("seed", str(cfg.trainer.seed)),
    ]


@dataclass(frozen=True)
class TimeSplit:
    """Where a run's wall time went, in seconds (`time_split`)."""

    rows: list[tuple[str, float]]
    """Stages that do not overlap, in order; with the wall time given, the last one (`OTHER`) is
    what the records do not cover, so they add up to it."""
    rl_parts: list[tuple[str, float]]
    """The RL steps' parts (`STAGE_LABELS`): within the `RL_STEPS` row, not added to the total.
    With algo.max_staleness > 0 the next batches are generated while the learners train, so
    the parts can add up to more than the steps took."""
    untimed_steps: int = 0
    """RL records without time_step_s (metrics.jsonl of older versions): each counts as the
    sum of its parts."""
    resumed_step: int | None = None
    """The RL step a resumed run continued after: the split covers this process only."""

    @property
    def total(self) -> float:
        return sum(s for _, s in self.rows)

    @property
    def rl(self) -> float:
        return dict(self.rows)[RL_STEPS]

    @property
    def parts_overlap(self) -> bool:
        parts = sum(s for _, s in self.rl_parts)
        return parts > self.rl and not math.isclose(parts, self.rl)


def time_split(records: Sequence[Record], wall_s: float | None = None) -> TimeSplit:
    """Data preparation and start-up (the setup record), SFT, the RL steps (their time_step_s),
    held-out evaluation and, with the run's wall time, what the records do not cover
    (checkpoints, shutdown, the driver's own work between stages; never negative).

    A resumed run's metrics.jsonl also holds the records from before the resume, whose wall
    time is not known: only those from this process's setup record on are counted."""
    setups = [i for i, r in enumerate(records) if r.get("stage") == "setup"]
    records = records[setups[-1] :] if setups else records
    setup = by_stage(records, "setup")
    parts: dict[str, float] = {}
    rl_s, untimed = 0.0, 0
    for r in by_stage(records, "rl"):
        mine = {
            key.removeprefix("time_").removesuffix("_s"): value
            for key, value in r.items()
            if key.startswith("time_") and key.endswith("_s") and key != "time_step_s"
        }
        for stage, s in mine.items():
            parts[stage] = parts.get(stage, 0.0) + s
        if "time_step_s" in r:
            rl_s += r["time_step_s"]
        else:
            rl_s += sum(mine.values())
            untimed += 1
    rows = [
        ("data preparation", sum(r.get("data_seconds", 0.0) for r in setup)),
        ("start-up (plan, Ray, actors)", sum(r.get("startup_seconds", 0.0) for r in setup)),
        ("SFT", sum(r.get("seconds", 0.0) for r in by_stage(records, "sft"))),
        (RL_STEPS, rl_s),
        ("held-out evaluation", sum(r.get("seconds", 0.0) for r in by_stage(records, "eval"))),
    ]
    if wall_s is not None:
        rows.append((OTHER, max(wall_s - sum(s for _, s in rows), 0.0)))
    order = list(STAGE_LABELS)
    ordered = sorted(parts, key=lambda s: order.index(s) if s in order else len(order))
    return TimeSplit(
        rows,
        [(STAGE_LABELS.get(stage, stage), parts[stage]) for stage in ordered],
        untimed,
        setup[-1].get("resumed_step") if setup else None,
    )


def accuracy_rows(before: Record, after: Record) -> list[tuple[str, str, str, str]]:
    """(row, before, after, change) of held-out accuracy: overall, per modality, answer format."""

    def pct(value: Any) -> str:
        return f"{100 * value:.1f}%" if _finite(value) else "–"

    def change(a: Any, b: Any) -> str:
        return f"{100 * (b - a):+.1f} points" if _finite(a) and _finite(b) else "–"

    n = after.get("n", before.get("n"))
    rows = [
        (
            f"overall (n={n})",
            pct(before.get("accuracy")),
            pct(after.get("accuracy")),
            change(before.get("accuracy"), after.get("accuracy")),
        )
    ]
    b_mod = before.get("accuracy_by_modality") or {}
    a_mod = after.get("accuracy_by_modality") or {}
    for modality in sorted(b_mod.keys() | a_mod.keys()):
        b, a = b_mod.get(modality), a_mod.get(modality)
        rows.append((modality, pct(b), pct(a), change(b, a)))
    b_fmt, a_fmt = before.get("format_rate"), after.get("format_rate")
    rows.append(("answer format", pct(b_fmt), pct(a_fmt), change(b_fmt, a_fmt)))
    return rows


def benchmark_table(before: Record, after: Record) -> list[str]:
    """Each benchmark's accuracy (MCQ and closed questions) before and after RL with its 95%
    interval, then per modality; open questions' token F1; other harnesses' published numbers
    beside, labelled as such (`benchmarks.references`)."""
    from gmai_rl.benchmarks.references import REFERENCES

    def cell(bench: Record | None, key: str = "accuracy") -> str:
        if not bench or not _finite(bench.get(key)):
            return "–"
        ci = bench.get("ci95")
        interval = f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci and key == "accuracy" else ""
        return f"{100 * bench[key]:.1f}%{interval}"

    lines = [
        "Accuracy of one greedy answer per question, scored by gmai-rl's rules (docs/"
        "evaluation.md), with the 95% Wilson interval. The published column is other harnesses' "
        "numbers (other prompts, answer parsing and often an LLM judge): context, not a match.",
        "",
        "| benchmark | n | before RL | after RL | published (other harnesses) |",
        "|---|---:|---:|---:|---|",
    ]
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name) or {}, after.get(name) or {}
        published = "; ".join(
            f"{r.model} {r.accuracy:g} ({r.harness}: {r.source})" for r in REFERENCES.get(name, ())
        )
        lines.append(
            f"| {name} | {a.get('n', b.get('n'))} | {cell(b)} | {cell(a)} | {published or '–'} |"
        )
        b_by, a_by = (
            (b.get("by") or {}).get("modality", {}),
            (a.get("by") or {}).get("modality", {}),
        )
        for modality in sorted(b_by.keys() | a_by.keys()):
            bm, am = b_by.get(modality), a_by.get(modality)
            n = (am or bm or {}).get("n")
            lines.append(f"| {name}: {modality} | {n} | {cell(bm)} | {cell(am)} | |")
        b_open, a_open = b.get("open"), a.get("open")
        if b_open or a_open:
            n = (a_open or b_open or {}).get("n")
            lines.append(
                f"| {name}: open questions, token F1 (not comparable to judge scores) | {n} | "
                f"{cell(b_open, 'f1')} | {cell(a_open, 'f1')} | |"
            )
    return lines


def rounds_table(rounds: Sequence[Record]) -> list[str]:
    """One row per round: what its rejection sampling kept, held-out accuracy before and after
    its RL."""

    def pct(evaluation: Record | None) -> str:
        value: Any = (evaluation or {}).get("accuracy")
        return f"{100 * value:.1f}%" if _finite(value) else "–"

    lines = [
        "| round | SFT data | before RL | after RL |",
        "|---:|---|---:|---:|",
    ]
    for r in rounds:
        synth = r.get("synth") or {}
        data = (
            f"{synth['kept']} traces kept for {synth['questions_with_a_trace']} of "
            f"{synth['questions']} questions"
            if synth
            else "the cold start (data.sft)"
        )
        lines.append(f"| {r['round']} | {data} | {pct(r['before_rl'])} | {pct(r['after_rl'])} |")
    return lines


def report_markdown(
    title: str,
    summary: Sequence[tuple[str, str]],
    records: Sequence[Record],
    result: Record,
    wall_s: float | None = None,
    figure: str | None = "report.png",
) -> str:
    """The report: configuration, held-out accuracy before/after RL, the RL steps' first and
    last values, the time split, and the figure (a path relative to the report) if any."""
    lines = [f"# {title}", "", "## Configuration", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in summary]
    lines += ["", "## Held-out accuracy", ""]
    before, after = dict(result.get("before_rl") or {}), dict(result.get("after_rl") or {})
    benchmarks = before.pop("benchmarks", None) or {}, after.pop("benchmarks", None) or {}
    if before or after:
        lines += ["| | before RL | after RL | change |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in accuracy_rows(before, after)]
    else:
        lines.append("No held-out evaluation (data.eval is null).")
    if any(benchmarks):
        lines += ["", "## Medical benchmarks", "", *benchmark_table(*benchmarks)]
    if result.get("rounds"):
        lines += ["", "## Rounds", "", *rounds_table(result["rounds"])]
    rl = by_stage(records, "rl")
    if rl:
        first, last = rl[0], rl[-1]
        lines += [
            "",
            f"## RL steps ({len(rl)})",
            "",
            "| | first step | last step |",
            "|---|---:|---:|",
        ]
        for key in ("reward_mean", "accuracy", "format_rate", "response_length_mean", "entropy"):
            if key in first and key in last:
                lines.append(f"| {key} | {first[key]:.3f} | {last[key]:.3f} |")
    lines += ["", "## Time", "", *time_table(time_split(records, wall_s), wall_s is not None)]
    if figure:
        lines += ["", f"![reward, accuracy, response length, KL and entropy]({figure})"]
    return "\n".join(lines) + "\n"


def time_table(split: TimeSplit, wall: bool) -> list[str]:
    """The time split's markdown: its rows with their share of the total (the wall time when
    `wall`), each RL part under the RL steps with its share of them, then what to know."""

    def share(s: float, of: float) -> str:
        return f"{100 * s / of:.1f}%" if of else "–"

    lines = ["| stage | seconds | share |", "|---|---:|---:|"]
    for stage, s in split.rows:
        lines.append(f"| {stage} | {s:.1f} | {share(s, split.total)} |")
        if stage == RL_STEPS:
            lines += [
                f"| ↳ {part} | {p:.1f} | {share(p, split.rl)} of RL steps |"
                for part, p in split.rl_parts
            ]
    total = "total (wall time)" if wall else "total"
    lines.append(f"| {total} | {split.total:.1f} | {share(split.total, split.total)} |")
    notes = []
    if split.parts_overlap:
        parts = sum(s for _, s in split.rl_parts)
        notes.append(
            f"The RL steps' parts add up to {parts:.1f} s, more than the {split.rl:.1f} s the "
            "steps took: they overlap (algo.max_staleness > 0 generates the next batches "
            "while the learners train)."
        )
    if split.untimed_steps:
        notes.append(
            f"{split.untimed_steps} RL step(s) logged no wall time (time_step_s, metrics.jsonl "
            "of an older version): their time is the sum of their parts."
        )
    if split.resumed_step is not None:
        notes.append(
            f"Resumed after RL step {split.resumed_step}: the times are this process's only."
        )
    for note in notes:
        lines += ["", note]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_report(
    out: Path, cfg: TrainConfig, result: Record, name: str, wall_s: float | None = None
) -> tuple[Path, Path]:
    """report.png and report.md in `out`, from its metrics.jsonl and `result` (eval.json's)."""
    records = read_records(out / "metrics.jsonl")
    png, md = out / "report.png", out / "report.md"
    curves_figure(records).savefig(png, dpi=100)
    md.write_text(
        report_markdown(f"gmai-rl run {name}", config_summary(cfg), records, result, wall_s)
    )
    return png, md
