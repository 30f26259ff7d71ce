"""The KL reference of a LoRA policy: the frozen base with the adapters the RL stage started from.

A full-weight policy needs a second, frozen model as its reference. A LoRA policy does not: its
base never changes, so the reference is the base plus a copy of the adapters taken when the stage
began (`reset`), a few MB. Scoring under the reference puts that copy into the adapters' storage,
runs the forward without a graph, and puts the trained values back (`applied`). When RL starts
from fresh adapters (lora_B = 0), the reference is exactly the base model; after an SFT stage it
is the SFT policy, as for full weights.

Each rank copies what it holds: the whole parameter under ZeRO 0-2, its partition
(`ds_tensor`) under ZeRO-3, whose forward gathers from the partitions; the copies are exact (same
dtype), so training resumes bit for bit. The swap runs before the micro-batch's training forward,
never between a forward and its backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gmai_rl.models.lora import adapter_names, adapters_disabled


def _held(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, else the tensor itself."""
    held = getattr(param, "ds_tensor", None)
    return held if held is not None else param.data


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

    @torch.no_grad()
    def reset(self) -> None:
        """The reference becomes the policy as it is now (every rank calls)."""
        self.saved = {name: _held(p).clone() for name, p in self.params.items()}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within it, the module computes the reference policy."""
        if self.saved is None:
            with adapters_disabled(self.module):
                yield
            return
        trained = {name: _held(p).clone() for name, p in self.params.items()}
        self._write(self.saved)
        try:
            yield
        finally:
            self._write(trained)

    @torch.no_grad()
    def _write(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            _held(p).copy_(values[name])

    def state(self) -> dict[str, torch.Tensor] | None:
        """This rank's copy (its partitions under ZeRO-3), for a resumable checkpoint."""
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
        self.saved = {k: state[k].to(_held(p).device) for k, p in self.params.items()}
