"""Where a micro-batch's old log-probs (pi_prox) come from: a scoring pass, or its own forward."""

import pytest
import torch

from gmai_rl.learner.steps import old_logprobs_of
from gmai_rl.types import Prompt, TrainSample


def samples(lengths):
    return [TrainSample(Prompt(f"p{i}", []), [], [1] * n) for i, n in enumerate(lengths)]


def test_scored_samples_take_their_scores_padded_to_the_grid():
    micro = samples([2, 3])
    old = {id(micro[0]): torch.tensor([-1.0, -2.0]), id(micro[1]): torch.tensor([-3.0, -4.0, -5.0])}
    current = torch.zeros(2, 3, requires_grad=True)
    got = old_logprobs_of(micro, old, current, torch.ones(2, 3), fresh=False)
    assert torch.equal(got, torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]))


def test_a_fresh_micro_batch_takes_its_current_log_probs_detached_and_records_them():
    micro = samples([1, 3])
    current = torch.tensor([[-0.5, 9.0, 9.0], [-1.0, -1.5, -2.0]], requires_grad=True)
    old = {}
    got = old_logprobs_of(micro, old, current, torch.ones(2, 3), fresh=True)
    assert torch.equal(got, current.detach()) and not got.requires_grad
    # A later epoch reads them back, each cut to its completion.
    assert torch.equal(old[id(micro[0])], torch.tensor([-0.5]))
    again = old_logprobs_of(micro, old, torch.zeros(2, 3), torch.ones(2, 3), fresh=False)
    assert torch.equal(again, torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -1.5, -2.0]]))


@pytest.mark.parametrize("fresh", [False, True])
def test_unscored_samples_after_the_policy_moved_or_half_scored_ones_are_refused(fresh):
    micro = samples([2, 2])
    old = {} if not fresh else {id(micro[0]): torch.zeros(2)}
    with pytest.raises(RuntimeError, match="no old log-probs after an optimizer step"):
        old_logprobs_of(micro, old, torch.zeros(2, 2), torch.ones(2, 2), fresh=fresh)
