"""vLLM's engine core process dies: the engine says it is broken for good.

On a GPU vLLM always runs its engine core in a process of its own; here it is made to
(`rollout.vllm.multiprocessing=true`) and SIGKILLed, as the OOM killer or a crashed kernel would
end it: while it generates (the call in flight must not wait forever: vLLM's synchronous client
leaves it blocked, rollout/vllm_liveness.py wakes it) and while idle (the next call fails). vLLM
raises `EngineDeadError` for that call and every later one; the engine turns it into
`EngineBrokenError`, which the cluster's waits count as the worker's death
(tests/unit/test_cluster_waits.py), so the worker is replaced as if its actor had died.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.models.loading import ModelOptions
from gmai_rl.rollout.base import EngineBrokenError
from gmai_rl.rollout.options import VLLMOptions
from gmai_rl.rollout.worker import RolloutWorker
from gmai_rl.types import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

SAMPLING = SamplingParams(1.0, 1.0, 4, seed=0)


def engine_core_process(worker: RolloutWorker) -> psutil.Process:
    """The engine-core process of the worker's vLLM engine, as vLLM's client holds it.

    vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING once per process (its env cache): an in-process
    engine made earlier in this pytest process would make this one in-process too, with no core
    to kill; tests that make engines with other settings run them in Ray actors."""
    client = worker.engine.llm.llm_engine.engine_core
    (core,) = client.resources.engine_manager.processes
    process = psutil.Process(core.pid)
    assert process.is_running() and process.ppid() == os.getpid()
    return process


def kill_once_generating(llm_engine, core: psutil.Process) -> None:
    """SIGKILL the core as soon as requests are in flight (added, not yet finished)."""
    deadline = time.monotonic() + 120
    while llm_engine.get_num_unfinished_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    core.kill()


@pytest.fixture
def worker(text_model_dir):
    options = VLLMOptions(
        enforce_eager=True, max_model_len=1024, kv_cache_memory_mb=64, multiprocessing=True
    )
    worker = RolloutWorker(
        "vllm",
        ModelOptions(path=text_model_dir, dtype="float32"),
        seed=0,
        engine_kwargs={"vllm": options},
    )
    yield worker
    worker.shutdown()


@pytest.fixture
def prompts(text_mcq_dir):
    return [build_prompt(item) for item in load_mcq_jsonl(text_mcq_dir / "train.jsonl")[:2]]


def test_a_core_killed_while_it_generates_breaks_the_generate_in_flight(worker, prompts):
    assert [len(g.completions) for g in worker.generate(prompts, 2, SAMPLING)] == [2, 2]
    core = engine_core_process(worker)
    killer = threading.Thread(
        target=kill_once_generating, args=(worker.engine.llm.llm_engine, core), daemon=True
    )
    killer.start()
    long = SamplingParams(1.0, 1.0, 700, seed=0)  # still generating when the kill lands
    with pytest.raises(EngineBrokenError, match="engine core process died during generate"):
        worker.generate(prompts, 2, long)
    killer.join(timeout=60)
    with pytest.raises(EngineBrokenError, match="must be replaced"):
        worker.generate(prompts, 2, SAMPLING)  # and every call after


def test_a_core_killed_while_idle_breaks_the_next_generate(worker, prompts):
    assert [len(g.completions) for g in worker.generate(prompts, 2, SAMPLING)] == [2, 2]
    core = engine_core_process(worker)
    core.kill()
    core.wait(timeout=60)
    with pytest.raises(EngineBrokenError, match="engine core process died during generate"):
        worker.generate(prompts, 2, SAMPLING)
    with pytest.raises(EngineBrokenError, match="must be replaced"):
        worker.generate(prompts, 2, SAMPLING)
