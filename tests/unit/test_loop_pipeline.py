"""The RL steps' pipeline without Ray: the synchronous order call for call at
`algo.max_staleness=0`, and with s > 0 the next batches collected while the learners train,
never more than s pushes stale, drained before evaluations and checkpoints."""

import pytest

from gmai_rl.algo.staleness import (
    batches_to_prefetch,
    check_staleness,
    drain_points,
    staleness,
)
from gmai_rl.cluster.errors import RolloutsLostError
from gmai_rl.feed import ItemSampler
from gmai_rl.metrics import step_metrics
from gmai_rl.pipeline import Pipeline
from gmai_rl.types import MCQItem
from support import FakeCluster, train_config


def item(i: int) -> MCQItem:
    return MCQItem(f"q{i}", "Which?", {"A": "x", "B": "y"}, "A")


def run(cluster, steps, *overrides, drains=()):
    cfg = train_config("algo.prompts_per_step=2", "rollout.samples_per_prompt=2", *overrides)
    sampler = ItemSampler([item(i) for i in range(40)], seed=0)
    with Pipeline(cluster, sampler, cfg, steps, drains) as pipeline:
        return [step_metrics(step, pipeline.step(step)) for step in range(steps)]


def stages(cluster):
    """(stage, thread, version) of the generations, training calls and pushes, in order."""
    return [
        (e.what, e.thread, e.version)
        for e in cluster.events
        if e.what in ("generate", "train", "sync")
    ]


def generations(cluster):
    return [(thread, version) for what, thread, version in stages(cluster) if what == "generate"]


def test_no_staleness_is_the_synchronous_loop_call_for_call():
    cluster = FakeCluster()
    records = run(cluster, 3)
    assert [(what, thread) for what, thread, _ in stages(cluster)] == [
        ("generate", "main"),
        ("train", "main"),
        ("sync", "main"),
    ] * 3
    assert [r["staleness_max"] for r in records] == [0, 0, 0]
    assert [r["policy_version"] for r in records] == [1, 2, 3]


def test_one_step_off_collects_the_next_batch_while_training_on_the_same_prompts():
    synchronous = FakeCluster()
    run(synchronous, 4)
    cluster = FakeCluster(overlap={0, 1, 2})
    records = run(cluster, 4, "algo.max_staleness=1")
    assert cluster.overlapped == [True, True, True, False]  # the last step has none ahead
    # The same prompts in the same order as the synchronous run: only the timing moved.
    assert cluster.generated() == synchronous.generated()
    # Batch 0 now; batches 1-3 ahead, each by the policy pushed before the step that overlaps it.
    assert generations(cluster) == [("main", 0), ("ahead", 0), ("ahead", 1), ("ahead", 2)]
    assert [r["staleness_max"] for r in records] == [0, 1, 1, 1]
    # Every push waits for the batches ahead: no generation runs across one.
    order = [what for what, _, _ in stages(cluster)]
    syncs = [i for i, what in enumerate(order) if what == "sync"]
    gens = [i for i, what in enumerate(order) if what == "generate"]
    assert gens[1] < syncs[0] < gens[2] < syncs[1]
    for r in records:
        assert 0.0 <= r["idle_ratio_learner"] <= 1.0 and 0.0 <= r["idle_ratio_rollout"] <= 1.0
        assert "time_wait_rollout_s" in r or r["step"] == 3


def test_a_drain_point_collects_its_batch_only_after_the_step_before_it():
    cluster = FakeCluster()
    records = run(cluster, 4, "algo.max_staleness=1", drains={2})
    assert generations(cluster) == [("main", 0), ("ahead", 0), ("main", 2), ("ahead", 2)]
    assert [r["staleness_max"] for r in records] == [0, 1, 0, 1]


def test_larger_bounds_collect_further_ahead_and_stay_within_them():
    cluster = FakeCluster()
    records = run(cluster, 6, "algo.max_staleness=2")
    # batch b by the policy pushed after step b - 3
    assert [version for _, version in generations(cluster)] == [0, 0, 0, 1, 2, 3]
    assert [r["staleness_max"] for r in records] == [0, 1, 2, 2, 2, 2]


def test_a_failure_collecting_ahead_stops_the_step_that_waits_for_it():
    cluster = FakeCluster(fail_at=2)
    with pytest.raises(RuntimeError, match="lost its engine"):
        run(cluster, 3, "algo.max_staleness=1")


def test_a_batch_ahead_lost_with_every_rollout_worker_is_collected_again_after_the_push():
    # Generation 3 is batch 2's, ahead, while step 1 trains: every worker has died, and none can
    # be given the policy that generated the batch (the learners trained past it).
    synchronous = FakeCluster()
    run(synchronous, 4)
    lost = RolloutsLostError("generate: no rollout worker left that holds policy version 1")
    cluster = FakeCluster(fail_at=3, fault=lost)
    records = run(cluster, 4, "algo.max_staleness=1")
    # Batch 2 comes from the main thread after step 1's push, by the policy it pushed: the
    # same prompts, in the same order, as a run without the fault.
    assert generations(cluster) == [("main", 0), ("ahead", 0), ("main", 2), ("ahead", 2)]
    assert cluster.generated() == synchronous.generated()
    assert [r["staleness_max"] for r in records] == [0, 1, 0, 1]


def test_drain_points_follow_evaluations_and_checkpoints():
    assert drain_points(10, eval_every=4, save_every=3) == {3, 4, 6, 8, 9}
    assert drain_points(10, eval_every=0, save_every=0) == set()


def test_batches_ahead_stop_at_the_bound_the_run_end_and_drain_points():
    assert batches_to_prefetch(0, 1, 1, 10, ()) == [1]
    assert batches_to_prefetch(3, 4, 3, 10, ()) == [4, 5, 6]
    assert batches_to_prefetch(3, 6, 3, 10, ()) == [6]  # 4 and 5 are collected already
    assert batches_to_prefetch(8, 9, 3, 10, ()) == [9]  # no step 10
    assert batches_to_prefetch(3, 4, 3, 10, {5}) == [4]
    assert batches_to_prefetch(3, 4, 0, 10, ()) == []  # synchronous


def test_staleness_is_checked_against_the_bound():
    assert staleness(5, [5, 4, 5]) == 1
    assert check_staleness(5, [4], 1) == 1
    with pytest.raises(RuntimeError, match=r"staleness 2, outside 0\.\.1"):
        check_staleness(5, [3, 5], 1)
    with pytest.raises(RuntimeError, match="staleness -1"):
        check_staleness(5, [6], 1)  # generated by a policy the learners never pushed
