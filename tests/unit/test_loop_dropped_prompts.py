"""A prompt dropped at generation time (its image unreadable since the load: `Group.dropped`) is
named, counted and replaced; rewards, advantages, metrics and evaluation never see it, and a step
or evaluation that has nothing left stops with a clear error."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from gmai_rl.batches import collect_groups
from gmai_rl.config import AlgoConfig
from gmai_rl.evaluate import summarize
from gmai_rl.feed import ItemSampler
from gmai_rl.loop import evaluate
from gmai_rl.metrics import eval_line, step_metrics
from gmai_rl.types import Completion, Group, MCQItem, Prompt
from support import FakeCluster, one_step, train_config


def item(i: int) -> MCQItem:
    return MCQItem(
        f"q{i}", "Which?", {"A": "x", "B": "y"}, "A", (f"/data/{i}.png",), source=f"rl.jsonl:{i}"
    )


def dropped(it: MCQItem) -> Group:
    reason = f"missing_image: image not found: {it.images[0]}"
    return Group(Prompt(it.id, [], it.images), [], [], 0, dropped=reason)


def scored(it: MCQItem, accuracies: Sequence[float] = (1.0, 0.0)) -> Group:
    completions = [Completion([1, 2], f"c{k}", [-0.5, -0.5]) for k in range(len(accuracies))]
    rewards = [{"accuracy": a, "total": a} for a in accuracies]
    return Group(Prompt(it.id, [], it.images), [7], completions, 0, rewards)


class DroppingRollout:
    """Drops the prompts of the items whose index is in `lost`; scores the rest (mixed)."""

    def __init__(self, lost: set[int] | None = None, every: bool = False) -> None:
        self.lost, self.every = lost or set(), every
        self.calls: list[list[str]] = []

    def __call__(self, items: list[MCQItem]) -> list[Group]:
        self.calls.append([it.id for it in items])
        return [
            dropped(it) if self.every or int(it.id[1:]) in self.lost else scored(it) for it in items
        ]


def sampler(n: int = 40) -> ItemSampler[MCQItem]:
    return ItemSampler([item(i) for i in range(n)], seed=0)


def test_a_dropped_prompt_is_named_counted_and_refilled(caplog: pytest.LogCaptureFixture) -> None:
    draws = sampler()
    first = [it.id for it in ItemSampler(draws.items, seed=0).take(4)]
    lost = int(first[1][1:])
    rollout = DroppingRollout(lost={lost})
    with caplog.at_level(logging.WARNING, logger="gmai_rl.batches"):
        groups, stats = collect_groups(rollout, draws, want=4, algo=AlgoConfig())
    assert len(groups) == 4 and all(g.dropped is None and g.completions for g in groups)
    assert f"q{lost}" not in [g.prompt.id for g in groups]
    assert [len(call) for call in rollout.calls] == [4, 2]  # refilled at the keep rate 3/4
    assert stats.dropped_prompts == 1 and stats.padded_groups == 0 and stats.rounds == 2
    assert stats.generated_groups == 5 and all(g.dropped is None for g in stats.all_groups)
    warning = caplog.records[0].getMessage()
    assert f"q{lost} (rl.jsonl:{lost})" in warning and f"/data/{lost}.png" in warning
    metrics = step_metrics_of(groups, stats)
    assert metrics["prompts_dropped"] == 1 and metrics["groups_generated"] == 5


def test_dropped_prompts_are_counted_apart_from_filtered_groups() -> None:
    lost = {1, 2, 4}

    class HardEveryThird(DroppingRollout):
        def __call__(self, items: list[MCQItem]) -> list[Group]:
            return [
                scored(it, (0.0, 0.0)) if int(it.id[1:]) % 3 == 0 and not g.dropped else g
                for it, g in zip(items, super().__call__(items), strict=True)
            ]

    rollout = HardEveryThird(lost)
    groups, stats = collect_groups(
        rollout, sampler(), want=6, algo=AlgoConfig(accuracy_filter=True, max_refill_rounds=4)
    )
    assert len(groups) == 6 and stats.padded_groups == 0
    assert all(g.dropped is None and g.rewards[0]["accuracy"] == 1.0 for g in groups)
    asked = [int(i[1:]) for call in rollout.calls for i in call]
    assert stats.dropped_prompts == sum(i in lost for i in asked) > 0
    assert stats.dropped_too_hard == sum(i % 3 == 0 and i not in lost for i in asked) > 0


def test_without_refill_rounds_the_batch_is_filled_with_repeats_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    draws = sampler()
    lost = {int(i.id[1:]) for i in ItemSampler(draws.items, seed=0).take(4)[:2]}
    with caplog.at_level(logging.WARNING, logger="gmai_rl.batches"):
        groups, stats = collect_groups(
            DroppingRollout(lost), draws, want=4, algo=AlgoConfig(max_refill_rounds=0)
        )
    assert len(groups) == 4 and stats.padded_groups == 2 and stats.dropped_prompts == 2
    assert len({g.prompt.id for g in groups}) == 2  # the two kept groups, twice each
    assert "batch filled with 2 repeated group(s)" in caplog.text


def test_a_step_where_every_prompt_is_dropped_stops_with_a_clear_error() -> None:
    rollout = DroppingRollout(every=True)
    with pytest.raises(RuntimeError, match=r"every prompt of this step was dropped \(36 in 3 "):
        collect_groups(rollout, sampler(), want=4, algo=AlgoConfig(max_refill_rounds=2))
    assert [len(call) for call in rollout.calls] == [4, 16, 16]  # at most 4x oversampling


def test_an_rl_step_with_a_dropped_prompt_trains_on_a_full_batch_of_the_others() -> None:
    cfg = train_config("algo.prompts_per_step=3", "rollout.samples_per_prompt=4")
    draws = sampler(10)
    lost = ItemSampler(draws.items, seed=0).take(3)[0].id
    cluster = FakeCluster(version=7, dropped={lost})
    record = one_step(cluster, draws, cfg)
    assert len(record.groups) == 3 and len(cluster.trained) == 12
    assert lost not in {g.prompt.id for g in record.groups}
    # The dropped prompt's group had nothing to score; the refill (2 prompts at the keep rate
    # 2/3) was scored in a second round.
    assert cluster.scored == [8, 8]
    metrics = step_metrics(0, record)
    assert metrics["prompts_dropped"] == 1 and metrics["groups_trained"] == 3


def test_evaluation_leaves_out_a_dropped_question_and_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = [item(i) for i in range(3)]
    groups = [scored(items[0]), dropped(items[1]), scored(items[2])]
    groups[0].completions[0].text = "<answer>A</answer>"
    with caplog.at_level(logging.WARNING, logger="gmai_rl.evaluate"):
        summary = summarize(groups, items)
    assert summary["n"] == 2 and summary["dropped"] == 1 and summary["accuracy"] == 0.5
    assert "q1 (rl.jsonl:1)" in caplog.text and "/data/1.png" in caplog.text
    assert eval_line(summary).endswith("(n=2, 1 dropped: unreadable images)")
    assert summarize(groups[:1], items[:1])["dropped"] == 0


def test_an_evaluation_where_every_question_is_dropped_stops() -> None:
    items = [item(i) for i in range(2)]
    with pytest.raises(RuntimeError, match="none of the 2 questions could be evaluated"):
        summarize([dropped(it) for it in items], items)


def test_the_driver_evaluation_survives_a_dropped_question() -> None:
    cfg = train_config("cluster.rollout_workers=1", "rollout.max_batch_prompts=2")
    cluster = FakeCluster(dropped={"q2"})
    summary = evaluate(cluster, [item(i) for i in range(5)], cfg)
    assert summary["n"] == 4 and summary["dropped"] == 1


def step_metrics_of(groups: list[Group], stats: object) -> dict[str, object]:
    from gmai_rl.metrics import StageTimer, StepRecord

    return step_metrics(0, StepRecord(groups, stats, {}, 1, StageTimer()))  # type: ignore[arg-type]
