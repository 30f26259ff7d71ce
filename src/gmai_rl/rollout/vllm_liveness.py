"""Wake whoever waits on vLLM's engine core when its process dies.

vLLM 0.32.0's synchronous client (`SyncMPClient`, v1/engine/core_client.py) blocks
`LLM.generate` on `outputs_queue.get()` and every utility call (`collective_rpc`, cache resets,
sleep, wake) on a `Future` with no timeout. When the engine-core process dies, vLLM's own monitor
marks the engine dead and shuts the client down, but the output thread then exits without putting
anything on that queue and no pending future is failed: a call in flight when the core dies waits
forever (only the asynchronous client puts an `EngineDeadError` on its queue). Its next call
would raise `EngineDeadError`; the one in flight never returns, and with it the rollout worker
and the run. The watch closes that gap: it waits on the core processes' sentinels and, when one
exits, hands `EngineDeadError` to every waiter, which the engine then reports as broken.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from multiprocessing import connection
from typing import Any

log = logging.getLogger(__name__)


def watch_engine_core(
    client: Any, dead_error: Callable[[], BaseException]
) -> threading.Thread | None:
    """Start a daemon thread that wakes `client`'s waiters with `dead_error()` once one of its
    engine-core processes exits; it ends with the engine. None for an in-process core."""
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    processes = list(getattr(manager, "processes", ()) or ())
    if not processes or not hasattr(client, "outputs_queue"):
        return None
    stopped = getattr(manager, "manager_stopped", None) or threading.Event()
    sentinels = [p.sentinel for p in processes]

    def watch() -> None:
        while not stopped.is_set():
            if connection.wait(sentinels, timeout=1.0):
                log.warning("vLLM's engine core process exited; failing the calls waiting on it")
                wake_waiters(client, dead_error)
                return

    thread = threading.Thread(target=watch, name="gmai-rl-engine-core-watch", daemon=True)
    thread.start()
    return thread


def wake_waiters(client: Any, dead_error: Callable[[], BaseException]) -> None:
    """Fail every utility call waiting on a reply, and put the error where `generate` waits for
    outputs. Harmless when nothing waits (a later call raises it, as vLLM's would)."""
    for future in list(client.utility_results.values()):
        with contextlib.suppress(InvalidStateError):  # answered or cancelled meanwhile
            future.set_exception(dead_error())
    client.outputs_queue.put_nowait(dead_error())
