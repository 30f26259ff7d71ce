"""What a stage on the cluster can end with, besides its result (no Ray).

Every error names the stage and the actors. A death (`ActorDiedError`) is what Ray reports when
an actor's process is gone: killed, out of memory, pre-empted, its node lost; a rollout worker
whose engine broke for good (`gmai_rl.rollout.base.EngineBrokenError`) counts as dead too. Which
deaths the run survives, and how: gmai_rl.cluster.recovery.
"""

from __future__ import annotations

from collections.abc import Mapping


class ClusterError(RuntimeError):
    """A stage could not complete on the cluster."""


class StageTimeoutError(ClusterError):
    """Some actors did not answer within the stage's timeout."""


class ActorDiedError(ClusterError):
    """An actor's process died (killed, out of memory, node lost) during a stage."""


class RolloutsDiedError(ActorDiedError):
    """Rollout workers died during a weight push; `dead` maps each one's index to its death.
    The push's other members have left it by the time it is raised."""

    def __init__(self, dead: Mapping[int, ActorDiedError]) -> None:
        super().__init__("; ".join(str(death) for death in dead.values()))
        self.dead = dict(dead)


class RolloutsLostError(ClusterError):
    """Every rollout worker died while the learners hold weights no worker was given (they
    trained since the last push): a replacement cannot be given the policy that generated the
    batch. Push first, then generate again."""


class InsufficientResourcesError(ClusterError):
    """The cluster cannot hold the run's placement group and actors."""
