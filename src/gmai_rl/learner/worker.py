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
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from gmai_rl.algo import policy_loss
from gmai_rl.learner.batching import RankBatch, chunk
from gmai_rl.learner.options import LearnerOptions, LossOptions, OptimOptions
from gmai_rl.learner.rank_metrics import LOSS_TERMS, accumulate
from gmai_rl.learner.schedule import lr_at
from gmai_rl.models.inputs import PolicyBatch, build_policy_batch
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.scoring import completion_scores, forward_replaced
from gmai_rl.models.tokens import vision_token_ids
from gmai_rl.sync.buckets import Bucket, plan_buckets
from gmai_rl.sync.group import SyncGroup, init_sync_group
from gmai_rl.sync.weights import param_specs, push_weights
from gmai_rl.types import TrainSample

log = logging.getLogger(__name__)


def deepspeed_config(opts: LearnerOptions, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one engine; accumulation is driven by the learner (module doc)."""
    zero: dict[str, Any] = {"stage": opts.zero_stage}
    if opts.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if opts.zero_stage == 3:
        # Gather full parameters for every forward: the tiny and medium models we train fit.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": opts.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": opts.micro_batch_size * world_size,
        "gradient_clipping": opts.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": opts.bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def reference_config(opts: LearnerOptions, world_size: int) -> dict[str, Any]:
    """The frozen reference policy: no optimizer, so ZeRO-1/2 have nothing to shard and it is a
    full replica (stage 0); under ZeRO-3 its parameters are partitioned like the policy's."""
    config = deepspeed_config(opts, world_size)
    config["zero_optimization"] = {"stage": 3 if opts.zero_stage == 3 else 0}
    if opts.zero_stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> str:
    """Join the learner group; returns the device ("cuda:<local>" or "cpu")."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    import deepspeed

    if not use_cuda:
        # The shared-memory comm op serves only tensor-parallel inference all-reduce, never
        # training; marking it incompatible skips its C++ build (~20-50 s on a fresh machine).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False
    )
    if use_cuda:
        # Ray gives each actor its own GPU(s) through CUDA_VISIBLE_DEVICES.
        torch.cuda.set_device(0)
        return "cuda:0"
    return "cpu"


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
    ) -> None:
        import deepspeed

        torch.set_num_threads(learner.torch_threads)
        torch.manual_seed(learner.seed)
        self.rank, self.world_size = rank, world_size
        self.opts, self.loss_opts, self.model_opts = learner, loss, model
        self.device = torch.device(init_distributed(rank, world_size, master_addr, master_port))
        self.processor = load_processor(model)
        tokenizer = tokenizer_of(self.processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # The rollout never samples vision special tokens, so they are outside the policy's support.
        self.suppressed = vision_token_ids(tokenizer)

        policy = load_model(model)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0)
        config = deepspeed_config(learner, world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, config=config
        )
        self.reference = None
        if loss.kl_coef > 0:
            reference = load_model(
                ModelOptions(**{**asdict(model), "gradient_checkpointing": False})
            )
            reference.requires_grad_(False)
            self.reference, *_ = deepspeed.initialize(
                model=reference.eval(), config=reference_config(learner, world_size)
            )
        self.optim = OptimOptions(total_steps=1)  # the default rate until start_stage
        self.optim_step = 0
        self.sync_group: SyncGroup | None = None

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
            self._copy_policy_to_reference()

    @torch.no_grad()
    def _copy_policy_to_reference(self) -> None:
        import deepspeed

        zero3 = self.opts.zero_stage == 3
        policy = dict(self.engine.module.named_parameters())
        for name, ref_param in self.reference.module.named_parameters():
            source = policy[name]
            # Under ZeRO-3 both are partitioned: gather, let rank 0 copy, re-partition from it.
            with deepspeed.zero.GatheredParameters(
                [source, ref_param], modifier_rank=0, enabled=zero3
            ):
                if self.rank == 0 or not zero3:
                    ref_param.data.copy_(source.data)

    def _set_lr(self) -> float:
        o = self.optim
        lr = lr_at(self.optim_step, o.lr, o.warmup_steps, o.total_steps, o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------------ scoring

    def _completion_scores(
        self, engine: Any, batch: PolicyBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[b, C] log-probs (and entropies) of a batch's completions under `engine`'s model.

        The LM head runs on the completion positions only, in chunks recomputed in backward
        (`models.scoring`): no [b, L, V] or [b, C, V] logits are made or kept.

        Under ZeRO-3 the head's weight is partitioned, and only the module's hooks gather it: in
        its pre-forward hook for the call, in a hook on its outputs for its backward. So the fused
        head runs as the head module's forward, once per micro-batch: the weight is whole in both
        passes, the gradient reaches it while it is whole (autograd runs a leaf's accumulation
        first), and every rank makes the same two gathers whatever its number of tokens or chunks
        (calling the module once per chunk would not: ranks with different token counts would
        issue different numbers of collectives and hang). Reading `lm_head.weight` outside a call
        would see an empty shard, and `GatheredParameters` around the forward would not cover the
        backward, which runs later inside `engine.backward`. A tied embedding is the same
        parameter, gathered the same way. ZeRO-2 (and the stage-0 reference) keep whole
        parameters: no hooks, nothing changes.

        The whole scoring runs as the engine module's forward, through `engine(...)`: DeepSpeed
        hooks the engine's outputs to open its backward bookkeeping (`engine.backward` relies on
        it) and starts ZeRO-3's fetch trace at the module's forward.
        """
        batch = batch.to(self.device)

        def score(**model_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return completion_scores(
                engine.module,
                replace(batch, model_inputs=model_inputs),
                temperature,
                self.suppressed,
                self.opts.logprob_chunk_size,
                with_entropy,
            )

        with forward_replaced(engine.module, score):
            scores: tuple[torch.Tensor, torch.Tensor | None] = engine(**batch.model_inputs)
        return scores

    @torch.no_grad()
    def _frozen_logprobs(self, engine: Any, batch: PolicyBatch) -> torch.Tensor:
        """[b, C] log-probs of a batch's completions under `engine`'s model, without a graph."""
        logprobs, _ = self._completion_scores(engine, batch, self.loss_opts.temperature)
        return logprobs.float()

    def _score(self, module: Any, samples: Sequence[TrainSample]) -> list[torch.Tensor]:
        """Per-micro-batch [b, C] log-probs of the samples' completions under `module`, on CPU."""
        return [
            self._frozen_logprobs(
                module, build_policy_batch(self.processor, micro, self.pad_id)
            ).cpu()
            for micro in chunk(samples, self.opts.micro_batch_size)
        ]

    # ----------------------------------------------------------------------------- training

    def train_rl(self, plan: RankBatch) -> dict[str, float]:
        """PPO epochs over this rank's share of a rollout batch.

        Returns this rank's metric sums; `rank_metrics.combine_rank_metrics` turns the ranks'
        sums into means.
        """
        self.engine.train()
        lo = self.loss_opts
        flat = [s for mb in plan.minibatches for s in mb]
        # One epoch over one mini-batch is exactly on-policy: the old log-probs equal the current
        # ones, so they are taken from the same forward pass (detached) instead of a second one.
        on_policy = self.opts.ppo_epochs == 1 and len(plan.minibatches) == 1
        old: dict[int, torch.Tensor] = {}
        if lo.use_rollout_logprobs:
            old = {id(s): torch.tensor(s.rollout_logprobs or []) for s in flat}
        elif not on_policy:
            for micro, lp in zip(
                chunk(flat, self.opts.micro_batch_size), self._score(self.engine, flat), strict=True
            ):
                old.update({id(s): lp[i, : len(s.completion_ids)] for i, s in enumerate(micro)})

        sums: dict[str, float] = defaultdict(float)
        for _ in range(self.opts.ppo_epochs):
            for samples, n_tok, n_seq in zip(
                plan.minibatches, plan.num_tokens, plan.num_seqs, strict=True
            ):
                lr = self._set_lr()
                micros = chunk(samples, self.opts.micro_batch_size)
                for i, micro in enumerate(micros):
                    self.engine.set_gradient_accumulation_boundary(i == len(micros) - 1)
                    accumulate(sums, self._rl_micro_step(micro, old, n_tok, n_seq))
                self.engine.step()
                self.optim_step += 1
                sums["grad_norm"] += _grad_norm(self.engine)
                sums["lr"] += lr
                sums["optim_steps"] += 1
        return dict(sums)

    def _rl_micro_step(
        self, micro: list[TrainSample], old: dict[int, torch.Tensor], n_tok: int, n_seq: int
    ) -> dict[str, float]:
        lo = self.loss_opts
        batch = build_policy_batch(self.processor, micro, self.pad_id)
        mask = batch.completion_mask.to(self.device)  # [b, C]
        logprobs, entropy = self._completion_scores(
            self.engine, batch, lo.temperature, with_entropy=True
        )  # [b, C] each
        assert entropy is not None
        old_logprobs = _pad_rows([old[id(s)] for s in micro], mask) if old else logprobs.detach()
        ref_logprobs = None
        if self.reference is not None:
            ref_logprobs = self._frozen_logprobs(self.reference, batch)
        advantages = torch.tensor([s.advantage for s in micro], device=self.device)  # [b]
        loss, metrics = policy_loss(
            logprobs,
            old_logprobs.to(self.device),
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
        )
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
            batch = build_policy_batch(self.processor, micro, self.pad_id)
            mask = batch.completion_mask.to(self.device)
            logprobs, _ = self._completion_scores(self.engine, batch, 1.0)
            loss = -(logprobs * mask).sum() / num_tokens
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            total += loss.item()
        self.engine.step()
        self.optim_step += 1
        return {"sft_loss": total, "grad_norm": _grad_norm(self.engine), "lr": lr}

    # ------------------------------------------------------------------------- weights out

    def sync_plan(self, max_bucket_bytes: int, wire_dtype: str | None = None) -> list[Bucket]:
        """The bucket plan of this policy's parameters (same on every rank)."""
        specs = param_specs(self.engine.module.named_parameters(), wire_dtype)
        return plan_buckets(specs, max_bucket_bytes)

    def join_sync_group(
        self, host: str, port: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Rank 0 joins the sync group as its group rank 0 (the sender)."""
        if self.rank != 0:
            raise RuntimeError(f"only learner rank 0 joins the sync group, not rank {self.rank}")
        self.sync_group = init_sync_group(host, port, 0, world_size, backend, timeout_s)

    def push_weights(self, plan: Sequence[Bucket], verify: bool = False) -> dict[str, str] | None:
        """Broadcast the policy to the rollout workers; every rank calls (ZeRO-3 gathers)."""
        group = self.sync_group if self.rank == 0 else None
        return push_weights(self.engine.module, plan, group, self.opts.zero_stage, verify=verify)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Full (gathered) parameters on CPU; collective under ZeRO-3: call on every rank."""
        import deepspeed

        params = list(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(
            [p for _, p in params], enabled=self.opts.zero_stage == 3
        ):
            return [(name, p.detach().cpu().clone()) for name, p in params]

    def save_pretrained(self, path: str) -> None:
        """Write the policy as an HF checkpoint with its processor (collective under ZeRO-3)."""
        params = dict(self.named_parameters())
        if self.rank == 0:
            module = self.engine.module
            state = {k: v for k, v in params.items()}
            module.save_pretrained(path, state_dict=state)
            self.processor.save_pretrained(path)

    def ping(self) -> int:
        return self.rank


def _pad_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Stack 1-D rows into a zero-padded [b, C] tensor shaped like `like`."""
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row[: like.shape[1]]
    return out


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
