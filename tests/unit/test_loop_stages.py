"""The driver's stages without Ray: sampling, refilling under the filter, advantages, metrics,
and one whole RL step (`Pipeline.step`) against the fake cluster, which records its calls."""

from pathlib import Path

import pytest
import torch

from gmai_rl.batches import collect_groups, group_accuracy, make_train_samples
from gmai_rl.config import AlgoConfig
from gmai_rl.feed import Datasets, ItemSampler, count_records
from gmai_rl.loop import Run, evaluate, evaluate_and_record
from gmai_rl.metrics import CollectStats, StageTimer, StepRecord, progress_line, step_metrics
from gmai_rl.types import REWARD_FAILED, Completion, Group, MCQItem, Prompt, failed_reward
from support import FakeCluster, one_step, train_config


def item(i: int) -> MCQItem:
    return MCQItem(f"q{i}", "Which?", {"A": "x", "B": "y"}, "A")


def group(item_: MCQItem, accuracies: list[float], version: int = 0) -> Group:
    completions = [
        Completion([1, 2, 3][: 1 + k % 3], f"c{k}", [-0.5] * (1 + k % 3))
        for k in range(len(accuracies))
    ]
    rewards = [{"accuracy": a, "format": 1.0, "total": a + 0.5} for a in accuracies]
    return Group(Prompt(item_.id, []), [7, 8], completions, version, rewards)


class FakeRollout:
    """Every `hard_every`-th group of a call is all-wrong (filtered as too hard), the rest mixed."""

    def __init__(self, hard_every: int) -> None:
        self.hard_every, self.calls = hard_every, []

    def __call__(self, items):
        self.calls.append(len(items))
        return [
            group(it, [0.0, 0.0] if k % self.hard_every == 0 else [1.0, 0.0])
            for k, it in enumerate(items)
        ]


def test_sampler_covers_every_item_once_per_epoch_and_is_seeded():
    items = [item(i) for i in range(10)]
    draws = ItemSampler(items, seed=3).take(10)
    assert sorted(d.id for d in draws) == sorted(i.id for i in items)
    assert [d.id for d in ItemSampler(items, seed=3).take(25)][:10] == [d.id for d in draws]
    with pytest.raises(ValueError):
        ItemSampler([], seed=0)


def test_refill_replaces_filtered_groups_until_the_batch_is_full():
    rollout = FakeRollout(hard_every=2)  # half of every round is too hard
    sampler = ItemSampler([item(i) for i in range(100)], seed=0)
    groups, stats = collect_groups(
        rollout, sampler, want=8, algo=AlgoConfig(accuracy_filter=True, max_refill_rounds=4)
    )
    assert len(groups) == 8 and stats.padded_groups == 0
    assert all(g.rewards[0]["accuracy"] == 1.0 for g in groups)  # only mixed groups kept
    # Round 1 keeps 4 of 8; the refill oversamples the missing 4 by the keep rate 1/2.
    assert rollout.calls == [8, 8]
    assert stats.rounds == 2 and stats.dropped_too_hard == 8 and stats.generated_groups == 16


def test_when_refills_run_out_the_batch_is_padded_and_says_so():
    rollout = FakeRollout(hard_every=1)  # everything too hard
    sampler = ItemSampler([item(i) for i in range(100)], seed=0)
    groups, stats = collect_groups(
        rollout, sampler, want=4, algo=AlgoConfig(accuracy_filter=True, max_refill_rounds=2)
    )
    assert len(groups) == 4 and stats.padded_groups == 4
    assert stats.rounds == 3 and stats.dropped_too_hard == stats.generated_groups


def test_without_the_filter_one_round_suffices():
    rollout = FakeRollout(hard_every=1)
    groups, stats = collect_groups(
        rollout,
        ItemSampler([item(i) for i in range(10)], 0),
        want=4,
        algo=AlgoConfig(accuracy_filter=False),
    )
    assert len(groups) == 4 and rollout.calls == [4] and stats.padded_groups == 0


def test_train_samples_carry_group_relative_advantages():
    g1 = group(item(1), [1.0, 0.0])  # totals 1.5, 0.5
    g2 = group(item(2), [1.0, 1.0], version=3)  # equal rewards: zero advantage
    samples = make_train_samples([g1, g2], "drgrpo")
    assert [s.advantage for s in samples] == [0.5, -0.5, 0.0, 0.0]
    assert [s.policy_version for s in samples] == [0, 0, 3, 3]
    assert samples[1].completion_ids == g1.completions[1].token_ids
    assert samples[1].rollout_logprobs == g1.completions[1].logprobs
    grpo = make_train_samples([g1], "grpo")
    assert grpo[0].advantage == pytest.approx(0.5 / (torch.tensor([1.5, 0.5]).std().item() + 1e-6))


