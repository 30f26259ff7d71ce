"""Where the driver runs and what the actors get: the environment of a run, as plain functions.

Under `ray job submit` the driver runs in a temporary copy of the job's working directory, which
Ray deletes with the session: `check_output_dir` refuses outputs there. The actors take the
environment variables they need in their own runtime env (`actor_env`), which Ray merges over
the job's, so the driver never passes one to `ray.init` (that conflicts with the job's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from gmai_rl.config import TrainConfig

JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a submitted job's driver: the job's runtime env, as JSON."""


FORWARDED = ("HF_HUB_OFFLINE", "TORCH_DISTRIBUTED_DEBUG")
"""The driver's environment variables that its actors get too."""


def actor_env(cfg: TrainConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment variables every actor gets in its own runtime env (merged over the job's).

    The driver's settings of `FORWARDED` travel when set: an offline driver has offline actors,
    and `TORCH_DISTRIBUTED_DEBUG=DETAIL` makes every learner rank check, before each collective,
    that all ranks issue the same one (a mismatch, which would hang the job, fails at once naming
    each rank's collective). It must be in the environment before torch is imported, as an
    actor's runtime env is.
    """
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({name: environ[name] for name in FORWARDED if name in environ})
    if cfg.cluster.gpus_per_learner == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for a GPU and fail
    return env


def job_working_dir(cwd: Path, environ: Mapping[str, str]) -> Path | None:
    """The temporary copy of a submitted job's working directory that the driver runs in, or
    None outside such a job.

    Ray 2.60 unpacks a job's working_dir under the session's
    runtime_resources/working_dir_files/ and starts the driver there. Should the folder be named
    otherwise, the job config Ray hands the driver still tells: a working_dir URI other than
    local:// (a folder Ray uses in place) means the driver runs in a copy.
    """
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == ("runtime_resources", "working_dir_files"):
            return Path(*parts[: i + 3])
    try:
        job = json.loads(environ.get(JOB_CONFIG_VAR) or "{}")
    except json.JSONDecodeError:
        return None
    uri = str((job.get("runtime_env") or {}).get("working_dir") or "")
    return cwd if uri and not uri.startswith("local://") else None


def output_dir_error(output_dir: str, cwd: Path, environ: Mapping[str, str]) -> str | None:
    """Why `output_dir` cannot hold the run's outputs, or None: inside a job's temporary
    working directory they would vanish with the Ray session."""
    temporary = job_working_dir(cwd, environ)
    path = (cwd / output_dir).resolve()
    if temporary is None or not path.is_relative_to(temporary.resolve()):
        return None
    return (
        f"trainer.output_dir={path} lies inside this Ray job's temporary working directory "
        f"({temporary}), which Ray deletes with the session: set trainer.output_dir to an "
        "absolute path outside it (shared storage on a multi-node cluster), or submit with "
        "launch/submit.sh, which sets one"
    )


def check_output_dir(output_dir: str) -> None:
    """Refuse, at start-up, an output folder that would not outlive the Ray session."""
    error = output_dir_error(output_dir, Path.cwd(), os.environ)
    if error:
        raise ValueError(error)
