"""How the driver waits on a collective stage (the weight push): who may be replaced, what
it waits for, what it raises. Ray's wait and get are faked: calls finish in list order."""

import pytest

from gmai_rl.cluster import ActorDiedError, RolloutsDiedError, _await_collective

ray = pytest.importorskip("ray")
from ray.exceptions import RayActorError  # noqa: E402


class FakeRay:
    """`ray.wait` hands back one finished ref at a time, in order; `ray.get` returns the ref's
    value or raises what it stands for. Records what was read."""

    def __init__(self, monkeypatch, outcomes: dict[str, object]) -> None:
        self.outcomes, self.read = outcomes, []
        monkeypatch.setattr(ray, "wait", self.wait)
        monkeypatch.setattr(ray, "get", self.get)

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        self.read.append(ref)
        outcome = self.outcomes[ref]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


CALLS = [
    ("learner rank 0", "push"),
    ("learner rank 1", "push 1"),
    ("rollout worker 0", "receive 0"),
    ("rollout worker 1", "receive 1"),
]


def test_a_push_that_ends_well_gives_every_result_in_order(monkeypatch):
    FakeRay(monkeypatch, {ref: ref.upper() for _, ref in CALLS})
    results = _await_collective("weight sync", CALLS, 10, replaceable=2)
    assert results == ["PUSH", "PUSH 1", "RECEIVE 0", "RECEIVE 1"]


def test_a_dead_learner_rank_ends_the_wait_at_once(monkeypatch):
    fake = FakeRay(monkeypatch, {"push": RayActorError(), "push 1": None})
    with pytest.raises(ActorDiedError, match="weight sync: learner rank 0 died") as stopped:
        _await_collective("weight sync", CALLS, 10, replaceable=2)
    assert not isinstance(stopped.value, RolloutsDiedError)  # not one to replace
    assert fake.read == ["push"]  # nobody else waited for


def test_a_dead_rollout_worker_is_named_for_replacement_once_the_others_have_left(monkeypatch):
    broken = RuntimeError("gloo: connection closed by peer")
    fake = FakeRay(
        monkeypatch,
        {"push": broken, "push 1": None, "receive 0": RuntimeError("timed out"),
         "receive 1": RayActorError()},
    )  # fmt: skip
    with pytest.raises(RolloutsDiedError) as died:
        _await_collective("weight sync", CALLS, 10, replaceable=2)
    assert list(died.value.dead) == [1]  # rollout worker 1, counted among the rollouts
    assert "weight sync: rollout worker 1 died" in str(died.value)
    assert fake.read == [ref for _, ref in CALLS]  # the survivors' failures were waited for


def test_a_failure_without_a_death_is_raised_naming_its_actor(monkeypatch):
    FakeRay(
        monkeypatch,
        {"push": None, "push 1": None, "receive 0": ValueError("bad plan"), "receive 1": {}},
    )
    with pytest.raises(ValueError, match="bad plan") as raised:
        _await_collective("weight sync", CALLS, 10, replaceable=2)
    assert "(raised by rollout worker 0 during weight sync)" in raised.value.__notes__
