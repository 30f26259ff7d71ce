"""Resumable checkpoints on the driver side: complete vs partial, atomic publish, pruning, and the
state a resumed run continues from (item order, metrics.jsonl)."""

import json

import pytest

from gmai_rl.checkpoint import (
    DriverState,
    begin,
    checkpoint_root,
    commit,
    complete_checkpoints,
    prune,
    resolve_resume,
)
from gmai_rl.feed import ItemSampler
from gmai_rl.metrics import MetricsLog


def write_checkpoint(root, step):
    partial = begin(root, step)
    (partial / "learner").mkdir()
    DriverState(step, step + 1, {"order": [], "epoch": 0, "rng": None}, 3 * step).write(partial)
    return commit(partial)


def test_only_committed_checkpoints_count_and_the_newest_is_resumed(tmp_path):
    root = checkpoint_root(tmp_path)
    for step in (5, 10, 15):
        write_checkpoint(root, step)
    crashed = begin(root, 20)  # a save that never committed
    DriverState(20, 21, {}, 60).write(crashed)
    assert [p.name for p in complete_checkpoints(root)] == ["step_5", "step_10", "step_15"]
    assert resolve_resume("auto", tmp_path) == root / "step_15"
    assert DriverState.read(root / "step_15").metrics_lines == 45


def test_auto_resume_without_checkpoints_starts_fresh_and_a_wrong_path_is_refused(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    partial = begin(checkpoint_root(tmp_path), 3)
    with pytest.raises(ValueError, match=r"trainer\.resume="):
        resolve_resume(str(partial), tmp_path)


def test_pruning_keeps_the_newest_and_drops_partial_leftovers(tmp_path):
    root = checkpoint_root(tmp_path)
    for step in (1, 2, 3, 4):
        write_checkpoint(root, step)
    begin(root, 5)
    deleted = prune(root, keep=2)
    assert sorted(p.name for p in deleted) == ["step_1", "step_2", "step_5.partial"]
    assert [p.name for p in complete_checkpoints(root)] == ["step_3", "step_4"]


def test_saving_a_step_again_replaces_it(tmp_path):
    root = checkpoint_root(tmp_path)
    write_checkpoint(root, 7)
    partial = begin(root, 7)
    DriverState(7, 99, {}, 1).write(partial)
    commit(partial)
    assert DriverState.read(root / "step_7").policy_version == 99
    assert [p.name for p in root.iterdir()] == ["step_7"]


def test_a_resumed_sampler_continues_with_the_same_items():
    items = list(range(23))
    straight = ItemSampler(items, seed=4)
    first = straight.take(30)  # into the second epoch
    state = json.loads(json.dumps(straight.state()))  # as driver.json stores it
    resumed = ItemSampler(items, seed=4)
    resumed.load_state(state)
    assert resumed.take(40) == straight.take(40)
    assert first  # the state was taken mid-run, not at the start
    with pytest.raises(ValueError, match="does not fit these items"):
        ItemSampler(items[:5], seed=4).load_state(state)


def test_metrics_of_a_resumed_run_continue_after_the_checkpoints_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for i in range(5):
        log.write({"step": i})
    log.close()
    resumed = MetricsLog(path, keep_lines=3)  # steps 3 and 4 are redone
    assert resumed.lines == 3
    resumed.write({"step": 3})
    resumed.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="the checkpoint expects 9"):
        MetricsLog(path, keep_lines=9)
    assert MetricsLog(path).lines == 0  # a fresh run starts a new file
