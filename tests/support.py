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
ROOT = TESTS_DIR.parent


def load_script(path: str, name: str) -> Any:
    """The script at `path` (relative to the checkout: `benchmarks/memory.py`) as module `name`,
    registered in sys.modules (dataclasses look their module up there), with its folder on
    sys.path so that it imports its siblings as it does when run."""
    import importlib.util
    import sys

    script = ROOT / path
    if str(script.parent) not in sys.path:
        sys.path.append(str(script.parent))
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


def one_step(cluster: Any, sampler: Any, cfg: Any) -> Any:
    """One RL step as the run takes it (`Pipeline.step`), on its own: its StepRecord."""
    from gmai_rl.pipeline import Pipeline

    with Pipeline(cluster, sampler, cfg, steps=1) as pipeline:
        return pipeline.step(0)


# -------------------------------------------------------------- faults at a chosen moment


def process_title(pid: int) -> str:
    """What a process calls itself: Ray titles an actor's process `ray::Class` while idle and
    `ray::Class.method` while it runs a call. "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class KillWhen:
    """SIGKILL the process `victim` (no clean-up runs, as with a pre-emption or the kernel's OOM
    killer) the moment `moment(titles)` holds, `titles` being {pid: process_title} of `watched`.

    A thread polls the titles every `poll_s`; `killed_at` (time.monotonic) records the kill. A
    moment that never came leaves it None: the test then fails rather than passing without
    the fault. Use as a context manager around the stage to hit.
    """

    def __init__(
        self,
        victim: int,
        watched: Iterable[int],
        moment: Callable[[dict[int, str]], bool],
        poll_s: float = 0.001,
    ) -> None:
        import threading

        self.victim, self.watched, self.moment, self.poll_s = victim, list(watched), moment, poll_s
        self.killed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import signal

        while not self._stop.is_set():
            if self.moment({pid: process_title(pid) for pid in self.watched}):
                os.kill(self.victim, signal.SIGKILL)
                self.killed_at = time.monotonic()
                return
            time.sleep(self.poll_s)

    def __enter__(self) -> KillWhen:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def titled(method: str, *among: int) -> Callable[[dict[int, str]], bool]:
    """A `KillWhen` moment: one of `among` (every watched process if none given) runs a call
    whose title ends with `method`, e.g. titled("RolloutWorker.generate")."""
    return lambda titles: any(
        title == f"ray::{method}" for pid, title in titles.items() if not among or pid in among
    )


# ------------------------------------------------------------------ the cluster, without Ray

WAIT_S = 10
"""How long a fake stage waits for another thread's; a test fails, not hangs, past it."""


@dataclass
class Event:
    """One stage the fake cluster ran: which, on which thread, at which policy version."""

    what: str
    thread: str
    """"main" or "ahead" (the pipeline's thread)."""
    version: int
    prompts: tuple[str, ...] = ()


