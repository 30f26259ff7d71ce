"""How the learner ranks' per-step metric sums become one step's metrics (pure).

Each rank returns sums over its own micro-batches (`accumulate`); the driver combines the ranks'
sums into means over the whole step (`combine_rank_metrics`, `combine_sft_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

LOSS_TERMS = ("loss", "pg_loss", "kl_loss")
"""Each rank's share of a globally normalised loss: they add up over ranks."""
GLOBAL_TERMS = ("grad_norm", "lr", "optim_steps", "skipped_steps", "skipped_in_a_row_max")
"""The same on every rank (DeepSpeed's step decision and norm are collective): rank 0's."""
AGREED_TERMS = ("optim_steps", "skipped_steps")
"""Step decisions every rank must share: one rank stepping while another skips would leave
their replicas of the policy apart for good."""


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row skipped for a non-finite loss or gradient."""


def accumulate(sums: dict[str, float], new: dict[str, float]) -> None:
    """Add `new` into `sums` in place: *_min / *_max keys keep the extreme, the rest add up."""
    for k, v in new.items():
        if k.endswith("_min"):
            sums[k] = min(sums.get(k, v), v)
        elif k.endswith("_max"):
            sums[k] = max(sums.get(k, v), v)
        else:
            sums[k] = sums.get(k, 0.0) + v


def check_step_decisions(ranks: Sequence[dict[str, float]], max_skipped: int) -> None:
    """Raise unless every rank took and skipped the same optimizer steps, and no run of
    skipped steps reached `max_skipped` (`learner.max_skipped_steps`)."""
    for key in AGREED_TERMS:
        seen = [rank.get(key, 0.0) for rank in ranks]
        if len(set(seen)) > 1:
            raise RuntimeError(
                f"learner ranks disagree on {key}: {seen} by rank; their copies of the policy "
                "have diverged, so training cannot go on (resume from the last checkpoint)"
            )
    in_a_row = int(ranks[0].get("skipped_in_a_row_max", 0.0))
    if in_a_row >= max_skipped:
        raise NonFiniteTrainingError(
            f"{in_a_row} optimizer steps in a row skipped for a NaN or Inf loss or gradient "
            f"(learner.max_skipped_steps={max_skipped}): stopping; the last checkpoint holds "
            "the weights before them. Lower the learning rate, check the data, or resume."
        )


def combine_rank_metrics(ranks: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over a training step from the ranks' `train_rl` sums.

    Loss terms are each rank's share of a globally normalised sum: they add up over ranks and are
    averaged over the step's mini-batches (a skipped one's NaN included: what the step saw).
    grad_norm is global: rank 0's, averaged over the steps taken; lr over all mini-batches.
    Token metrics are token-weighted means; *_min / *_max are extremes.
    """
    total: dict[str, float] = {}
    for rank in ranks:
        accumulate(total, {k: v for k, v in rank.items() if k not in GLOBAL_TERMS})
    first = ranks[0]
    taken, skipped = first.get("optim_steps", 0.0), first.get("skipped_steps", 0.0)
    minibatches = max(taken + skipped, 1.0)
    tokens = max(total.pop("tokens", 0.0), 1.0)
    out: dict[str, float] = {}
    if "grad_norm" in first:
        out["grad_norm"] = first["grad_norm"] / max(taken, 1.0)
    if "lr" in first:
        out["lr"] = first["lr"] / minibatches
    for k, v in total.items():
        if k in LOSS_TERMS:
            out[k] = v / minibatches
        elif k.endswith(("_min", "_max")):
            out[k] = v
        else:
            out[k] = v / tokens
    out["train_tokens"] = tokens
    out["optim_steps"] = taken
    out["skipped_steps"] = skipped
    return out


def combine_sft_metrics(ranks: Sequence[dict[str, float]]) -> dict[str, float]:
    """One SFT step from the ranks' `train_sft` results: the loss adds up (each rank's share of
    a globally normalised sum); grad_norm (of a step taken) and lr are global (rank 0's)."""
    first = ranks[0]
    out = {
        "sft_loss": sum(r["sft_loss"] for r in ranks),
        "lr": first["lr"],
        "optim_steps": first.get("optim_steps", 0.0),
        "skipped_steps": first.get("skipped_steps", 0.0),
    }
    if "grad_norm" in first:
        out["grad_norm"] = first["grad_norm"]
    return out
