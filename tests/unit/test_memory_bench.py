"""The memory benchmark's arithmetic (benchmarks/memory.py): which RL step a sample belongs to,
per-step peaks, the growth fit a leak is read from, and how processes are named. No Ray."""

import math

import pytest

from support import load_script

memory = load_script("benchmarks/memory.py", "memory_bench")

Sample = memory.Sample


def test_step_windows_run_from_the_previous_record_to_the_steps_own():
    events = [
        (1.0, {"stage": "setup"}),
        (5.0, {"stage": "sft", "step": 0}),
        (8.0, {"stage": "eval", "phase": "before_rl", "step": 0}),
        (10.0, {"stage": "rl", "step": 0}),
        (12.0, {"stage": "rl", "step": 1}),
        (13.0, {"stage": "eval", "phase": "during_rl", "step": 2}),
        (15.0, {"stage": "rl", "step": 2}),
        (18.0, {"stage": "eval", "phase": "after_rl", "step": 3}),
    ]
    windows = memory.step_windows(events)
    # The SFT step (stage "sft") is no RL step; the evaluation during RL is in no step.
    assert windows == [(8.0, 10.0, 0), (10.0, 12.0, 1), (13.0, 15.0, 2)]


def test_step_windows_keep_the_step_numbers_of_a_resumed_run():
    events = [(1.0, {"stage": "setup"}), (3.0, {"stage": "rl", "step": 40})]
    assert memory.step_windows(events) == [(1.0, 3.0, 40)]


@pytest.mark.parametrize(
    ("t", "step"),
    [(7.9, None), (8.0, None), (8.5, 0), (10.0, 0), (10.1, 1), (12.0, 1), (12.5, None),
     (13.5, 2), (15.0, 2), (16.0, None)],
)  # fmt: skip
def test_step_at_takes_the_window_holding_the_time(t, step):
    windows = [(8.0, 10.0, 0), (10.0, 12.0, 1), (13.0, 15.0, 2)]
    assert memory.step_at(t, windows) == step


def test_a_step_seen_in_the_same_poll_as_the_previous_one_gets_no_sample():
    windows = [(8.0, 10.0, 0), (10.0, 10.0, 1), (10.0, 12.0, 2)]
    assert memory.step_at(10.0, windows) == 0
    assert memory.step_at(10.5, windows) == 2


def test_per_step_peak_keeps_each_steps_largest_value():
    points = [(None, 900.0), (0, 100.0), (0, 120.0), (1, 90.0), (None, 5.0), (1, 80.0)]
    assert memory.per_step_peak(points) == {0: 120.0, 1: 90.0}


def test_value_near_takes_the_nearest_sampled_step_inside_the_processs_range():
    by_step = {0: 1.0, 3: 4.0, 4: 5.0, 10: 11.0}
    assert memory.value_near(by_step, 3) == 4.0
    assert memory.value_near(by_step, 2) == 4.0  # 3 is nearer than 0
    assert memory.value_near(by_step, 7) == 5.0  # a tie between 4 and 10: the earlier
    assert memory.value_near(by_step, 11) is None  # it was not sampled that late
    assert memory.value_near({}, 0) is None


def test_fit_slope_recovers_a_line_exactly():
    xs = [10, 11, 12, 13, 14]
    slope, se = memory.fit_slope(xs, [3.0 + 0.5 * x for x in xs])
    assert slope == pytest.approx(0.5)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_fit_slope_standard_error_matches_the_textbook_formula():
    xs, ys = [0, 1, 2, 3], [0.0, 2.0, 1.0, 3.0]
    slope, se = memory.fit_slope(xs, ys)
    # ybar 1.5, xbar 1.5, Sxx 5, Sxy 4: slope 0.8; residuals -0.3, 0.9, -0.9, 0.3 (SSR 1.8).
    assert slope == pytest.approx(0.8)
    assert se == pytest.approx(math.sqrt(1.8 / 2 / 5))


def test_fit_slope_needs_two_distinct_steps():
    assert memory.fit_slope([], []) is None
    assert memory.fit_slope([3], [1.0]) is None
    assert memory.fit_slope([3, 3], [1.0, 2.0]) is None
    assert memory.fit_slope([3, 4], [1.0, 2.0]) == (pytest.approx(1.0), None)


def test_growth_leaves_out_the_warm_up_and_scales_to_100_steps():
    # Start-up growth (steps 0-9) then a leak of 0.2 MiB per step.
    by_step = {s: 500.0 + (50.0 * s if s < 10 else 450.0 + 0.2 * s) for s in range(30)}
    growth, se = memory.growth_per_100(by_step, warmup=10)
    assert growth == pytest.approx(20.0)
    assert se == pytest.approx(0.0, abs=1e-9)
    flat = {s: 700.0 for s in range(30)}
    assert memory.growth_per_100(flat, warmup=10) == (pytest.approx(0.0), pytest.approx(0.0))
    assert memory.growth_per_100(by_step, warmup=29) is None


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["ray::Learner.train"], "ray::Learner"),
        (["ray::RolloutWorker.generate        "], "ray::RolloutWorker"),
        (["ray::IDLE"], "ray::IDLE"),
        (["/x/.venv/bin/python", "-m", "gmai_rl.train", "trainer.steps=1"], "-m gmai_rl.train"),
        (["/x/.venv/bin/python3", "-u", "/x/ray/dashboard/dashboard.py", "--a=b"], "dashboard.py"),
        (["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=s"], "raylet"),
        ([], "?"),
    ],
)
def test_process_name(argv, name):
    assert memory.process_name(argv) == name


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ray::Learner", "actor"),
        ("ray::RolloutWorker", "actor"),
        ("ray::RewardWorker", "actor"),
        ("ray::IDLE", "ray worker"),
        ("default_worker.py", "ray worker"),
        ("setup_worker.py", "ray worker"),
        ("ray::_node_address", "ray worker"),
        ("ray::RuntimeEnvAgent", "ray system"),
        ("raylet", "ray system"),
        ("gcs_server", "ray system"),
    ],
)
def test_kind_of(name, kind):
    assert memory.kind_of(name, is_driver=False) == kind


