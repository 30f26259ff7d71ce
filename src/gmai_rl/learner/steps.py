"""Pieces of a training step that need no engine: the old log-probs a ratio is taken against,
the rollout's log-probs, a loss made to poison its gradients, what the skip decision reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gmai_rl.learner.options import LossOptions
from gmai_rl.types import TrainSample


def old_logprobs_of(
    micro: Sequence[TrainSample],
    old: dict[int, torch.Tensor],
    current: torch.Tensor,
    mask: torch.Tensor,
    fresh: bool,
) -> torch.Tensor:
    """[b, C] old log-probs of a micro-batch, on `current`'s device: from `old` (by sample), or,
    for a micro-batch trained on before any optimizer step (`fresh`) and not yet in `old`, the
    `current` ones detached, which are then recorded in `old` for later epochs."""
    known = [id(s) in old for s in micro]
    if all(known):
        return pad_rows([old[id(s)] for s in micro], mask).to(current.device)
    if not fresh or any(known):
        raise RuntimeError(
            "a micro-batch has no old log-probs after an optimizer step moved the policy: "
            "only the first mini-batch of a call may take them from its own forward"
        )
    detached = current.detach()
    old.update({id(s): detached[i, : len(s.completion_ids)] for i, s in enumerate(micro)})
    return detached


def pad_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Stack 1-D rows into a zero-padded [b, C] tensor shaped like `like`."""
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row[: like.shape[1]]
    return out


def poisoned(loss: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """A non-finite loss whose backward makes every gradient it reaches NaN.

    A NaN or Inf loss usually spreads into the gradients on its own, but not always (an Inf
    behind a clamp, a NaN that only the forward value carries); the overflow check reads
    gradients, so a rank that saw a bad loss makes sure its gradients say so.
    """
    return loss + (logprobs * float("nan")).sum()


def gradients_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def rollout_logprobs(samples: Sequence[TrainSample], lo: LossOptions) -> dict[int, torch.Tensor]:
    """Each sample's rollout log-probs (pi_behav), by `id(sample)`.

    Empty when some sample has none (or not one per completion token) and the loss does not
    need them: then no learner/rollout mismatch is logged. The loss needs them with
    `use_rollout_logprobs` or `behaviour_is_cap`; then such a sample is an error.
    """
    for s in samples:
        have = len(s.rollout_logprobs or [])
        if have == len(s.completion_ids):
            continue
        if not lo.use_rollout_logprobs and lo.behaviour_is_cap is None:
            return {}
        raise ValueError(
            f"a sample of prompt {s.prompt.id!r} (policy version {s.policy_version}) has "
            f"{have} rollout log-probs for {len(s.completion_ids)} completion tokens: "
            "algo.loss.use_rollout_logprobs and algo.loss.behaviour_is_cap need the rollout "
            "engine's log-prob of every completion token"
        )
    return {id(s): torch.tensor(s.rollout_logprobs or [], dtype=torch.float32) for s in samples}
