"""The nodes the plan checks against: GPUs per node and their memory (from the config, or the
driver's GPUs when it leaves them null), the driver's memory when every actor runs on its
machine, and how many nodes the placement group's GPU bundles take.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gmai_rl.config import TrainConfig
from gmai_rl.rollout.sizing import GIB


@dataclass(frozen=True)
class Hardware:
    """The nodes the plan checks against."""

    gpus_per_node: int | None
    gpu_memory: float | None
    """Bytes per GPU; None: unknown (the GPU memory checks are skipped)."""
    source: str
    single_node: bool
    """A local ray.init(): every actor runs on the driver's machine."""
    host_memory: float | None = None
    """The driver's memory when every actor runs there; None: not checked (`host_note` says
    why)."""
    host_note: str = ""
    driver: str | None = None
    """The NVIDIA driver's version on this machine ("580.65.06"); None: no driver loaded."""


CUDA13_DRIVER = 580
"""The oldest NVIDIA driver branch that runs CUDA 13.0 (580.65.06 on Linux), which the GPU lock's
wheels are built for (constraints-gpu.txt: torch 2.13.0 from PyPI, vLLM 0.32.0)."""

DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def nvidia_driver_version(text: str | None = None) -> str | None:
    """The loaded NVIDIA kernel module's version, read from `text` (else DRIVER_VERSION_FILE,
    which reading does not initialise CUDA); None without an NVIDIA driver."""
    if text is None:
        try:
            with open(DRIVER_VERSION_FILE) as f:
                text = f.read()
        except OSError:
            return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def driver_problems(version: str | None) -> list[str]:
    """A driver too old for the GPU lock's CUDA 13 wheels, with the fix; [] without a driver."""
    if version is None or int(version.split(".")[0]) >= CUDA13_DRIVER:
        return []
    return [
        f"NVIDIA driver {version}: the GPU lock (constraints-gpu.txt) installs torch and vLLM "
        f"built for CUDA 13, which needs driver >= {CUDA13_DRIVER} (580.65.06 or later): upgrade "
        "the node's driver, or install CUDA 12 builds of torch and vLLM outside the lock"
    ]


def driver_gpus() -> tuple[int, float] | None:
    """(GPU count, bytes of the first GPU) on the driver's machine, or None without CUDA. Only
    called for null cluster.gpus_per_node / gpu_memory_gib: it initialises CUDA in the driver."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.device_count(), float(torch.cuda.get_device_properties(0).total_memory)


def has_nvidia_devices() -> bool:
    """Whether this machine has NVIDIA GPUs, without initialising CUDA (the device files)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def hardware(cfg: TrainConfig) -> Hardware:
    """cluster.gpus_per_node and cluster.gpu_memory_gib, null ones read from the driver's GPUs;
    the driver's memory when the actors will run on its machine (a local ray.init())."""
    c = cfg.cluster
    gpus, memory = c.gpus_per_node, c.gpu_memory_gib * GIB if c.gpu_memory_gib else None
    source = "cluster.gpus_per_node, cluster.gpu_memory_gib"
    if gpus is None or memory is None:
        found = driver_gpus()
        source = "the driver's GPUs (torch.cuda)" if found else "unknown: no GPU on the driver"
        if found:
            gpus = found[0] if gpus is None else gpus
            memory = found[1] if memory is None else memory
    if c.address or os.environ.get("RAY_ADDRESS"):
        return Hardware(gpus, memory, source, False, None, "the Ray cluster is remote")
    wants_gpus = c.gpus_per_learner > 0 or c.gpus_per_rollout_worker > 0
    if wants_gpus and not has_nvidia_devices():
        note = "the config asks for GPUs and this machine has none: it plans for another one"
        return Hardware(gpus, memory, source, True, None, note)
    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Hardware(gpus, memory, source, True, host, driver=nvidia_driver_version())


def nodes_needed(bundle_gpus: Iterable[float], gpus_per_node: int) -> int:
    """Nodes a first-fit-decreasing packing of the bundles' GPUs takes (a bundle is never split
    over nodes); 0 without GPU bundles."""
    free: list[float] = []
    for gpus in sorted((g for g in bundle_gpus if g > 0), reverse=True):
        for i, left in enumerate(free):
            if gpus <= left + 1e-9:
                free[i] = left - gpus
                break
        else:
            free.append(gpus_per_node - gpus)
    return len(free)
