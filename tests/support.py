"""Helpers shared by every test tier: compose the config, run a cluster, rewards for random models.

Importable as `support` from any test (tests/conftest.py puts this folder on sys.path), and by
the Ray workers of a running cluster (`running_cluster` puts it on their PYTHONPATH), which load
the test rewards by dotted path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent


def compose(*overrides: str) -> Any:
    """The hydra tree of conf/config.yaml with `overrides` (output_dir set to a dummy unless
    given), before conversion to the typed config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gmai_rl.train import CONF_DIR

    defaults = (
        []
        if any(o.startswith("trainer.output_dir=") for o in overrides)
        else ["trainer.output_dir=/tmp/unused"]
    )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[*defaults, *overrides])


def train_config(*overrides: str) -> Any:
    """The typed `TrainConfig` of conf/ with `overrides`."""
    from gmai_rl.train import to_train_config

    return to_train_config(compose(*overrides))


@contextmanager
def running_cluster(cfg: Any) -> Iterator[Any]:
    """A local Ray instance and a started `Cluster` for `cfg`; both torn down on exit."""
    import ray

    from gmai_rl.cluster import Cluster, init_ray

    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), previous]))
    try:
        init_ray(cfg)
        cluster = Cluster.start(cfg)
        try:
            yield cluster
        finally:
            cluster.shutdown()
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


# --------------------------------------------------------------------- rewards for the tests


def length_reward(completion: str, item: Any) -> dict[str, float]:
    """Varied rewards from a random model, which never answers in format (the MCQ rule would give
    every sample 0 and GRPO no gradient): longer is better."""
    return {"total": len(completion) / 100.0, "accuracy": float(len(completion) % 2)}


LENGTH_REWARD = "support:length_reward"
"""The dotted path of `length_reward` for `reward.fn=`."""