def test_step_record_reports_the_issue_metrics():
    groups = [group(item(1), [1.0, 0.0]), group(item(2), [0.0, 0.0])]
    stats = CollectStats(generated_groups=2, dropped_too_hard=1, rounds=1, all_groups=groups)
    timer = StageTimer()
    timer.seconds.update(generate=2.0, reward=0.1, train=1.0, sync=0.2)
    train_metrics = {"loss": 0.1, "entropy": 1.2, "clip_frac": 0.0}
    record = step_metrics(4, StepRecord(groups[:1], stats, train_metrics, 5, timer))
    assert record["accuracy"] == 0.25 and record["format_rate"] == 1.0
    assert record["reward_mean"] == pytest.approx(0.75)
    assert record["groups_filtered_too_hard"] == 1 and record["groups_trained"] == 1
    assert record["generate_tokens_per_s"] == pytest.approx(
        sum(len(c.token_ids) for g in groups for c in g.completions) / 2.0
    )
    assert record["generated_tokens"] == 2 * (1 + 2)  # lengths 1, 2 per group
    assert record["policy_version"] == 5 and record["time_sync_s"] == 0.2
    assert progress_line(record, 10).startswith("step 5/10 | reward 0.750")
    assert record["truncated"] == 0 and record["truncated_rate"] == 0.0
    assert "overlong_penalty_mean" not in record  # shaping off: no "overlong" in any breakdown


def test_step_record_counts_completions_cut_at_the_limit_and_their_length_penalty():
    g1, g2 = group(item(1), [1.0, 0.0]), group(item(2), [0.0, 0.0])
    g1.completions[1].finish_reason = "length"
    g2.completions[0].finish_reason = "length"
    for g, penalties in ((g1, [0.0, -1.0]), (g2, [-1.0, -0.5])):
        g.rewards = [
            {**r, "overlong": p, "total": r["total"] + p}
            for r, p in zip(g.rewards, penalties, strict=True)
        ]
    g2.rewards[1] = failed_reward()  # no penalty: counts as 0 in the mean, as in the totals
    stats = CollectStats(generated_groups=2, rounds=1, all_groups=[g1, g2])
    record = step_metrics(0, StepRecord([g1, g2], stats, {}, 1, StageTimer()))
    assert record["truncated"] == 2 and record["truncated_rate"] == 0.5
    assert record["overlong_penalty_mean"] == -0.5
    assert record["reward_mean"] == pytest.approx((1.5 + -0.5 + -0.5 + 0.0) / 4)


def test_an_rl_step_trains_while_the_engines_sleep_and_wakes_them_before_the_push():
    cfg = train_config("algo.prompts_per_step=3", "rollout.samples_per_prompt=4")
    cluster = FakeCluster(version=7)
    record = one_step(cluster, ItemSampler([item(i) for i in range(10)], seed=0), cfg)
    assert cluster.calls() == ["generate", "score", "sleep", "train", "wake", "sync"]
    assert len(record.groups) == 3 and len(cluster.trained) == 12
    assert [s.advantage > 0 for s in cluster.trained[:4]] == [True, False, False, False]
    assert record.policy_version == 8 and record.train_metrics == {"loss": 0.5}
    assert step_metrics(0, record)["staleness_max"] == 0  # generated by version 7, pushed 8


def test_completions_the_reward_failed_on_train_as_zero_reward_and_are_counted():
    cfg = train_config("algo.prompts_per_step=3", "rollout.samples_per_prompt=4")
    cluster = FakeCluster(failed=lambda i, k: i == 1 and k == 0)
    record = one_step(cluster, ItemSampler([item(i) for i in range(10)], seed=0), cfg)
    metrics = step_metrics(0, record)
    assert metrics["reward_failures"] == 1 and metrics["reward_mean"] == pytest.approx(2 / 12)
    # Group 1's right answer failed to score: its four completions tie at 0, no advantage.
    assert [s.advantage for s in cluster.trained[4:8]] == [0.0] * 4
    assert cluster.calls()[-1] == "sync"


def test_a_rollout_where_every_reward_failed_stops_the_step_naming_the_function():
    cfg = train_config("algo.prompts_per_step=3", "reward.fn=my_pkg:broken")
    cluster = FakeCluster(failed=lambda i, k: True)
    with pytest.raises(RuntimeError, match=r"\(my_pkg:broken\) failed on all 24 completions"):
        one_step(cluster, ItemSampler([item(i) for i in range(10)], seed=0), cfg)
    assert "train" not in cluster.calls()


def test_a_rollout_whose_rewards_all_timed_out_trains_on_zero_rewards_and_goes_on():
    # A hung batch (cut by reward.timeout_s) is a fault of that batch, not a broken function.
    cfg = train_config("algo.prompts_per_step=3")
    cluster = FakeCluster(failed=lambda i, k: True, timed_out=True)
    record = one_step(cluster, ItemSampler([item(i) for i in range(10)], seed=0), cfg)
    assert step_metrics(0, record)["reward_failures"] == 24
    assert all(s.advantage == 0.0 for s in cluster.trained)


