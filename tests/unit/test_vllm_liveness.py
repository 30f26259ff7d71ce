"""An engine-core process that dies fails the calls waiting on it, instead of leaving them blocked.

vLLM 0.32.0's synchronous client waits on a queue (generate) and on futures (utility calls) that
nothing fills once its core process is gone (rollout/vllm_liveness.py says why); here the client
is a stand-in with the attributes the watch reads, and the core a real child process, killed.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from gmai_rl.rollout.vllm_liveness import watch_engine_core


class CoreDead(Exception):
    pass


def client_with(processes: list) -> SimpleNamespace:
    manager = SimpleNamespace(processes=processes, manager_stopped=threading.Event())
    return SimpleNamespace(
        resources=SimpleNamespace(engine_manager=manager),
        outputs_queue=queue.Queue(),
        utility_results={},
    )


@pytest.fixture
def core():
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,))
    process.start()
    yield process
    process.kill()
    process.join()


def test_a_killed_core_fails_the_generate_and_the_utility_call_waiting_on_it(core):
    client = client_with([core])
    pending: Future = Future()
    client.utility_results[7] = pending
    assert watch_engine_core(client, CoreDead) is not None
    with pytest.raises(queue.Empty):  # alive: nothing to wake anyone with
        client.outputs_queue.get(timeout=1.5)
    assert not pending.done()
    core.kill()
    assert isinstance(client.outputs_queue.get(timeout=30), CoreDead)
    assert isinstance(pending.exception(timeout=30), CoreDead)


def test_a_call_answered_meanwhile_keeps_its_answer(core):
    client = client_with([core])
    answered: Future = Future()
    answered.set_result("ok")
    client.utility_results[1] = answered
    watch_engine_core(client, CoreDead)
    core.kill()
    assert isinstance(client.outputs_queue.get(timeout=30), CoreDead)
    assert answered.result() == "ok"


def test_an_in_process_core_has_nothing_to_watch():
    in_process = SimpleNamespace(engine_core=object())  # vLLM's InprocClient: no manager
    assert watch_engine_core(in_process, CoreDead) is None


def test_the_watch_ends_with_the_engine_and_wakes_nobody(core):
    client = client_with([core])
    watch = watch_engine_core(client, CoreDead)
    client.resources.engine_manager.manager_stopped.set()  # vLLM's own shutdown sets it first
    watch.join(timeout=30)
    assert not watch.is_alive(), "the watch outlived its engine"
    core.kill()
    core.join()
    assert client.outputs_queue.empty()
