"""Where a run's metrics go: metrics.jsonl first, then every configured dashboard.

    Dashboards.write(record)   metrics.jsonl (the source of truth: the report and every later
                               analysis read it), then each sink:
      TensorBoard              event files in <output_dir>/tensorboard (dashboards.tensorboard)
      WandB                    a W&B run, online or offline (dashboards.wandb)
      RayMetrics               gauges in Ray's metrics system (dashboards.ray_metrics)

A record is one metrics.jsonl object: an SFT step, an RL step or a held-out evaluation. Every
sink shows it as scalars named "<stage>/<key>" (`scalars`) against the stage's step
(`dashboard_step`): RL steps and evaluations share one axis, the RL steps done, so held-out
accuracy lines up with the training curves (0: before RL). A sink that fails mid-run is logged
and dropped; the run and metrics.jsonl go on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from gmai_rl.config import TrainConfig, WandbConfig
from gmai_rl.metrics import MetricsLog
from gmai_rl.ray_metrics import open_ray_metrics

log = logging.getLogger(__name__)

NOT_SCALARS = ("stage", "step", "phase")
"""Record keys that say what a record is, not what was measured."""


class Sink(Protocol):
    name: str

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as "<stage>/<key>"; a dict of numbers (accuracy by modality) gives
    "<stage>/<key>/<name>" each; text and deeper nesting are left out."""
    stage = record.get("stage", "run")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_SCALARS:
            continue
        if _is_number(value):
            out[f"{stage}/{key}"] = float(value)
        elif isinstance(value, dict):
            out |= {f"{stage}/{key}/{k}": float(v) for k, v in value.items() if _is_number(v)}
    return out


def dashboard_step(record: dict[str, Any]) -> int:
    """The x of a record: SFT steps done for SFT, RL steps done for RL steps and evaluations, 0
    for a record of no step (the setup)."""
    if "step" not in record:
        return 0
    step = int(record["step"])
    return step if record.get("stage") in ("eval", "bench") else step + 1


def run_name(output_dir: Path) -> str:
    """The output folder's name; for a hydra multirun job (a numbered folder) "<parent>/<n>", so
    the jobs of different sweeps differ."""
    if output_dir.name.isdigit() and output_dir.parent.name:
        return f"{output_dir.parent.name}/{output_dir.name}"
    return output_dir.name


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Dashboards:
    """metrics.jsonl and the dashboards of one run: each record goes to all of them."""

    def __init__(self, jsonl: MetricsLog, sinks: Sequence[Sink] = ()) -> None:
        self.jsonl = jsonl
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception:
                log.warning(
                    "%s failed; it gets no more metrics (metrics.jsonl has them all)",
                    sink.name,
                    exc_info=True,
                )
                self.sinks.remove(sink)
                _close_quietly(sink, failed=True)

    def close(self, failed: bool = False) -> None:
        """Close every sink (a W&B run is marked failed with `failed`), then metrics.jsonl."""
        for sink in self.sinks:
            _close_quietly(sink, failed)
        self.sinks = []
        self.jsonl.close()


def _close_quietly(sink: Sink, failed: bool) -> None:
    try:
        sink.close(failed)
    except Exception:
        log.warning("%s did not close cleanly", sink.name, exc_info=True)


class TensorBoard:
    """TensorBoard event files: every scalar of every record."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)

    def write(self, record: dict[str, Any]) -> None:
        step = dashboard_step(record)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run: the configuration once, then every record's scalars.

    SFT and RL steps have step axes of their own ("sft/step", "rl/step": W&B's define_metric),
    so SFT's 120 steps and RL's do not share one x."""

    name = "W&B"

    def __init__(self, cfg: WandbConfig, name: str, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        mode: Any = None if cfg.mode is None else str(cfg.mode)  # WandbMode values are wandb's
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                group=cfg.group,
                tags=list(cfg.tags),
                mode=mode,
                dir=str(out_dir),
                config=config,
            )
        except Exception as err:
            err.add_note(
                "(dashboards.wandb: wandb.init failed; without network set "
                "dashboards.wandb.mode=offline, or dashboards.wandb.enabled=false)"
            )
            raise
        for stage in ("sft", "rl"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.define_metric("eval/*", step_metric="rl/step")

    def write(self, record: dict[str, Any]) -> None:
        axis = "sft/step" if record.get("stage") == "sft" else "rl/step"
        self.run.log({**scalars(record), axis: dashboard_step(record)})

    def close(self, failed: bool = False) -> None:
        """Finish the run. The wandb-core service may write the last of an offline run's file
        just after; wandb's exit hook (wandb.teardown) waits for it."""
        self.run.finish(exit_code=1 if failed else 0)


def open_dashboards(cfg: TrainConfig, out: Path, keep_lines: int = 0) -> Dashboards:
    """metrics.jsonl in `out` (its first `keep_lines` kept: a resumed run's) and the dashboards
    `cfg.dashboards` turns on (Ray metrics only when this process is connected to Ray)."""
    dash = cfg.dashboards
    name = dash.run_name or run_name(out)
    sinks: list[Sink] = []
    try:
        if dash.tensorboard:
            sinks.append(TensorBoard(out / "tensorboard"))
        if dash.wandb.enabled:
            sinks.append(WandB(dash.wandb, name, out, dataclasses.asdict(cfg)))
        if dash.ray_metrics and (ray_sink := open_ray_metrics(name)) is not None:
            sinks.append(ray_sink)
    except BaseException:
        for sink in sinks:
            _close_quietly(sink, failed=True)
        raise
    log.info(
        "metrics: %s%s",
        out / "metrics.jsonl",
        "".join(f", {sink.name}" for sink in sinks) + f" (run {name!r})" if sinks else "",
    )
    return Dashboards(MetricsLog(out / "metrics.jsonl", keep_lines), sinks)
