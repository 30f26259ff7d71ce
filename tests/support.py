"""Helpers shared by every test tier: compose the config, run a cluster, rewards for random models.

Importable as `support` from any test (tests/conftest.py puts this folder on sys.path), and by
the Ray workers of a running cluster (`running_cluster` puts it on their PYTHONPATH), which load
the test rewards by dotted path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent


TEST_SIZE = (
    "algo.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=8",
    "learner.micro_batch_size=4",
    "sft.steps=2",
    "sft.batch_size=8",
    "algo.max_refill_rounds=0",
)
"""The demo's job cut down for a test on the tiny model and the small synthetic dataset: 4 prompts
x 4 samples per step, 8 new tokens, 2 SFT steps, no refill rounds (which would make a step's
prompt count depend on what the random model answers)."""


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

    from gmai_rl.cluster.cluster import Cluster
    from gmai_rl.cluster.session import init_ray

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

FAULTS_DIR_ENV = "GMAI_RL_TEST_FAULTS_DIR"


def length_reward_with_faults(completion: str, item: Any) -> dict[str, float]:
    """`length_reward`, and faults on request: a file "die" (or "hang") in $GMAI_RL_TEST_FAULTS_DIR
    makes the first reward worker to claim it (an atomic rename) exit at once (or hang)."""
    folder = os.environ.get(FAULTS_DIR_ENV)
    for fault in ("die", "hang") if folder else ():
        try:
            os.rename(os.path.join(folder, fault), os.path.join(folder, f"{fault}.claimed"))
        except FileNotFoundError:
            continue
        if fault == "die":
            os._exit(1)
        time.sleep(3600)
    return length_reward(completion, item)


FAULTY_REWARD = "support:length_reward_with_faults"


# ------------------------------------------------------------------ memory of an autograd pass


@dataclass
class AutogradMemory:
    """What one forward+backward allocated, by tensor shapes (see `autograd_memory`)."""

    saved: dict[int, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    """Storage address -> (shape, bytes) of each tensor autograd kept for backward."""
    largest: int = 0
    """Bytes of the largest tensor any operator produced, in forward or in backward."""
    largest_shape: tuple[int, ...] = ()

    def saved_with_dim(self, size: int) -> int:
        """Bytes kept for backward in tensors with a dimension of `size` (e.g. the vocabulary)."""
        return sum(nbytes for shape, nbytes in self.saved.values() if size in shape)


def autograd_memory(run: Callable[[], Any], exclude: Iterable[Any] = ()) -> AutogradMemory:
    """Record what `run()` (a forward and its backward) keeps and makes, exactly and by shape.

    torch's CPU allocator has no peak counter and RSS is noisy, so this counts tensors instead:
    `saved_tensors_hooks` see every tensor autograd saves for backward (the memory held between
    forward and backward; a tensor saved inside an activation checkpoint is dropped by the
    checkpoint and not seen, which is right: it is not held), and a dispatch mode sees every
    operator's output, forward, backward and checkpoint recomputation alike (the transient peak is
    at most the held memory plus a few of the largest outputs). Tensors sharing the storage of one
    in `exclude` (the parameters and inputs, alive anyway) are not counted as saved.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    memory = AutogradMemory()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    held: list[Any] = []  # keeps saved storages alive, so that no address is reused meanwhile

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            memory.saved[storage.data_ptr()] = (tuple(tensor.shape), storage.nbytes())
            held.append(tensor)
        return tensor

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    # A view (or an expanded index) allocates at most its storage.
                    nbytes = min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                    if nbytes > memory.largest:
                        memory.largest, memory.largest_shape = nbytes, tuple(t.shape)
            return out

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Largest():
        run()
    return memory
