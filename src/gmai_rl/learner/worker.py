"""One learner rank: the policy in a DeepSpeed ZeRO engine, trained by GRPO or SFT.

N of these (Ray actors, one per rank) form one data-parallel DeepSpeed engine: ZeRO-2 or ZeRO-3,
NCCL on GPU, gloo on CPU (`DS_ACCELERATOR=cpu`). The driver hands each rank its shard of a batch
(`gmai_rl.learner.batching`); every loss is normalised by counts over the whole mini-batch, so the
ranks' gradients average to the full-batch gradient whatever the split.

Gradient accumulation is driven here, not by DeepSpeed's fixed `gradient_accumulation_steps`: the
accumulation boundary is set on the last micro-batch of each mini-batch, so one engine serves RL
batches and SFT batches of different sizes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gmai_rl.algo import logprob_mismatch, policy_loss
from gmai_rl.learner.batching import RankBatch, chunk
from gmai_rl.learner.lora_reference import ReferenceAdapters
from gmai_rl.learner.options import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.learner.rank_metrics import LOSS_TERMS, accumulate
from gmai_rl.learner.schedule import lr_at
from gmai_rl.learner.scorer import Scorer
from gmai_rl.learner.setup import build_policy, build_reference, init_distributed
from gmai_rl.learner.steps import (
    grad_norm,
    gradients_finite,
    old_logprobs_of,
    pad_rows,
    poisoned,
    rollout_logprobs,
)
from gmai_rl.learner.zero import (
    copy_parameters,
    gather_on_rank0,
    load_on_rank0,
    weights_only_torch_loads,
)
from gmai_rl.models.device import rng_states, set_rng_states
from gmai_rl.models.inputs import EncodedPrompt, PolicyBatch
from gmai_rl.models.loading import ModelOptions, load_processor, merge_adapter, tokenizer_of
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.sync.buckets import Bucket, plan_buckets
from gmai_rl.sync.buffers import FlatBuffers
from gmai_rl.sync.group import SyncGroup, find_free_port, init_sync_group
from gmai_rl.sync.weights import DEFAULT_MAX_IN_FLIGHT, param_specs, push_weights
from gmai_rl.types import TrainSample

log = logging.getLogger(__name__)


class Learner:
    """One rank of the DeepSpeed policy engine, plus an optional frozen reference policy."""

    def __init__(
        self,
        model: ModelOptions,
        learner: LearnerOptions,
        loss: LossOptions,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        use_gpu: bool = False,
    ) -> None:
        torch.set_num_threads(learner.torch_threads)
        torch.manual_seed(learner.seed)
        self.rank, self.world_size = rank, world_size
        self.opts, self.loss_opts, self.model_opts = learner, loss, model
        self.device = torch.device(
            init_distributed(rank, world_size, master_addr, master_port, use_gpu)
        )
        self.processor = load_processor(model)
        tokenizer = tokenizer_of(self.processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # The rollout never samples vision special tokens, so they are outside the policy's support.
        self.suppressed = vision_token_ids(tokenizer)
        self.scorer = Scorer(
            self.processor, self.pad_id, self.suppressed, self.device, learner, loss
        )

        self.engine, self.optimizer = build_policy(model, learner, world_size, self.device)
        # The KL reference: a second, frozen model; with LoRA, a copy of the adapters on the
        # policy's own frozen base (`lora_reference`).
        self.reference = None
        self.reference_adapters: ReferenceAdapters | None = None
        if loss.kl_coef > 0 and model.lora.enabled:
            self.reference_adapters = ReferenceAdapters(self.engine.module)
        elif loss.kl_coef > 0:
            self.reference = build_reference(model, learner, world_size, self.device)
        self.optim = OptimOptions(total_steps=1)  # the default rate until start_stage
        self.optim_step = 0
        self.skipped_in_a_row = 0
        self.sync_group: SyncGroup | None = None
        self.sync_buffers = FlatBuffers()  # rank 0's flat buckets, kept across pushes on CPU

    # ----------------------------------------------------------------------------- schedule

    def start_stage(self, optim: OptimOptions, reset_reference: bool = False) -> None:
        """Begin a training stage (SFT or RL) with its own learning-rate schedule.

        `reset_reference` makes the KL reference a copy of the current policy: the RL stage is
        anchored to where it starts (the SFT model), not to the checkpoint loaded before SFT.
        Every rank calls it (a collective under ZeRO-3).
        """
        if optim.total_steps is None:
            raise ValueError("start_stage needs total_steps: resolve it with optim.for_stage(n)")
        self.optim, self.optim_step = optim, 0
        for group in self.optimizer.param_groups:
            group["weight_decay"] = optim.weight_decay
            group["betas"] = optim.betas
        if reset_reference and self.reference is not None:
            copy_parameters(
                self.engine.module, self.reference.module, self.rank, self.opts.zero_stage == 3
            )
        if reset_reference and self.reference_adapters is not None:
            self.reference_adapters.reset()

    def _set_lr(self) -> float:
        o = self.optim
        lr = lr_at(self.optim_step, o.lr, o.warmup_steps, o.total_steps, o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------ scoring

    def score(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """Each sample's completion log-probs under the current policy (the learner's side of a
        rollout/learner comparison; every rank calls under ZeRO-3)."""
        rows = [
            row[: len(s.completion_ids)].tolist()
            for micro, lp in zip(
                chunk(samples, self.opts.micro_batch_size),
                self.scorer.logprobs(self.engine, samples, {}),
                strict=True,
            )
            for s, row in zip(micro, lp, strict=True)
        ]
        return rows

    # ----------------------------------------------------------------------------- training

    def train_rl(self, plan: RankBatch) -> dict[str, float]:
        """PPO epochs over this rank's share of a rollout batch.

        Returns this rank's metric sums; `rank_metrics.combine_rank_metrics` turns the ranks'
        sums into means.
        """
        self.engine.train()
        flat = [s for mb in plan.minibatches for s in mb]
        # One epoch over one mini-batch is exactly on-policy: every sample is trained on before
        # the policy moves.
        on_policy = self.opts.ppo_epochs == 1 and len(plan.minibatches) == 1
        rollout = rollout_logprobs(flat, self.loss_opts)
        encoded: dict[str, EncodedPrompt] = {}  # the batch's prompts, encoded once for the call
        old: dict[int, torch.Tensor] = {}
        if self.loss_opts.use_rollout_logprobs:
            old = rollout
        else:
            # pi_prox, the policy at the start of the call. The first mini-batch's come from its
            # own training forward (detached): no optimizer step has moved the policy before it.
            # Only the later ones need a scoring pass now, before the first step: with the
            # default two mini-batches that pass is half as long.
            later = [s for mb in plan.minibatches[1:] for s in mb]
            for micro, lp in zip(
                chunk(later, self.opts.micro_batch_size),
                self.scorer.logprobs(self.engine, later, encoded),
                strict=True,
            ):
                old.update({id(s): lp[i, : len(s.completion_ids)] for i, s in enumerate(micro)})

        sums: dict[str, float] = defaultdict(float)
        for epoch in range(self.opts.ppo_epochs):
            for m, (samples, n_tok, n_seq) in enumerate(
                zip(plan.minibatches, plan.num_tokens, plan.num_seqs, strict=True)
            ):
                lr = self._set_lr()
                micros = chunk(samples, self.opts.micro_batch_size)
                for i, micro in enumerate(micros):
                    self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
                    step = self._rl_micro_step(
                        micro,
                        encoded,
                        old,
                        rollout,
                        on_policy,
                        n_tok,
                        n_seq,
                        fresh=epoch == 0 and m == 0,
                    )
                    accumulate(sums, step)
                accumulate(sums, self._optimizer_step())
                sums["lr"] += lr
        return dict(sums)

    def _rl_micro_step(
        self,
        micro: list[TrainSample],
        encoded: dict[str, EncodedPrompt],
        old: dict[int, torch.Tensor],
        rollout: dict[int, torch.Tensor],
        on_policy: bool,
        n_tok: int,
        n_seq: int,
        fresh: bool,
    ) -> dict[str, float]:
        """One forward/backward of the clipped loss on a micro-batch; its metric sums.

        `old`: the log-probs the ratio is taken against, by sample: the rollout's under
        `use_rollout_logprobs`, else the learner's own at the start of the call (pi_prox).
        `fresh`: no optimizer step has moved the policy since the call began, so a sample
        missing from `old` takes its current log-probs (detached), which are recorded in `old`
        for later epochs. `rollout`: pi_behav, or empty. `on_policy`: the whole call is one
        optimizer step (then the rollout's old log-probs can be compared with the learner's).
        """
        lo = self.loss_opts
        batch = self.scorer.batch(self.engine.module, micro, encoded)
        mask = batch.completion_mask.to(self.device)  # [b, C]
        ref_logprobs = self._reference_logprobs(batch)  # before the forward whose graph we keep
        logprobs, entropy = self.scorer.completion_scores(
            self.engine, batch, lo.temperature, with_entropy=True
        )  # [b, C] each
        assert entropy is not None
        old_logprobs = old_logprobs_of(micro, old, logprobs, mask, fresh)  # [b, C]
        behaviour = (
            pad_rows([rollout[id(s)] for s in micro], mask).to(self.device) if rollout else None
        )  # [b, C]
        # The learner's own log-probs at the start of the step, to log the mismatch: the old ones
        # unless they are the rollout's; then the current ones while no optimizer step has moved
        # the policy (on-policy); unknown otherwise.
        learner_start: torch.Tensor | None = old_logprobs
        if lo.use_rollout_logprobs:
            learner_start = logprobs.detach() if on_policy else None
        advantages = torch.tensor([s.advantage for s in micro], device=self.device)  # [b]
        corrected = lo.behaviour_is_cap is not None
        loss, metrics = policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs=ref_logprobs,
            kl_coef=lo.kl_coef,
            kl_estimator=lo.kl_estimator,
            clip_eps_low=lo.clip_eps_low,
            clip_eps_high=lo.clip_eps_high,
            dual_clip_c=lo.dual_clip_c,
            loss_agg=lo.loss_agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
            norm_len=lo.norm_len,
            behaviour_logprobs=behaviour if corrected else None,
            behaviour_is_cap=lo.behaviour_is_cap,
        )
        if behaviour is not None and learner_start is not None:
            metrics.update(logprob_mismatch(learner_start, behaviour, mask))
        if not torch.isfinite(loss):
            loss = poisoned(loss, logprobs)
        # DeepSpeed averages gradients over ranks; the loss is this rank's share of a global sum.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        tokens = float(mask.sum())
        sums = {k: float(v) for k, v in metrics.items() if k in LOSS_TERMS}
        for k, v in metrics.items():
            if k in LOSS_TERMS or k == "num_tokens":
                continue
            # Extremes combine by min/max; per-token means are weighted by this micro-batch's tokens.
            sums[k] = float(v) if k.endswith(("_min", "_max")) else float(v) * tokens
        sums["entropy"] = float((entropy * mask).sum())
        sums["tokens"] = tokens
        return sums

    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        """[b, C] log-probs under the KL reference, or None without a KL term."""
        if self.reference is not None:
            return self.scorer.frozen_logprobs(self.reference, batch)
        if self.reference_adapters is not None:
            with self.reference_adapters.applied():
                return self.scorer.frozen_logprobs(self.engine, batch)
        return None

    def reference_logprobs(self, samples: Sequence[TrainSample]) -> list[list[float]]:
        """Each sample's completion log-probs under the KL reference (tests, diagnostics; every
        rank calls under ZeRO-3)."""
        rows = []
        for micro in chunk(samples, self.opts.micro_batch_size):
            lp = self._reference_logprobs(self.scorer.batch(self.engine.module, micro, {}))
            if lp is None:
                raise RuntimeError("no KL reference: algo.loss.kl_coef is 0")
            rows += [
                row[: len(s.completion_ids)].tolist()
                for s, row in zip(micro, lp.cpu(), strict=True)
            ]
        return rows

    def rl_gradients(self, plan: RankBatch) -> list[tuple[str, torch.Tensor]]:
        """The full gradient of one on-policy RL mini-batch, without a step: (name, grad) on CPU.

        The micro-steps `train_rl` takes for a plan of one mini-batch and one epoch, then every
        trainable parameter's gradient read back whole from the ZeRO partitions (DeepSpeed's
        `safe_get_full_grad`, valid between the boundary backward and the step), then the
        gradients cleared as a step would clear them: parameters, optimizer state and the next
        accumulation are untouched. For numerics checks; collective: call on every rank.
        """
        from deepspeed.utils import safe_get_full_grad

        if len(plan.minibatches) != 1 or self.opts.ppo_epochs != 1:
            raise ValueError(
                "rl_gradients takes one on-policy mini-batch: plan it with num_minibatches=1 "
                f"and set ppo_epochs=1 (got {len(plan.minibatches)} and {self.opts.ppo_epochs})"
            )
        self.engine.train()
        (samples,) = plan.minibatches
        rollout = rollout_logprobs(samples, self.loss_opts)
        old = rollout if self.loss_opts.use_rollout_logprobs else {}
        micros, encoded = chunk(samples, self.opts.micro_batch_size), {}
        for i, micro in enumerate(micros):
            self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
            self._rl_micro_step(
                micro,
                encoded,
                old,
                rollout,
                True,
                plan.num_tokens[0],
                plan.num_seqs[0],
                fresh=True,
            )
        grads = [
            (name, safe_get_full_grad(p).detach().cpu().clone())
            for name, p in self.engine.module.named_parameters()
            if p.requires_grad
        ]
        self.optimizer.zero_grad()  # what engine.step() does after its update (ZeRO-2 and -3)
        return grads

    def train_sft(self, samples: Sequence[TrainSample], num_tokens: int) -> dict[str, float]:
        """One optimizer step of token-mean cross-entropy on the samples' completions.

        `num_tokens` is the completion-token count of the whole batch over all ranks.
        """
        self.engine.train()
        lr = self._set_lr()
        total = 0.0
        micros = chunk(samples, self.opts.micro_batch_size)
        for i, micro in enumerate(micros):
            self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
            batch = self.scorer.batch(
                self.engine.module, micro, {}
            )  # SFT prompts are distinct: nothing to share
            mask = batch.completion_mask.to(self.device)
            logprobs, _ = self.scorer.completion_scores(self.engine, batch, 1.0)
            loss = -(logprobs * mask).sum() / num_tokens
            if not torch.isfinite(loss):
                loss = poisoned(loss, logprobs)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            total += loss.item()
        return {"sft_loss": total, "lr": lr, **self._optimizer_step()}

    def _optimizer_step(self) -> dict[str, float]:
        """The step that ends a mini-batch, skipped on every rank if any gradient is not finite.

        Under ZeRO 1-3 DeepSpeed decides: its overflow check (`check_grad_overflow` in bf16, an
        invalid global norm in fp32) all-reduces one flag over the data-parallel group, and an
        overflowing step clears the gradients and leaves parameters and optimizer state as they
        were (deepspeed 0.19.8 `DeepSpeedZeroOptimizer.step`, `..._Stage3.step`,
        `BF16_Optimizer.step`). ZeRO-0 has no such check: its gradients are whole and identical
        on every rank after the all-reduce, so each rank reads them and reaches the same verdict.
        A rank whose loss alone was not finite poisons its gradients first (`poisoned`).

        Returns `optim_steps` (1 taken) or `skipped_steps` (1), `skipped_in_a_row_max` (the skips
        since this rank's last step, which the driver limits) and a taken step's `grad_norm`.
        """
        if self.opts.zero_stage == 0 and not gradients_finite(self.engine.module):
            self.optimizer.zero_grad(set_to_none=True)
            applied = False
        else:
            self.engine.step()
            applied = self.engine.was_step_applied()
        if not applied:
            self.skipped_in_a_row += 1
            return {"skipped_steps": 1.0, "skipped_in_a_row_max": float(self.skipped_in_a_row)}
        self.optim_step += 1
        self.skipped_in_a_row = 0
        return {
            "optim_steps": 1.0,
            "skipped_in_a_row_max": 0.0,
            "grad_norm": grad_norm(self.engine),
        }

    # ------------------------------------------------------------------------- weights out

    def sync_plan(
        self, max_bucket_bytes: int, wire_dtype: str | None = None, trainable_only: bool = False
    ) -> list[Bucket]:
        """The bucket plan of this policy's parameters (same on every rank); `trainable_only`
        leaves out the frozen ones (e.g. the vision tower under model.freeze_vision)."""
        named = (
            (name, p)
            for name, p in self.engine.module.named_parameters()
            if p.requires_grad or not trainable_only
        )
        return plan_buckets(param_specs(named, wire_dtype), max_bucket_bytes)

    def join_sync_group(
        self,
        host: str,
        port: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        generation: int = 0,
    ) -> None:
        """Rank 0 joins the sync group as its group rank 0 (the sender), leaving the one it was
        in (a group re-formed around a replaced rollout worker is a new group)."""
        if self.rank != 0:
            raise RuntimeError(f"only learner rank 0 joins the sync group, not rank {self.rank}")
        if self.sync_group is not None:
            self.sync_group.destroy()
        self.sync_group = init_sync_group(
            host, port, 0, world_size, backend, timeout_s, generation=generation
        )

    def push_weights(
        self,
        plan: Sequence[Bucket],
        verify: bool = False,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> dict[str, Any] | None:
        """Broadcast the policy to the rollout workers; every rank calls (ZeRO-3 gathers).
        `max_in_flight`: `sync.max_buckets_in_flight`.

        Returns, on rank 0: {"checksums": of what was sent (with `verify`) or None, "lost":
        {group rank: why} of the receivers it could not reach (gloo: a dead member is dropped
        and the push goes on for the others)}; None on the other ranks."""
        group = self.sync_group if self.rank == 0 else None
        module, stage = self.engine.module, self.opts.zero_stage
        sent = push_weights(
            module,
            plan,
            group,
            stage,
            verify=verify,
            max_in_flight=max_in_flight,
            buffers=self.sync_buffers,
        )
        if group is None:
            return None
        return {"checksums": sent, "lost": dict(group.lost)}

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Full (gathered) parameters on CPU; collective under ZeRO-3: call on every rank."""
        import deepspeed

        params = list(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(
            [p for _, p in params], enabled=self.opts.zero_stage == 3
        ):
            return [(name, p.detach().cpu().clone()) for name, p in params]

    def save_pretrained(self, path: str) -> None:
        """Write the policy as an HF checkpoint with its processor (every rank calls; rank 0
        writes). A LoRA policy is written as its adapter, in PEFT's format (its base named in
        adapter_config.json), and with `model.lora.export_merged` also merged into its base
        under `path`/merged."""
        lora = self.model_opts.lora.enabled
        state = gather_on_rank0(self.engine.module, self.rank, trainable_only=lora)
        if state is None:
            return
        self.engine.module.save_pretrained(path, state_dict=state)
        self.processor.save_pretrained(path)
        if lora and self.model_opts.lora.export_merged:
            merge_adapter(path, f"{path}/merged", self.model_opts)

    # ------------------------------------------------------------------ resumable state

    def save_state(self, folder: str) -> None:
        """Write this rank's part of a resumable checkpoint into `folder` (every rank calls).

        The policy through DeepSpeed's checkpointing (weights, optimizer state, ZeRO
        partitions) with the stage's schedule position, for a LoRA policy the adapters only;
        the KL reference (the policy RL started from, no longer recoverable from the model path)
        as safetensors written by rank 0, for LoRA each rank's copy of the adapters; this rank's
        RNG states.
        """
        from safetensors.torch import save_file

        out = Path(folder) / "learner"
        out.mkdir(parents=True, exist_ok=True)
        client = {"optim": asdict(self.optim), "optim_step": self.optim_step}
        lora = self.model_opts.lora.enabled
        # A LoRA policy's base is its model.path, unchanged: only the adapters are saved.
        self.engine.save_checkpoint(
            str(out),
            tag="policy",
            client_state=client,
            save_latest=False,
            exclude_frozen_parameters=lora,
        )
        adapters = self.reference_adapters.state() if self.reference_adapters else None
        if adapters is not None:  # LoRA's reference: the adapters RL started from
            save_file(adapters, out / f"reference_adapters_rank{self.rank}.safetensors")
        if self.reference is not None:
            state = gather_on_rank0(self.reference.module, self.rank)
            if state is not None:
                save_file(
                    {k: v.contiguous() for k, v in state.items()}, out / "reference.safetensors"
                )
        torch.save(rng_states(), out / f"rng_rank{self.rank}.pt")

    def load_state(self, folder: str) -> None:
        """Restore what `save_state` wrote (every rank calls)."""
        from safetensors.torch import load_file

        src = Path(folder) / "learner"
        with weights_only_torch_loads():
            _, client = self.engine.load_checkpoint(
                str(src),
                tag="policy",
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=not self.model_opts.lora.enabled,  # the base is not in it
            )
        if client is None:
            raise RuntimeError(f"learner rank {self.rank}: no policy checkpoint in {src}")
        optim = dict(client["optim"])
        optim["betas"] = tuple(optim["betas"])
        self.optim, self.optim_step = OptimOptions(**optim), int(client["optim_step"])
        if self.reference is not None:
            load_on_rank0(self.reference.module, src / "reference.safetensors", self.rank)
        if self.reference_adapters is not None:
            adapters = src / f"reference_adapters_rank{self.rank}.safetensors"
            self.reference_adapters.load_state(load_file(adapters) if adapters.exists() else None)
        set_rng_states(torch.load(src / f"rng_rank{self.rank}.pt", weights_only=True))

    def ping(self) -> int:
        return self.rank

    def reserve_port(self) -> int:
        """A port reserved on this rank's node (`find_free_port`), for a store it will host: the
        weight-sync group's, which rank 0 joins next."""
        return find_free_port()

    def release_cached_memory(self) -> None:
        """Hand the CUDA caching allocator's free blocks back to the device, so that a colocated
        vLLM engine waking up finds the memory training peaked at (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