class FakeCluster:
    """The one fake of the cluster (gmai_rl.cluster.protocol.TrainingCluster) that the driver's
    tests share: every stage without Ray, recorded as an `Event` in `events`.

    Completions: `n` per prompt, each of two tokens, text `answer(prompt, k)` (default "c{k}").
    Rewards: the first completion of every group is right ({"total": 1}, the rest 0), except
    those `failed(group index, k)` names, which get `failed_reward(timed_out)`. Prompts whose
    ids are in `dropped` come back dropped (no completions: their image went after the load).
    Generation `fail_at` (1-based, counting every call) raises `fault` instead.
    For the pipeline: training call i (0-based) in `overlap` waits, up to WAIT_S, for
    generation i + 1 on another thread; `overlapped` says whether each saw it in time.
    """

    def __init__(
        self,
        version: int = 0,
        *,
        answer: Callable[[Any, int], str] | None = None,
        dropped: Iterable[str] = (),
        failed: Callable[[int, int], bool] | None = None,
        timed_out: bool = False,
        overlap: Iterable[int] = (),
        fail_at: int | None = None,
        fault: BaseException | None = None,
    ) -> None:
        import threading

        self.version = version
        self.rollout_restarts = self.reward_restarts = 0
        self.events: list[Event] = []
        self.answer = answer or (lambda prompt, k: f"c{k}")
        self.dropped, self.failed, self.timed_out = set(dropped), failed, timed_out
        self.overlap, self.overlapped = set(overlap), []
        self.fail_at, self.fault = fail_at, fault
        self.generations = self.ahead_generations = 0
        self.ahead = threading.Condition()
        self.trained: list[Any] = []
        self.scored: list[int] = []
        self.sft_batches: list[int] = []

    def record(self, what: str, prompts: Iterable[Any] = ()) -> Event:
        import threading

        thread = "main" if threading.current_thread() is threading.main_thread() else "ahead"
        event = Event(what, thread, self.version, tuple(p.id for p in prompts))
        self.events.append(event)
        return event

    def calls(self) -> list[str]:
        return [e.what for e in self.events]

    def generated(self) -> list[tuple[str, ...]]:
        return [e.prompts for e in self.events if e.what == "generate"]

    def generate(self, prompts: Any, n: int, sampling: Any) -> list[Any]:
        from gmai_rl.types import Completion, Group

        self.generations += 1
        if self.generations == self.fail_at:
            raise self.fault or RuntimeError("rollout worker 0 lost its engine")
        if self.record("generate", prompts).thread == "ahead":
            with self.ahead:
                self.ahead_generations += 1
                self.ahead.notify_all()
        return [
            Group(p, [], [], self.version, dropped=f"missing_image: {p.images}")
            if p.id in self.dropped
            else Group(
                p,
                [1],
                [Completion([1, 2], self.answer(p, k), [-0.1, -0.2]) for k in range(n)],
                self.version,
            )
            for p in prompts
        ]

    def score(self, groups: Any, items: Any) -> None:
        from gmai_rl.types import failed_reward

        self.record("score")
        # As the real one: one breakdown per completion, so a dropped group gets none.
        self.scored.append(sum(len(g.completions) for g in groups))
        for i, g in enumerate(groups):
            g.rewards = [
                failed_reward(timed_out=self.timed_out)
                if self.failed is not None and self.failed(i, k)
                else {"total": float(k == 0)}
                for k in range(len(g.completions))
            ]

    def start_stage(self, optim: Any, reset_reference: bool = False) -> None:
        self.record("start_stage")

    def train(self, samples: Any, num_minibatches: int) -> dict[str, float]:
        self.record("train")
        self.trained = list(samples)
        i = len(self.overlapped)
        with self.ahead:
            seen = i in self.overlap and self.ahead.wait_for(
                lambda: self.ahead_generations > i, WAIT_S
            )
        self.overlapped.append(seen)
        return {"loss": 0.5}

    def train_sft(self, samples: Any) -> dict[str, float]:
        self.record("train_sft")
        self.sft_batches.append(len(samples))
        return {"sft_loss": 1.0, "lr": 1e-4}

    def sleep_rollouts(self) -> None:
        self.record("sleep")

    def wake_rollouts(self) -> None:
        self.record("wake")

    def sync_weights(self, verify: bool) -> int:
        self.record("sync")
        self.version += 1
        return self.version

    def save_state(self, folder: str) -> None:
        self.record("save_state")

    def restore_state(self, folder: str, policy_version: int) -> None:
        self.record("restore_state")
        self.version = policy_version

    def save(self, path: str) -> None:
        self.record("save")

    def shutdown(self) -> None:
        self.record("shutdown")


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
    makes the first reward worker to claim it (an atomic rename) exit at once (or hang); while a
    file "slow" is there, every completion takes SLOW_REWARD_S to score (a moment long enough to
    inject a fault into)."""
    folder = os.environ.get(FAULTS_DIR_ENV)
    for fault in ("die", "hang") if folder else ():
        try:
            os.rename(os.path.join(folder, fault), os.path.join(folder, f"{fault}.claimed"))
        except FileNotFoundError:
            continue
        if fault == "die":
            os._exit(1)
        time.sleep(3600)
    if folder and os.path.exists(os.path.join(folder, "slow")):
        time.sleep(SLOW_REWARD_S)
    return length_reward(completion, item)


SLOW_REWARD_S = 0.05
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
