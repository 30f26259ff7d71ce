"""How the ranks' step results combine, and the checks on their step decisions."""

import math

import pytest

from gmai_rl.learner.rank_metrics import (
    NonFiniteTrainingError,
    check_step_decisions,
    combine_rank_metrics,
    combine_sft_metrics,
)


def rank(**metrics):
    return {k: float(v) for k, v in metrics.items()}


def test_loss_terms_add_over_ranks_and_average_over_minibatches_skipped_ones_included():
    # Two mini-batches: the first stepped (norm 2), the second was skipped (its loss NaN).
    ranks = [
        rank(loss=math.nan, pg_loss=1.0, tokens=10, entropy=5.0, ratio_max=1.5, lr=2e-3,
             optim_steps=1, skipped_steps=1, grad_norm=2.0, skipped_in_a_row_max=1),
        rank(loss=0.5, pg_loss=3.0, tokens=30, entropy=45.0, ratio_max=1.2, lr=2e-3,
             optim_steps=1, skipped_steps=1, grad_norm=2.0, skipped_in_a_row_max=1),
    ]  # fmt: skip
    out = combine_rank_metrics(ranks)
    assert math.isnan(out["loss"])  # what the step saw, not hidden
    assert out["pg_loss"] == pytest.approx(2.0)  # (1 + 3) / 2 mini-batches
    assert out["entropy"] == pytest.approx(50.0 / 40)
    assert out["ratio_max"] == 1.5
    assert out["grad_norm"] == 2.0  # of the one step taken, not diluted by the skip
    assert out["lr"] == pytest.approx(1e-3)
    assert (out["optim_steps"], out["skipped_steps"], out["train_tokens"]) == (1, 1, 40)
    assert "skipped_in_a_row_max" not in out


def test_a_step_with_every_minibatch_skipped_has_no_grad_norm_to_report():
    ranks = [rank(loss=math.nan, tokens=4, lr=1e-3, skipped_steps=2, skipped_in_a_row_max=2)] * 2
    out = combine_rank_metrics(ranks)
    assert "grad_norm" not in out
    assert (out["optim_steps"], out["skipped_steps"]) == (0, 2)


def test_sft_metrics_of_a_taken_and_a_skipped_step():
    taken = combine_sft_metrics([rank(sft_loss=1.0, lr=1e-3, optim_steps=1, grad_norm=3.0)] * 2)
    assert taken == {"sft_loss": 2.0, "lr": 1e-3, "optim_steps": 1, "skipped_steps": 0,
                     "grad_norm": 3.0}  # fmt: skip
    skipped = combine_sft_metrics([rank(sft_loss=math.inf, lr=1e-3, skipped_steps=1)] * 2)
    assert skipped["skipped_steps"] == 1 and "grad_norm" not in skipped


def test_ranks_that_disagree_on_a_step_stop_training_naming_the_split():
    stepped, skipped = rank(optim_steps=1), rank(skipped_steps=1, skipped_in_a_row_max=1)
    with pytest.raises(RuntimeError, match=r"disagree on optim_steps: \[1.0, 0.0\]"):
        check_step_decisions([stepped, skipped], max_skipped=3)


def test_skips_in_a_row_stop_at_the_limit_and_not_before():
    check_step_decisions([rank(skipped_steps=2, skipped_in_a_row_max=2)] * 2, max_skipped=3)
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimizer steps in a row.*max_skipped"):
        check_step_decisions([rank(skipped_steps=1, skipped_in_a_row_max=3)] * 2, max_skipped=3)
