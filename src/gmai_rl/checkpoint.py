"""Resumable checkpoints: where they live, which are complete, what the driver keeps in them.

    <output_dir>/checkpoints/step_<N>/      one complete checkpoint (after RL step N)
        driver.json                         step, policy version, sampler, metrics length, evals
        learner/                            DeepSpeed checkpoints of the policy (and KL reference)
        learner/rng_rank<r>.pt              each learner rank's RNG states
        rollout_<i>.pt                      each rollout worker's RNG states
    <output_dir>/checkpoints/step_<N>.partial/   being written (or left by a crash): never resumed

Every part is written into the `.partial` folder, and only when all of them are there does the
driver rename it to `step_<N>`: a rename is atomic, so a folder named `step_<N>` is complete,
whatever crash happened while saving. The learner and rollout actors write their parts
themselves, so on a multi-node cluster the output folder must be shared storage.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PARTIAL = ".partial"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (partial folders are ignored)."""
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := _STEP_DIR.match(path.name))
        if (path / "driver.json").is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `trainer.resume` names: None (start fresh), "auto" (the latest complete one
    in this run's output folder, or a fresh start when there is none) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "driver.json").is_file():
        raise ValueError(
            f"trainer.resume={resume}: not a complete checkpoint (no driver.json); expected a "
            f"folder like {checkpoint_root(output_dir) / 'step_100'}, or 'auto'"
        )
    return path


def begin(root: Path, step: int) -> Path:
    """A fresh `.partial` folder for the checkpoint of `step` (a stale one is replaced)."""
    partial = root / f"step_{step}{PARTIAL}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path) -> Path:
    """Publish a fully written checkpoint by renaming it; returns its final path."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL))
    if final.exists():  # the same step saved again (e.g. the end of a resumed run)
        shutil.rmtree(final)
    partial.rename(final)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and leftover partial folders;
    returns what was deleted."""
    stale = complete_checkpoints(root)[:-keep] if keep > 0 else []
    stale += [p for p in root.glob(f"step_*{PARTIAL}") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path)
    return stale


@dataclass
class DriverState:
    """What the driver needs to continue a run exactly where a checkpoint left it."""

    step: int
    """RL steps completed (in this round)."""
    policy_version: int
    """The rollout workers' policy version after the step's weight sync."""
    sampler: dict[str, Any]
    """`ItemSampler.state()`: epoch order, position and RNG."""
    metrics_lines: int
    """Lines of metrics.jsonl written up to this step (later ones are dropped on resume)."""
    before_rl: dict[str, Any] = field(default_factory=dict)
    """The held-out evaluation before RL."""
    during_rl: list[dict[str, Any]] = field(default_factory=list)
    """The periodic evaluations so far."""
    round: int = 1
    """The round these steps belong to (`trainer.rounds`)."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """What each earlier round's evaluations and synth gave."""
    synth: dict[str, Any] = field(default_factory=dict)
    """What this round's rejection sampling kept (rounds after the first)."""

    def write(self, folder: Path) -> None:
        (folder / "driver.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, folder: Path) -> DriverState:
        return cls(**json.loads((folder / "driver.json").read_text()))
