"""The start-up benchmark's bookkeeping (benchmarks/startup.py): how processes are named and
grouped, when an actor's constructor ended, the table. No Ray, no run."""

import pytest

from support import load_script

startup = load_script("benchmarks/startup.py", "startup_bench")

Process = startup.Process


def test_processes_are_named_by_their_ray_title_script_or_executable():
    assert startup.process_title(["ray::Learner.__init__        "]) == "ray::Learner.__init__"
    assert startup.process_title(["ray::IDLE"]) == "ray::IDLE"
    venv = "/x/.venv/bin/python"
    assert startup.process_title([venv, "-u", "/x/ray/dashboard/dashboard.py", "--host=1"]) == (
        "dashboard.py"
    )
    assert startup.process_title([venv, "-m", "gmai_rl.train", "a=1"]) == "-m gmai_rl.train"
    assert startup.process_title(["/x/ray/core/src/ray/raylet/raylet", "--flag"]) == "raylet"
    assert startup.process_title([]) == "?"


def test_a_worker_counts_as_the_actor_it_became_else_as_a_worker_without_one():
    def group(*titles, pid=7):
        return startup.group_of(Process(pid, 0.0, titles=list(titles)), driver_pid=1)

    assert (
        group(
            "setup_worker.py",
            "default_worker.py",
            "ray::IDLE",
            "ray::Learner.__init__",
            "ray::Learner",
        )
        == "Learner"
    )
    assert group("ray::RolloutWorker.generate") == "RolloutWorker"
    assert group("default_worker.py", "ray::IDLE") == "ray worker (no actor)"
    assert group("ray::IDLE", "ray::_node_address", "ray::IDLE") == "ray worker (no actor)"
    assert group("agent.py", "ray::DashboardAgent") == "ray daemons"
    assert group("raylet") == "ray daemons"
    assert group("-m gmai_rl.train", pid=1) == "driver"


def test_a_constructor_runs_from_its_init_title_to_the_next_title_of_the_actor():
    seen = [
        (1.0, "setup_worker.py"),
        (1.5, "ray::IDLE"),
        (2.0, "ray::Learner.__init__"),
        (9.0, "ray::Learner"),
        (9.5, "ray::Learner.ping"),
    ]
    assert startup.constructor_span(seen) == (2.0, 9.0)
    # Idle straight after the constructor is missed between samples: its next call says it.
    span = startup.constructor_span([(2.0, "ray::Learner.__init__"), (4.0, "ray::Learner.ping")])
    assert span == (2.0, 4.0)
    # Never seen constructing (shorter than a sample interval), or still constructing.
    assert startup.constructor_span([(1.0, "ray::IDLE"), (2.0, "ray::Learner")]) is None
    assert startup.constructor_span([(2.0, "ray::Learner.__init__")]) is None


def test_the_summary_sums_cpu_by_group_a_workers_helpers_included_and_has_a_median_column():
    processes = {
        1: Process(1, 0.0, titles=["-m gmai_rl.train"], cpu=4.0),
        2: Process(
            2, 5.0, titles=["ray::Learner.__init__", "ray::Learner"], cpu=6.0, init=(5.0, 12.0)
        ),
        3: Process(
            3, 6.0, titles=["ray::Learner.__init__", "ray::Learner"], cpu=7.0, init=(6.0, 16.0)
        ),
        4: Process(4, 3.0, titles=["raylet"], cpu=0.5),
        5: Process(5, 4.0, titles=["ray::IDLE"], cpu=0.4),
    }
    # Forked by learner 3 for a compiler: its title is the learner's until it execs.
    processes[6] = Process(6, 8.0, ppid=3, titles=["ray::Learner.__init__", "gcc"], cpu=0.1)
    setup = {"stage": "setup", "data_seconds": 1.0, "startup_seconds": 20.0}
    s = startup.summarise(processes, 1, setup, (2.0, 3.0), bytecode=True)
    assert s.cpu == {
        "driver": 4.0,
        "Learner": pytest.approx(13.1),
        "ray daemons": 0.5,
        "ray worker (no actor)": 0.4,
    }
    assert s.count["Learner"] == 2 and s.constructors == {"Learner": [7.0, 10.0]}
    table = startup.render([s, s])
    assert "| startup_seconds (setup line) | 20.0 | 20.0 | 20.0 |" in table
    assert "| CPU s: Learner (2) | 13.1 | 13.1 | 13.1 |" in table
    assert "|   Learner constructor, wall s (median) | 8.5 | 8.5 | 8.5 |" in table
    assert "| CPU s: RewardWorker (0) | 0.0 | 0.0 | 0.0 |" in table
    assert "| CPU s: all processes | 18.0 | 18.0 | 18.0 |" in table
    assert "bytecode caches" in table
