"""The KL reference of a LoRA policy: the frozen base with the adapters the RL stage started from.

A full-weight policy needs a second, frozen model as its reference. A LoRA policy does not: its
base never changes, so the reference is the base plus a copy of the adapters taken when the stage
began (`reset`), a few MB. Scoring under the reference puts that copy into the adapters' storage,
runs the forward without a graph, and puts the trained values back (`applied`). When RL starts
from fresh adapters (lora_B = 0), the reference is exactly the base model; after an SFT stage it
is the SFT policy, as for full weights.

Every rank keeps the whole copy. Under ZeRO-3 the adapters are partitioned, and a parameter
may also be held gathered between uses (DeepSpeed keeps the ones it expects to reuse soon), so
writing into a rank's partition would not reach a forward that reads the gathered tensor: the
swap goes through `deepspeed.zero.GatheredParameters` with a modifier rank, which gathers,
lets the values be written, and re-partitions them. The copies are exact (same dtype), so
training resumes bit for bit. The swap runs before the micro-batch's training forward, never
between a forward and its backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gmai_rl.learner.zero import partitioned
from gmai_rl.models.lora import adapter_names, adapters_disabled


class ReferenceAdapters:
    """A frozen copy of a LoRA policy's adapters, applied while the KL reference is scored."""

    def __init__(self, module: torch.nn.Module) -> None:
        named = dict(module.named_parameters())
        self.module = module
        self.params = {name: named[name] for name in adapter_names(list(named))}
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no LoRA adapter parameters")
        self.saved: dict[str, torch.Tensor] | None = None
        """None: no stage began, the reference is the base (adapters disabled)."""

    def _whole(self, modify: bool) -> Any:
        """The adapters whole on every rank within (ZeRO-3 gathers them; writes made within
        are kept, from rank 0, when `modify`); nothing to do for whole parameters."""
        import deepspeed

        params = list(self.params.values())
        return deepspeed.zero.GatheredParameters(
            params, modifier_rank=0 if modify else None, enabled=partitioned(params[0])
        )

    @torch.no_grad()
    def reset(self) -> None:
        """The reference becomes the policy as it is now (every rank calls)."""
        with self._whole(modify=False):
            self.saved = {name: p.data.clone() for name, p in self.params.items()}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within it, the module computes the reference policy (every rank calls)."""
        if self.saved is None:
            with adapters_disabled(self.module):
                yield
            return
        trained = self._write(self.saved)
        try:
            yield
        finally:
            self._write(trained)

    @torch.no_grad()
    def _write(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put `values` into the adapters; returns what they held."""
        with self._whole(modify=True):
            held = {name: p.data.clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.data.copy_(values[name])
        return held

    def state(self) -> dict[str, torch.Tensor] | None:
        """The copy (whole, the same on every rank), for a resumable checkpoint."""
        if self.saved is None:
            return None
        return {k: v.cpu().contiguous() for k, v in self.saved.items()}

    def load_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            self.saved = None
            return
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(f"reference adapters: the checkpoint lacks {missing[:3]}...")
        self.saved = {k: state[k].to(p.device) for k, p in self.params.items()}
