"""Waiting on the actors' calls: one primitive, `gather`, and the policies it runs under.

Every remote call the cluster makes is awaited here, bounded by a deadline. What the wait does
when an actor dies, when a call raises and when time runs out is the caller's `Policy`:

| policy | a death | another error | time runs out |
|---|---|---|---|
| `RAISE` (most stages) | ends the wait at once | ends the wait at once | `StageTimeoutError` |
| `IN_PLACE` (generate) | left in the call's place | ends the wait at once | `StageTimeoutError` |
| `Policy(stalls_in_place=True)` (score) | as chosen | as chosen | each late call's place |
| `Policy(settle=True)` (a collective) | as chosen | raised once every call has ended | `StageTimeoutError` |

A death is seen the moment Ray reports it (a dead actor's call fails within a second), and
`keep_dead(index, death)` is called right then: the weight push uses it to tell the sync
group's other members to stop waiting on the dead one, and to let a learner rank's death end
the wait at once while a rollout worker's is left in place. In a settled collective whose
member died, the others' errors follow from the death: they stay in place too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from gmai_rl.cluster.errors import ActorDiedError, StageTimeoutError
from gmai_rl.rollout.base import EngineBrokenError

Call = tuple[str, Any]
"""(the actor's name for messages, e.g. "rollout worker 1"; the ObjectRef of its pending call)."""

KeepDead = Callable[[int, ActorDiedError], bool]
"""Told of call `index`'s death as soon as it is seen: True leaves the death in the call's place
and the wait goes on, False raises it at once."""


def never(index: int, death: ActorDiedError) -> bool:
    return False


def always(index: int, death: ActorDiedError) -> bool:
    return True


@dataclass(frozen=True)
class Policy:
    """What `gather` does with a death, another error, and a call still running at the deadline."""

    keep_dead: KeepDead = never
    """See `KeepDead`."""
    settle: bool = False
    """A collective: another call's error is raised only once every call has ended (its
    members must have left the collective before anything else is asked of them), and not at
    all if a member died (the death explains it): it is then left in place."""
    stalls_in_place: bool = False
    """A call still running at the deadline gets a `StageTimeoutError` in its place instead of
    ending the wait with one."""


RAISE = Policy()
IN_PLACE = Policy(keep_dead=always)


def gather(
    stage: str, calls: Sequence[Call], timeout_s: float, policy: Policy = RAISE
) -> list[Any]:
    """The results of `calls`, in order, waiting at most `timeout_s` for all of them; what stands
    in a call's place when it did not return a result is the policy's choice (see the module
    docstring). A dead actor's call gives `ActorDiedError`, another call's exception arrives
    as itself with a note naming the actor and stage."""
    deadline = time.monotonic() + timeout_s
    index = {ref: i for i, (_, ref) in enumerate(calls)}
    pending = list(index)
    outcomes: dict[int, Any] = {}
    while pending:
        ready, pending = ray.wait(
            pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
        )
        if not ready and time.monotonic() < deadline:
            continue  # ray.wait counts its timeout in whole milliseconds: it may return early
        if not ready:
            late = [index[ref] for ref in pending]
            if not policy.stalls_in_place:
                raise _timeout(stage, [calls[i][0] for i in late], timeout_s)
            for i in late:
                outcomes[i] = StageTimeoutError(
                    f"{stage}: no answer from {calls[i][0]} within {timeout_s:g} s"
                )
            break
        for ref in ready:
            i = index[ref]
            outcome = outcomes[i] = _outcome(stage, *calls[i])
            if isinstance(outcome, ActorDiedError):
                if not policy.keep_dead(i, outcome):
                    raise outcome
            elif isinstance(outcome, Exception) and not policy.settle:
                raise outcome
    results = [outcomes[i] for i in range(len(calls))]
    if policy.settle and not any(died(r) for r in results):
        for r in results:
            if isinstance(r, Exception):
                raise r
    return results


def died(outcome: Any) -> bool:
    """Whether a gathered outcome is a death (the actor must be replaced)."""
    return isinstance(outcome, ActorDiedError)


def _outcome(stage: str, name: str, ref: Any) -> Any:
    """A finished call's result; a dead actor's (or broken engine's) `ActorDiedError`, or the
    exception it raised, noted with the actor and stage."""
    try:
        return ray.get(ref)
    except RayActorError as err:
        return _death(f"{stage}: {name} died: {err}", err)
    except EngineBrokenError as err:  # alive, but its engine is gone for good: as if dead
        cause = getattr(err, "cause", err)  # Ray's wrapper holds the actor's own exception
        return _death(f"{stage}: {name} must be replaced: {cause}", err)
    except Exception as err:
        err.add_note(f"(raised by {name} during {stage})")
        return err


def _death(message: str, cause: BaseException) -> ActorDiedError:
    death = ActorDiedError(message)
    death.__cause__ = cause
    return death


def _timeout(stage: str, late: list[str], timeout_s: float) -> StageTimeoutError:
    return StageTimeoutError(
        f"{stage}: no answer from {', '.join(late)} within {timeout_s:g} s (a stalled or "
        "unschedulable actor; see cluster.call_timeout_s / cluster.start_timeout_s)"
    )
