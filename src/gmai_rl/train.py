"""Hydra entry point: `python -m gmai_rl.train [group=option ...] [key=value ...]`.

The configuration tree is conf/ at the repository root (override with GMAI_RL_CONF); its schema,
with every field documented, is `gmai_rl.config.TrainConfig`. Without arguments this runs the
embedded demo: tiny offline Qwen2.5-VL, synthetic medical MCQs, SFT cold start, then GRPO. The
demo's model and data are built once into the artifacts cache ($GMAI_RL_CACHE, else
~/.cache/gmai-rl); outputs go to hydra's run folder (trainer.output_dir).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gmai_rl.config import TrainConfig

CONF_DIR = Path(os.environ.get("GMAI_RL_CONF", Path(__file__).resolve().parents[2] / "conf"))

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
log = logging.getLogger("gmai_rl")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve interpolations and turn the hydra tree into the typed config."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError("the config tree must be built on train_schema (see conf/config.yaml)")
    return absolutise_paths(obj)


def compose(overrides: list[str]) -> TrainConfig:
    """The typed config `python -m gmai_rl.train OVERRIDES` runs with, composed without running
    (hydra's compose API on the same conf/ tree). Nothing is written: the output folder, unless
    given, is ./outputs/plan."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    # ${hydra:runtime.output_dir} exists only inside a hydra.main run.
    if not any(o.startswith("trainer.output_dir=") for o in overrides):
        overrides = [*overrides, "trainer.output_dir=outputs/plan"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(hydra_compose("config", overrides=overrides))


def absolutise_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths become absolute (`~` expanded): Ray actors need not share the driver's
    working directory."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    model = Path(cfg.model.path).expanduser()
    if model.exists() or cfg.model.build_tiny_if_missing:
        cfg.model.path = absolute(cfg.model.path)
    d = cfg.data
    if d.synthetic is not None:
        d.synthetic.dir = absolute(d.synthetic.dir)
    d.train = absolute(d.train)
    d.eval = absolute(d.eval) if d.eval else None
    d.sft = absolute(d.sft) if d.sft else None
    cfg.trainer.output_dir = absolute(cfg.trainer.output_dir)
    return cfg


def report(result: dict[str, Any]) -> str:
    """The closing lines of a run: held-out accuracy before and after RL, and where outputs are."""
    before, after = result.get("before_rl") or {}, result.get("after_rl") or {}
    lines = ["", "=" * 72]
    if before and after:
        gain = 100 * (after["accuracy"] - before["accuracy"])
        lines.append(
            f"held-out accuracy: {100 * before['accuracy']:.1f}% before RL -> "
            f"{100 * after['accuracy']:.1f}% after RL ({gain:+.1f} points, n={after['n']})"
        )
        lines.append(
            f"answer format:     {100 * before['format_rate']:.1f}% -> {100 * after['format_rate']:.1f}%"
        )
    out = result["output_dir"]
    lines.append(
        f"outputs: {out}/metrics.jsonl, {out}/eval.json"
        + (f", {result['report']}" if "report" in result else "")
        + (f", {result['checkpoint']}" if "checkpoint" in result else "")
    )
    lines.append("=" * 72)
    return "\n".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from gmai_rl.loop import run

    result = run(to_train_config(cfg))
    print(report(result), flush=True)


if __name__ == "__main__":
    main()
