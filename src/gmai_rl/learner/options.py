"""The learner's option schemas: what each rank is built with, and each training stage's schedule.

Plain dataclasses, importable without DeepSpeed or a model: the run's configuration tree
(`gmai_rl.config`) nests them, and the cluster hands them to the `Learner` actors. The defaults are
the demo's values (tiny model, CPU); the full-size presets in conf/experiment/ set their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gmai_rl.types import StrChoice

# The choices of the pure functions in gmai_rl.algo (a unit test checks that they agree); the
# values are what those functions take.


class Estimator(StrChoice):
    """Group advantage estimator (gmai_rl.algo.advantages)."""

    grpo = "grpo"
    drgrpo = "drgrpo"
    rloo = "rloo"


class LossAgg(StrChoice):
    """How token losses become one scalar (gmai_rl.algo.loss.aggregate)."""

    token_mean = "token-mean"
    seq_mean_token_mean = "seq-mean-token-mean"
    seq_mean_token_sum_norm = "seq-mean-token-sum-norm"
    """Dr.GRPO: sums over tokens divided by a constant (norm_len)."""


class KLEstimator(StrChoice):
    """Estimator of the KL to the reference policy (gmai_rl.algo.kl)."""

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


@dataclass
class OptimOptions:
    lr: float = 1e-3
    """Peak learning rate of AdamW. The demo's RL rate: the tiny model maps its description of
    the image to the right option in ~150 steps at 1e-3."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    total_steps: int | None = None
    """Optimizer steps over which the rate decays (cosine) to min_lr_ratio * lr; null: the
    stage's own count (SFT: sft.steps; RL: trainer.steps x learner.num_minibatches x
    learner.ppo_epochs)."""
    min_lr_ratio: float = 1.0
    """Floor of the cosine decay, as a fraction of lr; 1 keeps the rate constant (the demo: a
    decaying rate stalled the tiny model short of learning the task)."""

    def for_stage(self, stage_steps: int) -> OptimOptions:
        """These options with total_steps resolved to the stage's optimizer steps when unset."""
        return self if self.total_steps is not None else replace(self, total_steps=stage_steps)


@dataclass
class LossOptions:
    clip_eps_low: float = 0.2
    """The ratio is clipped below at 1 - clip_eps_low."""
    clip_eps_high: float = 0.28
    """... and above at 1 + clip_eps_high (DAPO clip-higher when larger than the low bound)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens; null disables it."""
    loss_agg: LossAgg = LossAgg.token_mean
    """token_mean, seq_mean_token_mean or seq_mean_token_sum_norm (Dr.GRPO)."""
    norm_len: float | None = None
    """Constant divisor of seq-mean-token-sum-norm (Dr.GRPO); usually max_new_tokens."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference policy (the policy RL starts from); 0 loads no
    reference at all. The demo needs it: without it the think text decays into a loop that
    greedy decoding never leaves."""
    kl_estimator: KLEstimator = KLEstimator.k3
    """k1, k2 or k3 (Schulman's unbiased, non-negative estimator)."""
    temperature: float = 1.0
    """The rollout's sampling temperature: log-probs are scored under the same distribution (the
    run's config ties it to rollout.temperature)."""
    use_rollout_logprobs: bool = False
    """Take old log-probs from the rollout engine instead of recomputing them here (saves the
    learner's scoring pass over every mini-batch but the first, which takes its own from its
    training forward; the clip is then centred on the engine's policy). Not with
    behaviour_is_cap."""
    behaviour_is_cap: float | None = None
    """Off-policy correction (AReaL's decoupled PPO with veRL's truncated importance sampling,
    gmai_rl.algo.loss.truncated_is_weights): the clip stays centred on the learner's own log-probs
    of the batch at the start of the step (pi_prox), and each token's policy loss is weighted by
    min(pi_prox / pi_behav, behaviour_is_cap), pi_behav being the rollout engine's log-probs. It
    corrects for stale batches (algo.max_staleness) and for the engine's numerics (vLLM in bf16).
    null: off, the plain clipped loss; 2 is veRL's usual cap; must be >= 1. Needs every sample's
    rollout log-probs (both engines return them)."""


@dataclass
class LearnerOptions:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 shards gradients and optimizer state, 3 also the parameters."""
    micro_batch_size: int = 32
    """Samples per forward/backward pass on one rank."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 2
    """Optimizer steps per pass over a rollout batch. The demo takes two: on seed 2 one step per
    batch reached 50% held-out accuracy in 200 steps, two reached 100%."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    max_skipped_steps: int = 3
    """An optimizer step whose loss or gradient holds a NaN or Inf is skipped on every rank
    (warned, counted in `skipped_steps`); this many in a row stop the run, whose last checkpoint
    then holds the weights from before them."""
    bf16: bool = False
    """Train in bf16 with fp32 master weights (GPU)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer state in CPU memory."""
    reference_offload: bool = False
    """Keep the KL reference's parameters in CPU memory, partitioned over the ranks (ZeRO-3
    parameter offload), gathered layer by layer when it scores: without it, under ZeRO-0/1/2 the
    reference is a full replica on every GPU (15 GB at 7B in bf16)."""
    seed: int = 0
    """Seed of torch on every rank (dropout, if the model has any); the run's config ties it to
    trainer.seed."""
    torch_threads: int = 1
    """Intra-op threads of this process on CPU (keep ranks x threads <= cores)."""
    pack_sequences: bool = False
    """Remove the padding from every micro-batch: its samples back to back in one row, each
    attending only to itself (models.inputs.pack_policy_batch). Pays with
    model.attn_implementation=flash_attention_2 on GPU (variable-length attention, no pad
    tokens computed); with SDPA, as on CPU, the row's attention is one dense masked matrix, and
    on the demo it made the learner 3x slower (benchmarks/RESULTS.md, learner throughput)."""
    logprob_chunk_size: int = 512
    """Completion tokens per chunk of the fused LM head when the learner scores completions. The
    vocabulary-sized memory is a few chunks of fp32 logits (chunk x V x 4 bytes each: 311 MB at
    512 x 151,936), whatever the batch, prompt and completion lengths; backward also sums the
    head's weight gradient over chunks in fp32 (V x H x 4 bytes, with one chunk's V x H product in
    the head's dtype). Smaller saves memory, larger makes fewer, bigger matmuls."""

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps the learner takes on one rollout batch."""
        return self.num_minibatches * self.ppo_epochs
