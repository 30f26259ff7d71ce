"""The one wait on remote calls (`gather`) under each of its policies. Ray's wait and get are
faked: calls finish in list order, except those standing for a call still running, which
never do; the fake records the order in which results were read."""

from types import SimpleNamespace

import pytest

from gmai_rl.cluster import waits
from gmai_rl.cluster.errors import ActorDiedError, StageTimeoutError
from gmai_rl.cluster.waits import IN_PLACE, RAISE, Policy, died, gather
from gmai_rl.rollout.base import EngineBrokenError

ray = pytest.importorskip("ray")
from ray.exceptions import RayActorError  # noqa: E402

RUNNING = object()
"""A call that has not finished by the deadline."""


class FakeRay:
    """`ray.wait` hands back the next finished ref in list order; once only running calls are
    left it waits out its timeout on a fake clock (`early`: that much less, as Ray's wait,
    which counts whole milliseconds, may) and returns none. `ray.get` returns the ref's value
    or raises it."""

    def __init__(self, monkeypatch, outcomes: dict[str, object], early: float = 0.0) -> None:
        self.outcomes, self.read, self.early = outcomes, [], early
        self.now, self.waits = 0.0, 0
        monkeypatch.setattr(ray, "wait", self.wait)
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(waits, "time", SimpleNamespace(monotonic=lambda: self.now))

    def wait(self, refs, num_returns, timeout):
        self.waits += 1
        finished = [r for r in refs if self.outcomes[r] is not RUNNING]
        if not finished:  # the clock moves on, even under a timeout shorter than `early`
            self.now += timeout - self.early if timeout > self.early else timeout
        return finished[:1], [r for r in refs if r not in finished[:1]]

    def get(self, ref):
        self.read.append(ref)
        outcome = self.outcomes[ref]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


CALLS = [
    ("learner rank 0", "push"),
    ("rollout worker 0", "receive 0"),
    ("rollout worker 1", "receive 1"),
]


def test_every_result_comes_back_in_call_order(monkeypatch):
    FakeRay(monkeypatch, {ref: ref.upper() for _, ref in CALLS})
    for policy in (RAISE, IN_PLACE, Policy(settle=True), Policy(stalls_in_place=True)):
        assert gather("stage", CALLS, 10, policy) == ["PUSH", "RECEIVE 0", "RECEIVE 1"]


def test_raise_ends_the_wait_at_the_first_death_without_reading_the_rest(monkeypatch):
    fake = FakeRay(monkeypatch, {"push": "ok", "receive 0": RayActorError(), "receive 1": "ok"})
    with pytest.raises(ActorDiedError, match="train: rollout worker 0 died"):
        gather("train", CALLS, 10, RAISE)
    assert fake.read == ["push", "receive 0"]


def test_an_error_arrives_as_itself_with_a_note_naming_the_actor_and_stage(monkeypatch):
    FakeRay(monkeypatch, {"push": ValueError("bad plan"), "receive 0": 1, "receive 1": 2})
    with pytest.raises(ValueError, match="bad plan") as raised:
        gather("weight sync", CALLS, 10, IN_PLACE)  # deaths in place, errors not
    assert "(raised by learner rank 0 during weight sync)" in raised.value.__notes__


def test_in_place_leaves_a_death_where_its_result_would_be_and_waits_for_the_rest(monkeypatch):
    fake = FakeRay(monkeypatch, {"push": "a", "receive 0": RayActorError(), "receive 1": "c"})
    out = gather("generate", CALLS, 10, IN_PLACE)
    assert out[0] == "a" and out[2] == "c" and died(out[1])
    assert str(out[1]).startswith("generate: rollout worker 0 died")
    assert fake.read == ["push", "receive 0", "receive 1"]


def test_a_broken_engine_counts_as_a_death(monkeypatch):
    broken = EngineBrokenError("vLLM's reload failed: the engine must be replaced")
    FakeRay(monkeypatch, {"push": "a", "receive 0": broken, "receive 1": "c"})
    out = gather("weight sync", CALLS, 10, IN_PLACE)
    assert died(out[1]) and "rollout worker 0 must be replaced" in str(out[1])


def test_keep_dead_is_told_of_each_death_when_it_is_seen_and_chooses_per_call(monkeypatch):
    fake = FakeRay(
        monkeypatch, {"push": "ok", "receive 0": RayActorError(), "receive 1": RayActorError()}
    )
    told = []

    def keep_rollouts(index, death):
        told.append((index, list(fake.read)))  # what had been read when it was told
        return index >= 1  # index 0 is the learner: not replaceable

    out = gather("weight sync", CALLS, 10, Policy(keep_dead=keep_rollouts))
    assert told == [(1, ["push", "receive 0"]), (2, ["push", "receive 0", "receive 1"])]
    assert died(out[1]) and died(out[2])
    FakeRay(monkeypatch, {"push": RayActorError(), "receive 0": "x", "receive 1": "y"})
    with pytest.raises(ActorDiedError, match="learner rank 0 died"):
        gather("weight sync", CALLS, 10, Policy(keep_dead=keep_rollouts))


def test_a_settled_collective_raises_an_error_only_once_every_member_has_left(monkeypatch):
    fake = FakeRay(
        monkeypatch, {"push": RuntimeError("gloo: timed out"), "receive 0": 1, "receive 1": 2}
    )
    with pytest.raises(RuntimeError, match="timed out"):
        gather("weight sync", CALLS, 10, Policy(settle=True))
    assert fake.read == ["push", "receive 0", "receive 1"]


def test_in_a_settled_collective_with_a_death_the_others_errors_stay_in_place(monkeypatch):
    aborted = RuntimeError("sync group: stopped: aborted: rollout worker 1 died")
    FakeRay(monkeypatch, {"push": aborted, "receive 0": aborted, "receive 1": RayActorError()})
    out = gather("weight sync", CALLS, 10, Policy(keep_dead=lambda i, d: i > 0, settle=True))
    assert out[0] is aborted and out[1] is aborted and died(out[2])


def test_a_call_running_past_the_deadline_is_named_in_the_timeout(monkeypatch):
    FakeRay(monkeypatch, {"push": "ok", "receive 0": RUNNING, "receive 1": RUNNING})
    with pytest.raises(StageTimeoutError) as stopped:
        gather("generate", CALLS, 5, IN_PLACE)
    message = str(stopped.value)
    assert "generate: no answer from rollout worker 0, rollout worker 1 within 5 s" in message


def test_stalls_in_place_give_each_late_call_a_timeout_in_its_place(monkeypatch):
    FakeRay(monkeypatch, {"push": "ok", "receive 0": RUNNING, "receive 1": "done"})
    out = gather("score", CALLS, 5, Policy(stalls_in_place=True))
    assert out[0] == "ok" and out[2] == "done"
    assert isinstance(out[1], StageTimeoutError)
    assert str(out[1]) == "score: no answer from rollout worker 0 within 5 s"


def test_a_wait_that_returns_before_the_deadline_is_not_taken_for_the_timeout(monkeypatch):
    # Ray's wait returns up to a millisecond early; the stage must still last its full timeout.
    fake = FakeRay(monkeypatch, {"push": "ok", "receive 0": RUNNING, "receive 1": "ok"}, 0.001)
    with pytest.raises(StageTimeoutError, match="within 10 s"):
        gather("weight sync", CALLS, 10, RAISE)
    assert fake.now >= 10
    assert fake.waits > 3  # it waited again for what was left of the timeout
