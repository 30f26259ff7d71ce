"""How the learner ranks' per-step metric sums become one step's metrics (pure).

Each rank returns sums over its own micro-batches (`accumulate`); the driver combines the ranks'
sums into means over the whole step (`combine_rank_metrics`, `combine_sft_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

LOSS_TERMS = ("loss", "pg_loss", "kl_loss")
"""Each rank's share of a globally normalised loss: they add up over ranks."""
GLOBAL_TERMS = ("grad_norm", "lr", "optim_steps")
"""The same on every rank: taken from rank 0."""


def accumulate(sums: dict[str, float], new: dict[str, float]) -> None:
    """Add `new` into `sums` in place: *_min / *_max keys keep the extreme, the rest add up."""
    for k, v in new.items():
        if k.endswith("_min"):
            sums[k] = min(sums.get(k, v), v)
        elif k.endswith("_max"):
            sums[k] = max(sums.get(k, v), v)
        else:
            sums[k] = sums.get(k, 0.0) + v


def combine_rank_metrics(ranks: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over a training step from the ranks' `train_rl` sums.

    Loss terms are each rank's share of a globally normalised sum: they add up over ranks and are
    averaged over optimizer steps. grad_norm and lr are global: rank 0's, averaged over steps.
    Token metrics are token-weighted means; *_min / *_max are extremes.
    """
    total: dict[str, float] = {}
    for rank in ranks:
        accumulate(total, {k: v for k, v in rank.items() if k not in GLOBAL_TERMS})
    steps = max(ranks[0].get("optim_steps", 1.0), 1.0)
    tokens = max(total.pop("tokens", 0.0), 1.0)
    out: dict[str, float] = {k: ranks[0][k] / steps for k in ("grad_norm", "lr") if k in ranks[0]}
    for k, v in total.items():
        if k in LOSS_TERMS:
            out[k] = v / steps
        elif k.endswith(("_min", "_max")):
            out[k] = v
        else:
            out[k] = v / tokens
    out["train_tokens"] = tokens
    out["optim_steps"] = steps
    return out


def combine_sft_metrics(ranks: Sequence[dict[str, float]]) -> dict[str, float]:
    """One SFT step from the ranks' `train_sft` results: the loss adds up (each rank's share of
    a globally normalised sum); grad_norm and lr are global (rank 0's)."""
    return {
        "sft_loss": sum(r["sft_loss"] for r in ranks),
        "grad_norm": ranks[0]["grad_norm"],
        "lr": ranks[0]["lr"],
    }
