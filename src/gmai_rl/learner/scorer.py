"""Log-probs of completions under a learner rank's models, and the batches they are taken on.

The LM head runs on the completion positions only, in chunks recomputed in backward
(`gmai_rl.models.scoring`), as the module's own forward inside DeepSpeed's engine call: see
`Scorer.completion_scores` for why under ZeRO-3 it must be exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from gmai_rl.learner.batching import chunk
from gmai_rl.learner.options import LearnerOptions, LossOptions
from gmai_rl.models.inputs import EncodedPrompt, PolicyBatch, build_policy_batch
from gmai_rl.models.lora import unwrap
from gmai_rl.models.scoring import completion_scores, forward_replaced, packed_for
from gmai_rl.types import TrainSample


class Scorer:
    """Scores batches for one learner rank: its processor, padding, suppressed tokens, device."""

    def __init__(
        self,
        processor: Any,
        pad_id: int,
        suppressed: list[int],
        device: torch.device,
        opts: LearnerOptions,
        loss: LossOptions,
    ) -> None:
        self.processor, self.pad_id, self.suppressed = processor, pad_id, suppressed
        self.device, self.opts, self.loss = device, opts, loss

    def completion_scores(
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
                unwrap(engine.module),
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
    def frozen_logprobs(self, engine: Any, batch: PolicyBatch) -> torch.Tensor:
        """[b, C] log-probs of a batch's completions under `engine`'s model, without a graph."""
        logprobs, _ = self.completion_scores(engine, batch, self.loss.temperature)
        return logprobs.float()

    def batch(
        self, module: Any, micro: Sequence[TrainSample], encoded: dict[str, EncodedPrompt]
    ) -> PolicyBatch:
        """A micro-batch's inputs: right-padded, or packed into one row (pack_sequences).

        `encoded`: the prompts of the call's batch encoded so far, shared by its micro-batches
        and passes (`build_policy_batch`)."""
        batch = build_policy_batch(self.processor, micro, self.pad_id, encoded)
        return packed_for(unwrap(module), batch) if self.opts.pack_sequences else batch

    def logprobs(
        self, engine: Any, samples: Sequence[TrainSample], encoded: dict[str, EncodedPrompt]
    ) -> list[torch.Tensor]:
        """Per-micro-batch [b, C] log-probs of the samples' completions under `engine`'s model,
        on CPU."""
        return [
            self.frozen_logprobs(engine, self.batch(engine.module, micro, encoded)).cpu()
            for micro in chunk(samples, self.opts.micro_batch_size)
        ]
