"""The end-of-run report, beside metrics.jsonl: report.png (curves) and report.md (summary).

    curves_figure(records)            reward, accuracy, response length, KL and entropy against
                                      the RL step, held-out evaluations marked
    report_markdown(...)              configuration, held-out accuracy before/after RL (overall
                                      and per modality), the time split
    write_report(out, cfg, result)    both files from metrics.jsonl and eval.json's content

Both builders are pure: they take metrics.jsonl's records (dicts) and return a matplotlib Figure or
the markdown text. matplotlib is imported only when a figure is made, and the figure is drawn with
its Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmai_rl.config import TrainConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Record = dict[str, Any]

PANELS = ("reward", "accuracy", "response length", "KL", "entropy")
"""The figure's panels, in order (their axes titles)."""
STAGE_LABELS = {
    "generate": "RL: generate",
    "reward": "RL: reward",
    "train": "RL: train",
    "sync": "RL: weight sync",
}
"""metrics.jsonl's time_<stage>_s keys of an RL step, as the time table names them."""


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


def time_split(records: Sequence[Record], wall_s: float | None = None) -> list[tuple[str, float]]:
    """(stage, total seconds) from metrics.jsonl: data preparation and start-up (the setup
    record), SFT, each RL stage, held-out evaluation, and with the run's wall time what the
    records do not cover (checkpoints, shutdown, the driver's own work between stages)."""
    setup = by_stage(records, "setup")
    rows = [
        ("data preparation", sum(r.get("data_seconds", 0.0) for r in setup)),
        ("start-up (plan, Ray, actors)", sum(r.get("startup_seconds", 0.0) for r in setup)),
        ("SFT", sum(r.get("seconds", 0.0) for r in by_stage(records, "sft"))),
    ]
    rl_seconds: dict[str, float] = {}
    for r in by_stage(records, "rl"):
        for key, value in r.items():
            if key.startswith("time_") and key.endswith("_s"):
                stage = key.removeprefix("time_").removesuffix("_s")
                rl_seconds[stage] = rl_seconds.get(stage, 0.0) + value
    rows += [(STAGE_LABELS.get(stage, f"RL: {stage}"), s) for stage, s in rl_seconds.items()]
    rows.append(
        ("held-out evaluation", sum(r.get("seconds", 0.0) for r in by_stage(records, "eval")))
    )
    if wall_s is not None:
        rows.append(("other (checkpoints, shutdown)", max(wall_s - sum(s for _, s in rows), 0.0)))
    return rows


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
    before, after = result.get("before_rl") or {}, result.get("after_rl") or {}
    if before or after:
        lines += ["| | before RL | after RL | change |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in accuracy_rows(before, after)]
    else:
        lines.append("No held-out evaluation (data.eval is null).")
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
    split = time_split(records, wall_s)
    total = sum(s for _, s in split)
    lines += ["", "## Time", "", "| stage | seconds | share |", "|---|---:|---:|"]
    lines += [
        f"| {stage} | {s:.1f} | {100 * s / total if total else 0:.1f}% |" for stage, s in split
    ]
    lines.append(f"| total | {total:.1f} | |")
    if figure:
        lines += ["", f"![reward, accuracy, response length, KL and entropy]({figure})"]
    return "\n".join(lines) + "\n"


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