def test_the_accuracy_filter_counts_a_failed_completion_as_wrong():
    g = group(item(1), [1.0, 1.0])
    g.rewards[1] = {"total": 0.0, REWARD_FAILED: 1.0}
    assert group_accuracy(g) == 0.5
    g.rewards[0] = {"total": 1.0}  # a reward without accuracy is still refused by the filter
    with pytest.raises(ValueError, match="needs an 'accuracy'"):
        group_accuracy(g)


def eval_item(i: int) -> MCQItem:
    return MCQItem(f"q{i}", "Which?", {"A": "x", "B": "y"}, "A", modality="CT" if i % 2 else "MRI")


def answers_by_parity(prompt, k) -> str:
    """A to even-numbered questions, B to odd ones."""
    return f"<think>x</think><answer>{'AB'[int(prompt.id[1:]) % 2]}</answer>"


class RecordingDashboards:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record):
        self.records.append(record)


def test_evaluation_goes_out_in_chunks_of_one_batch_per_worker():
    cfg = train_config("cluster.rollout_workers=2", "rollout.max_batch_prompts=3")
    cluster = FakeCluster(answer=answers_by_parity)
    summary = evaluate(cluster, [eval_item(i) for i in range(14)], cfg)
    assert [len(prompts) for prompts in cluster.generated()] == [6, 6, 2]
    assert summary["n"] == 14 and summary["accuracy"] == 0.5
    assert summary["accuracy_by_modality"] == {"CT": 0.0, "MRI": 1.0}


def test_an_evaluation_is_recorded_with_its_phase_step_and_seconds():
    dashboards = RecordingDashboards()
    items = [eval_item(i) for i in range(4)]
    run = evaluation_run(items, dashboards)
    result = evaluate_and_record(run, "during_rl", 5)
    (record,) = dashboards.records
    assert record["stage"] == "eval" and record["phase"] == "during_rl" and record["step"] == 5
    assert record["seconds"] >= 0 and record["accuracy"] == result["accuracy"] == 0.5
    assert evaluate_and_record(evaluation_run([], dashboards), "after_rl", 6) == {}
    assert len(dashboards.records) == 1  # nothing to evaluate, nothing recorded


def evaluation_run(items, dashboards) -> Run:
    data = Datasets(train=[], eval=items, sft=[])
    cluster = FakeCluster(answer=answers_by_parity)
    return Run(train_config(), data, Path("/tmp/unused"), dashboards, cluster)


def test_count_records_counts_non_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert count_records(str(path)) == 2
    assert count_records(str(tmp_path / "missing.jsonl")) is None


class TraceCluster(FakeCluster):
    """Answers like a policy that reasons: even samples right, odd ones wrong; scored by the MCQ
    rule, as the reward workers score by default."""

    def __init__(self, version: int) -> None:
        super().__init__(
            version, answer=lambda p, k: f"<think>look {k}</think><answer>{'AB'[k % 2]}</answer>"
        )

    def score(self, groups, items):
        from gmai_rl.rejection import mcq_breakdowns

        self.record("score")
        mcq_breakdowns(groups, items)


def test_a_later_round_fine_tunes_on_its_rejection_sampled_traces_then_runs_rl(
    tiny_model_dir, tmp_path
):
    from gmai_rl.loop import run_round

    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")  # hashed into the provenance
    cfg = train_config(
        f"model.path={tiny_model_dir}",
        f"data.train={train}",
        "trainer.rounds=2",
        "trainer.steps=1",
        "trainer.save_every=0",
        "synth.k=4",
        "synth.keep_per_question=2",
        "synth.sft_steps=3",
        "sft.batch_size=2",
        "algo.prompts_per_step=2",
        "rollout.samples_per_prompt=2",
        "algo.accuracy_filter=false",
    )
    items = [item(i) for i in range(3)]
    cluster, dashboards = TraceCluster(7), RecordingDashboards()
    run = Run(cfg, Datasets(train=items), tmp_path, dashboards, cluster, round=2)
    done = run_round(run)
    # Two distinct right traces kept per question ("look 0", "look 2"), written as SFT records.
    kept = (tmp_path / "round-2" / "synth.jsonl").read_text().splitlines()
    assert len(kept) == 6 and done["synth"]["kept"] == 6
    assert done["synth"]["rejected"] == {"wrong_answer": 6}
    calls = cluster.calls()
    sft_at, sync_at = calls.index("train_sft"), calls.index("sync")
    assert calls[:2] == ["generate", "score"] and sft_at < sync_at < calls.index("train")
    assert cluster.sft_batches == [2, 2, 2]  # synth.sft_steps of sft.batch_size
    stages = [(r["stage"], r["round"]) for r in dashboards.records]
    assert stages[0] == ("synth", 2) and ("sft", 2) in stages and ("rl", 2) in stages
    rl = [r for r in dashboards.records if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1]  # RL steps counted over the rounds
