"""Flat bucket buffers kept from one weight push to the next, on CPU.

Why: a bucket's flat buffer is tens to hundreds of MB. On CPU, glibc serves such an allocation with
a fresh `mmap` and returns it to the OS when freed, so a buffer allocated per bucket and per push
is page-faulted in again every time: measured with gloo on 2 cores (benchmarks/sync_bench.py,
docs/benchmarks.md), an 80 MB broadcast took 0.08 s into a kept buffer and 0.30-0.39 s into a fresh
one, and that is why bigger buckets were slower than small ones (which malloc recycles). CUDA needs
none of this: PyTorch's caching allocator already hands the same blocks back, and keeping buffers
there would only hold GPU memory between pushes, so on CUDA `take` allocates as before.

A buffer is reused only where nothing else still reads it: the sender's slot k % max_in_flight
(bucket k is opened only after bucket k - max_in_flight is done, see `send_weights`), and the
receiver's single slot only for a loader that copies each tensor before asking for the next
bucket (see `receive_weights`).
"""

from __future__ import annotations

import torch


class FlatBuffers:
    """Buffers by slot, each grown to the largest bucket it has held; CPU only (see above)."""

    def __init__(self) -> None:
        self._slots: dict[int, torch.Tensor] = {}

    def take(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A `[numel]` tensor of `dtype` on `device`, its contents undefined.

        On CPU, the same memory as the last `take` of this slot when it was big enough and of
        the same dtype; the caller must be done with that tensor. Elsewhere a new tensor.
        """
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        kept = self._slots.get(slot)
        if kept is None or kept.dtype != dtype or kept.numel() < numel:
            kept = torch.empty(numel, dtype=dtype, device=device)
            self._slots[slot] = kept
        return kept[:numel]

    @property
    def nbytes(self) -> int:
        """Bytes held between pushes."""
        return sum(t.numel() * t.element_size() for t in self._slots.values())
