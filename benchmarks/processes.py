"""What the process benchmarks (memory.py, startup.py) share: how a run's processes are listed
and named, and how a run is stopped. Imported as a sibling module: run the benchmarks as scripts
(`python benchmarks/memory.py`), which puts this folder on sys.path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence

import psutil

ACTORS = ("Learner", "RolloutWorker", "RewardWorker")
"""The actor classes the cluster starts."""
WORKER_SCRIPTS = ("default_worker.py", "setup_worker.py")
"""A Ray worker's command line before it takes its `ray::` title."""


def process_title(argv: Sequence[str]) -> str:
    """A process's name from its command line: a Ray title as it is (`ray::Learner.__init__`,
    `ray::IDLE`), a Python script's file name (`dashboard.py`), a module (`-m gmai_rl.train`),
    else the executable's name (`raylet`, `gcs_server`)."""
    if not argv:
        return "?"
    first = argv[0].strip()
    if first.startswith("ray::"):
        return first.split()[0]  # setproctitle may pad the title with spaces
    exe = os.path.basename(first)
    if exe.startswith("python"):
        args = list(argv[1:])
        if "-m" in args and args.index("-m") + 1 < len(args):
            return "-m " + args[args.index("-m") + 1]
        scripts = [a for a in args if a.endswith(".py")]
        if scripts:
            return os.path.basename(scripts[0])
    return exe


def tree(root: psutil.Process) -> list[psutil.Process]:
    """`root` and every process below it; [] once `root` has ended."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the run's process group, as Ctrl-C would; kill what is left after 60 s, and
    anything of the run still alive in its group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
