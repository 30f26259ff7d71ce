"""Helpers of the job tier: the tiny run, a Ray head node's environment, stopping it, waiting
for a job."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
"""The `ray` CLI and the `python` a job's driver runs: this environment's."""

TINY_RUN = [
    "cluster.learner_ranks=1",
    "cluster.rollout_workers=1",
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "sft.steps=2",
    "sft.batch_size=4",
    "trainer.steps=2",
    "algo.prompts_per_step=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=8",
    "learner.micro_batch_size=4",
]
"""The smallest run that still does every stage: SFT steps, held-out evaluation before and
after RL, RL steps with weight syncs, the final checkpoint. One learner rank, one rollout worker
and one reward worker: 2.5 CPUs."""

JOB_CPUS = 3


def free_ports(n: int) -> list[int]:
    """`n` ports free on this machine right now (held together so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class HeadNode:
    dashboard: str
    """The address `ray job submit` talks to (RAY_ADDRESS)."""
    env: dict[str, str]
    """Environment for the ray CLI and launch/submit.sh: this venv first on PATH, RAY_ADDRESS,
    RAY_AUTH_MODE=disabled."""
    temp_dir: Path
    """Ray's root temporary folder for this cluster (sessions, logs, job working dirs)."""


def cluster_env(dashboard: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # No PYTHONPATH of the test process: a job finds the code the way a user's does, through
    # the PYTHONPATH=src that launch/submit.sh sets in the job's working directory.
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ADDRESS=dashboard,
        RAY_AUTH_MODE="disabled",
    )
    return env


def stop_session(session_id: int, grace_s: float = 5) -> None:
    """Stop every process of a session (one `ray start` and what it spawned: GCS, raylet,
    dashboard, workers) and their children (job drivers start sessions of their own). The GCS
    server may sit out SIGTERM: after `grace_s` whatever is left is killed (a test cluster holds
    nothing to save)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session_id:
                procs[proc.pid] = proc
                procs.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.Error, OSError):
            continue
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in procs.values()):
        time.sleep(0.5)
    for proc in procs.values():
        if _running(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _running(proc) -> bool:
    """Alive and not a zombie (which only its parent, not this process, can reap)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for_job(client, job_id: str, timeout_s: float, poll_s: float = 5) -> str:
    """The job's final status (SUCCEEDED, FAILED, STOPPED), or TIMEOUT after stopping it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(poll_s)
    client.stop_job(job_id)
    return "TIMEOUT"
