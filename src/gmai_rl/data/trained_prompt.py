"""The system prompt a checkpoint was trained with, kept beside its weights.

A run writes `gmai_rl_prompt.json` into the checkpoint it exports (`final/`). `gmai-rl eval` and
`gmai-rl synth` then ask that checkpoint with the same system prompt unless told otherwise: a
policy asked with another prompt than its training one is measured on a task it was not trained
for (the demo trains without a system prompt; its checkpoint asked with the project's default
answered 15% of the held-out questions instead of the 50% its run measured).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gmai_rl.data.prompts import DEFAULT_SYSTEM_PROMPT

PROMPT_FILE = "gmai_rl_prompt.json"


def record_system_prompt(checkpoint: str | os.PathLike[str], system_prompt: str | None) -> None:
    """Keep the run's system prompt (None: none) in the checkpoint folder it exported."""
    path = Path(checkpoint) / PROMPT_FILE
    path.write_text(json.dumps({"system_prompt": system_prompt}, indent=2) + "\n")


def system_prompt_for(
    model: str | os.PathLike[str], given: str | None = None, no_system_prompt: bool = False
) -> tuple[str | None, str]:
    """The system prompt to ask `model` with, and where it comes from: none with
    `no_system_prompt`, else `given`, else the one its run recorded, else the project's default."""
    if no_system_prompt:
        return None, "none (--no-system-prompt)"
    if given is not None:
        return given, "--system-prompt"
    path = Path(model) / PROMPT_FILE
    if not path.is_file():
        return DEFAULT_SYSTEM_PROMPT, "the project's default"
    try:
        recorded = json.loads(path.read_text())["system_prompt"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}: not a recorded system prompt ({error!r}); expected "
            '{"system_prompt": "..."} or {"system_prompt": null}'
        ) from None
    if recorded is not None and not isinstance(recorded, str):
        raise ValueError(f"{path}: system_prompt must be a string or null, not {recorded!r}")
    return recorded, f"the one its run trained with ({path})"


def add_system_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """`--system-prompt` / `--no-system-prompt` for a command that asks a checkpoint."""
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="default: the one the checkpoint's run trained with (its gmai_rl_prompt.json), "
        "else the project's",
    )
    parser.add_argument("--no-system-prompt", action="store_true")
