"""Which device an actor computes on: the one the configuration gave it, never a silent fallback.

A Ray actor given a GPU whose CUDA fails to initialise (a driver older than the wheel's CUDA, a
broken device) would otherwise see `torch.cuda.is_available() == False` and train a 7B model on
the CPU, failing much later in the NCCL weight sync. `require_cuda` stops it at start-up instead,
with what torch reports.
"""

from __future__ import annotations

import os
from typing import Any


def require_cuda(role: str) -> None:
    """Raise unless CUDA works in this process; `role` names the actor in the message."""
    import torch

    if torch.cuda.is_available():
        return
    try:
        torch.cuda.init()  # raises with the driver's own message when CUDA is broken
        cause = "torch.cuda.init() succeeded but no device is visible"
    except Exception as err:  # report whatever torch says, whatever its type
        cause = f"{type(err).__name__}: {err}"
    raise RuntimeError(
        f"{role}: the configuration gives it a GPU, but CUDA is unavailable here ({cause}; "
        f"torch {torch.__version__} built for CUDA {torch.version.cuda}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Check the node's "
        "driver against the torch build, or set cluster.gpus_per_learner / "
        "cluster.gpus_per_rollout_worker to 0 to run on CPU."
    )


def rng_states() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every visible GPU), for a resumable checkpoint;
    plain tensors, so `torch.load(..., weights_only=True)` reads them back."""
    import torch

    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
