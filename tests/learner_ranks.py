"""Learner ranks that serve one test's configuration after another in the same processes.

Starting a pair of `Learner` actors is mostly starting their processes: each Ray worker imports
torch, transformers and DeepSpeed (and torch._dynamo, through torchvision's ops) and joins the
gloo group, 15-60 s on 2 busy cores, where the constructor itself takes about a second in a warm
process. `ReusableLearner.rebuild` runs the production constructor again in the process the rank
already has: each test gets the ranks a fresh `Learner(model, learner, loss, ...)` would be (the
checkpoint's weights, a new optimizer and DeepSpeed engine, the seeded RNG), only the process and
its default process group are reused.

Importable by Ray workers: the `local_ray` fixtures put this folder on their PYTHONPATH.
"""

from __future__ import annotations

import gc
from typing import Any

from gmai_rl.learner.options import LearnerOptions, LossOptions
from gmai_rl.learner.worker import Learner
from gmai_rl.models.loading import ModelOptions
from gmai_rl.sync.group import find_free_port

HOST = "127.0.0.1"


class ReusableLearner(Learner):
    """A `Learner` rank whose process outlives its configuration."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        super().__init__(*args)

    def rebuild(self, model: ModelOptions, learner: LearnerOptions, loss: LossOptions) -> None:
        """Become the rank `Learner(model, learner, loss, <same rank, world, group>)` would be.

        The old engines go first (they hold the model, optimizer state and ZeRO-3 hooks). The
        default process group stays: `init_distributed` finds it formed and keeps it, as DeepSpeed
        does when a second engine (the KL reference) is built in a process. Collective (every rank
        calls at once: DeepSpeed broadcasts rank 0's parameters and ZeRO-3 partitions them).
        """
        _, _, _, *group = self._args
        self.__dict__.clear()
        gc.collect()
        self.__init__(model, learner, loss, *group)


class LearnerPair:
    """Two `ReusableLearner` Ray actors (world size 2, gloo), started on the first `build`."""

    world_size = 2

    def __init__(self) -> None:
        self.ranks: list[Any] = []

    def build(
        self, model: str | ModelOptions, learner: LearnerOptions, loss: LossOptions | None = None
    ) -> list[Any]:
        """The two ranks, configured as `Learner(model, learner, loss)` (a folder: its
        `ModelOptions`)."""
        import ray  # here, so that a test module can import this one before importorskip("ray")

        if isinstance(model, str):
            model = ModelOptions(model)
        loss = loss or LossOptions(kl_coef=0.0)
        if not self.ranks:
            port = find_free_port()
            self.ranks = [
                ray.remote(ReusableLearner)
                .options(num_cpus=1)
                .remote(model, learner, loss, rank, self.world_size, HOST, port)
                for rank in range(self.world_size)
            ]
            ray.get([r.ping.remote() for r in self.ranks])
        else:
            ray.get([r.rebuild.remote(model, learner, loss) for r in self.ranks])
        return self.ranks

    def discard(self) -> None:
        """Kill both processes (a failed test may have left a rank inside a collective); the
        next `build` starts new ones."""
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