def test_a_worker_is_listed_under_its_last_title_other_than_idle():
    assert memory.label(["ray::IDLE", "ray::_node_address", "ray::IDLE"]) == "ray::_node_address"
    assert memory.label(["ray::IDLE", "ray::Learner", "ray::Learner"]) == "ray::Learner"
    assert memory.label(["ray::IDLE", "ray::IDLE"]) == "ray::IDLE"


def test_samples_taken_before_exec_are_left_out():
    def named(*names):
        return [Sample(float(i), 5, n, 470.0 if n == "-m gmai_rl.train" else 30.0, 1.0, 1)
                for i, n in enumerate(names)]  # fmt: skip

    forked = named("-m gmai_rl.train", "-m gmai_rl.train", "raylet", "raylet")
    assert [s.name for s in memory.after_exec(forked, "-m gmai_rl.train")] == ["raylet"] * 2
    helper = named("ray::Learner", "ray::Learner")  # a copy of its parent all along: kept
    assert memory.after_exec(helper, "ray::Learner") == helper
    assert memory.after_exec(forked, None) == forked


def test_a_process_started_by_a_worker_is_listed_under_it():
    kinds = {1: "driver", 2: "ray system", 3: "actor", 4: "ray system", 5: "ray system"}
    parents = {2: 1, 3: 2, 4: 3, 5: 4}  # driver -> raylet -> Learner -> sh -> gcc
    assert memory.worker_above(5, parents, kinds) == 3
    assert memory.worker_above(2, parents, kinds) is None
    assert memory.worker_above(4, {4: 4}, kinds) is None  # no endless loop on a bad map


def test_summarise_gives_one_row_per_process_with_its_steps_and_growth():
    windows = [(10.0 + s, 11.0 + s, s) for s in range(21)]  # steps 0-20, 1 s each
    samples = [Sample(5.0, 1, "-m gmai_rl.train", 900.0, 400.0)]  # before RL: peak only
    for s in range(21):
        t = 10.5 + s
        samples.append(Sample(t, 1, "-m gmai_rl.train", 800.0, 300.0))
        samples.append(Sample(t, 7, "ray::Learner", 1000.0 + 2.0 * s, 600.0 + 2.0 * s))
        if s <= 5:  # a worker replaced after step 5
            samples.append(Sample(t, 9, "ray::RolloutWorker", 300.0, 100.0))
    samples.append(Sample(3.0, 7, "ray::IDLE", 50.0, 40.0))
    samples.append(Sample(2.0, 2, "-m gmai_rl.train", 470.0, 0.5, ppid=1))  # before exec
    samples.append(Sample(3.0, 2, "raylet", 30.0, 20.0, ppid=1))
    samples.append(Sample(14.5, 12, "gcc", 3.0, 1.0, ppid=7))
    rows = memory.summarise(samples, windows, driver_pid=1, warmup=10)
    assert [(r.kind, r.name, r.pid) for r in rows] == [
        ("driver", "-m gmai_rl.train", 1),
        ("actor", "ray::Learner", 7),
        ("actor", "ray::RolloutWorker", 9),
        ("under a worker", "gcc (of ray::Learner 7)", 12),
        ("ray system", "raylet", 2),
    ]
    driver, learner, rollout = rows[:3]
    assert rows[-1].peak_rss == 30.0
    assert driver.at_steps == (800.0, 800.0, 800.0)
    assert driver.peak_rss == 900.0
    assert driver.rss_growth == (pytest.approx(0.0), pytest.approx(0.0))
    assert learner.at_steps == (1000.0, 1020.0, 1040.0)
    assert learner.rss_growth == (pytest.approx(200.0), pytest.approx(0.0))
    assert learner.anon_growth == (pytest.approx(200.0), pytest.approx(0.0))
    assert rollout.at_steps == (300.0, None, None)
    assert rollout.rss_growth is None  # no step >= 10
    assert rollout.anon_growth is None
    table = memory.render(rows, windows, warmup=10)
    assert "| RSS step 0 | RSS step 10 | RSS step 20 |" in table
    assert (
        "| actor | ray::Learner | 7 | 1000 | 1020 | 1040 | 1040 | +200.0 ± 0.0 | +200.0 ± 0.0 |"
        in table
    )
    assert "| actor | ray::RolloutWorker | 9 | 300 | - | - | 300 | - | - |" in table


def test_read_new_records_returns_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert memory.read_new_records(path, 0) == ([], 0)
    path.write_text('{"stage": "setup"}\n{"stage": "rl", "st')
    records, offset = memory.read_new_records(path, 0)
    assert records == [{"stage": "setup"}]
    with path.open("a") as f:
        f.write('ep": 0}\n')
    records, offset = memory.read_new_records(path, offset)
    assert records == [{"stage": "rl", "step": 0}]
    assert memory.read_new_records(path, offset) == ([], offset)
