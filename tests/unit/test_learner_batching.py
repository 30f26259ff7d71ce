"""How a rollout batch is cut for the learner ranks (pure)."""

import pytest

from gmai_rl.learner.batching import check_batch_shape, chunk, plan_rank_batches, split_even
from gmai_rl.types import Prompt, TrainSample


def sample(i: int, length: int) -> TrainSample:
    return TrainSample(Prompt(f"p{i}", []), [1, 2], list(range(length)), advantage=float(i))


def test_split_even_and_chunk():
    assert split_even([1, 2, 3, 4, 5, 6], 3) == [[1, 2], [3, 4], [5, 6]]
    assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError):
        split_even([1, 2, 3], 2)
    with pytest.raises(ValueError):
        chunk([1], 0)


def test_plan_gives_every_rank_equal_shards_and_global_normalisers():
    # 8 samples, 2 mini-batches, 2 ranks: mini-batch 0 = samples 0-3, mini-batch 1 = 4-7.
    lengths = [1, 2, 3, 4, 0, 6, 7, 8]
    samples = [sample(i, n) for i, n in enumerate(lengths)]
    ranks = plan_rank_batches(samples, world_size=2, num_minibatches=2)
    assert [[s.advantage for s in mb] for mb in ranks[0].minibatches] == [[0, 1], [4, 5]]
    assert [[s.advantage for s in mb] for mb in ranks[1].minibatches] == [[2, 3], [6, 7]]
    # Token counts are over the whole mini-batch (both ranks): 1+2+3+4 and 0+6+7+8.
    assert ranks[0].num_tokens == ranks[1].num_tokens == [10, 21]
    # The empty completion does not count as a sequence.
    assert ranks[0].num_seqs == ranks[1].num_seqs == [4, 3]


def test_batch_shape_error_names_what_to_change():
    with pytest.raises(ValueError, match="learner rank"):
        check_batch_shape(batch_size=12, world_size=5, num_minibatches=1)
    check_batch_shape(batch_size=128, world_size=2, num_minibatches=4)
