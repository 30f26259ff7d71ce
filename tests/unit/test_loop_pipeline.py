"""The RL steps' pipeline without Ray: the synchronous order call for call at
`algo.max_staleness=0`, and with s > 0 the next batches collected while the learners train,
never more than s pushes stale, drained before evaluations and checkpoints."""

import threading

import pytest

from gmai_rl.algo.staleness import (
    batches_to_prefetch,
    check_staleness,
    drain_points,
    staleness,
)
from gmai_rl.feed import ItemSampler
from gmai_rl.loop import Pipeline
from gmai_rl.metrics import step_metrics
from gmai_rl.types import Completion, Group, MCQItem
from support import train_config

WAIT_S = 10  # a fake's wait for the other thread; the tests fail, not hang, past it


def item(i: int) -> MCQItem:
    return MCQItem(f"q{i}", "Which?", {"A": "x", "B": "y"}, "A")


class PipelineCluster:
    """The `Cluster` methods a step calls. Each event records the thread it ran on, the policy
    version the rollout workers hold, and the prompts. Training call i (0-based) in `overlap`
    waits, up to WAIT_S, for the (i+1)-th generation on another thread: only a pipeline that
    collects batch i+1 while training on batch i sees it in time (`overlapped`)."""

    def __init__(self, overlap=(), fail_generate_at: int | None = None) -> None:
        self.events: list[tuple[str, str, int, tuple[str, ...]]] = []
        self.version = 0
        self.rollout_restarts = self.reward_restarts = 0
        self.overlap, self.fail_generate_at = overlap, fail_generate_at
        self.ahead = threading.Condition()
        self.ahead_generations = 0
        self.generations = 0
        self.overlapped: list[bool] = []

    def record(self, what, prompts=()):
        thread = "main" if threading.current_thread() is threading.main_thread() else "ahead"
        self.events.append((what, thread, self.version, tuple(p.id for p in prompts)))

    def generate(self, prompts, n, sampling):
        self.generations += 1
        if self.generations == self.fail_generate_at:
            raise RuntimeError("rollout worker 0 lost its engine")
        self.record("generate", prompts)
        if self.events[-1][1] == "ahead":
            with self.ahead:
                self.ahead_generations += 1
                self.ahead.notify_all()
        completions = [Completion([1, 2], f"c{k}", [-0.1, -0.2]) for k in range(n)]
        return [Group(p, [1], list(completions), self.version) for p in prompts]

    def score(self, groups, items):
        for g in groups:
            g.rewards = [{"total": float(k == 0)} for k in range(len(g.completions))]

    def sleep_rollouts(self):
        pass

    def wake_rollouts(self):
        pass

    def train(self, samples, num_minibatches):
        self.record("train")
        i = len(self.overlapped)
        with self.ahead:
            seen = i in self.overlap and self.ahead.wait_for(
                lambda: self.ahead_generations > i, WAIT_S
            )
        self.overlapped.append(seen)
        return {"loss": 0.5}

    def sync_weights(self, verify):
        self.record("sync")
        self.version += 1
        return self.version


def run(cluster, steps, *overrides, drains=()):
    cfg = train_config("algo.prompts_per_step=2", "rollout.samples_per_prompt=2", *overrides)
    sampler = ItemSampler([item(i) for i in range(40)], seed=0)
    with Pipeline(cluster, sampler, cfg, steps, drains) as pipeline:
        return [step_metrics(step, pipeline.step(step)) for step in range(steps)]


def generated(cluster):
    return [prompts for what, _, _, prompts in cluster.events if what == "generate"]


def test_no_staleness_is_the_synchronous_loop_call_for_call():
    cluster = PipelineCluster()
    records = run(cluster, 3)
    assert [(what, thread) for what, thread, *_ in cluster.events] == [
        ("generate", "main"),
        ("train", "main"),
        ("sync", "main"),
    ] * 3
    assert [r["staleness_max"] for r in records] == [0, 0, 0]
    assert [r["policy_version"] for r in records] == [1, 2, 3]


def test_one_step_off_collects_the_next_batch_while_training_on_the_same_prompts():
    synchronous = PipelineCluster()
    run(synchronous, 4)
    cluster = PipelineCluster(overlap={0, 1, 2})
    records = run(cluster, 4, "algo.max_staleness=1")
    assert cluster.overlapped == [True, True, True, False]  # the last step has none ahead
    # The same prompts in the same order as the synchronous run: only the timing moved.
    assert generated(cluster) == generated(synchronous)
    gens = [(thread, version) for what, thread, version, _ in cluster.events if what == "generate"]
    # Batch 0 now; batches 1-3 ahead, each by the policy pushed before the step that overlaps it.
    assert gens == [("main", 0), ("ahead", 0), ("ahead", 1), ("ahead", 2)]
    assert [r["staleness_max"] for r in records] == [0, 1, 1, 1]
    # Every push waits for the batches ahead: no generation runs across one.
    syncs = [i for i, e in enumerate(cluster.events) if e[0] == "sync"]
    generations = [i for i, e in enumerate(cluster.events) if e[0] == "generate"]
    assert generations[1] < syncs[0] < generations[2] < syncs[1]
    for r in records:
        assert 0.0 <= r["idle_ratio_learner"] <= 1.0 and 0.0 <= r["idle_ratio_rollout"] <= 1.0
        assert "time_wait_rollout_s" in r or r["step"] == 3


def test_a_drain_point_collects_its_batch_only_after_the_step_before_it():
    cluster = PipelineCluster()
    records = run(cluster, 4, "algo.max_staleness=1", drains={2})
    gens = [(thread, version) for what, thread, version, _ in cluster.events if what == "generate"]
    assert gens == [("main", 0), ("ahead", 0), ("main", 2), ("ahead", 2)]
    assert [r["staleness_max"] for r in records] == [0, 1, 0, 1]


def test_larger_bounds_collect_further_ahead_and_stay_within_them():
    cluster = PipelineCluster()
    records = run(cluster, 6, "algo.max_staleness=2")
    gens = [version for what, _, version, _ in cluster.events if what == "generate"]
    assert gens == [0, 0, 0, 1, 2, 3]  # batch b by the policy pushed after step b - 3
    assert [r["staleness_max"] for r in records] == [0, 1, 2, 2, 2, 2]


def test_a_failure_collecting_ahead_stops_the_step_that_waits_for_it():
    cluster = PipelineCluster(fail_generate_at=2)
    with pytest.raises(RuntimeError, match="lost its engine"):
        run(cluster, 3, "algo.max_staleness=1")


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
