"""A member of the weight-sync group dies: the push ends for every member at once.

Real gloo groups in processes of their own (as Ray actors are). The group's deadline is left at
the default (`sync.timeout_s`, 600 s): a survivor that waited it out would hang the test (and
fail it at pytest's timeout), so finishing at all shows that the death was acted on, and the
errors recorded say how it was seen (a closed connection, never a timeout).

How each backend learns of a death: gloo through the dead member's closed connections (rank 0
sends to each receiver point to point and drops the one it cannot reach), NCCL through an abort
request in rank 0's store (`request_abort`), which its waits poll. The NCCL waits are driven by
fakes in tests/unit/test_sync_inflight.py; the store round trip is real here.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_sync_processes import HOST, run_in_processes

from gmai_rl.sync import find_free_port, init_sync_group, param_specs, plan_buckets
from gmai_rl.sync.group import ABORT_POLL_S, request_abort
from gmai_rl.sync.weights import checksums, push_weights, receive_weights

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEFAULT_TIMEOUT_S = 600.0  # sync.timeout_s's default


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])


def plan() -> list:
    """Many small buckets: a death lands between two of them."""
    return plan_buckets(param_specs(model().named_parameters()), 8 * 1024)


def _sender(port: int) -> dict:
    with init_sync_group(HOST, port, 0, 3, timeout_s=DEFAULT_TIMEOUT_S) as group:
        group.barrier()  # every receiver has joined; one of them now dies
        sent = push_weights(model(), plan(), group, zero_stage=0, verify=True)
        return {"sent": sent, "lost": dict(group.lost)}


def _receiver(port: int, rank: int, die_after: int | None) -> dict:
    group = init_sync_group(HOST, port, rank, 3, timeout_s=DEFAULT_TIMEOUT_S)
    if die_after == 0:
        # SIGKILL while idle (no clean-up runs), after the barrier: the sender has joined too.
        group.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    group.barrier()
    got = {}
    for name, tensor in receive_weights(group, plan()):
        got[name] = tensor.clone()
        if die_after is not None and len(got) == die_after:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-push: some buckets taken, not all
    return {"checksums": checksums(got.items())}


def run_push_with_a_death(die_after: int) -> tuple[dict, dict]:
    port = find_free_port()
    jobs = [(_sender, (port,)), (_receiver, (port, 1, None)), (_receiver, (port, 2, die_after))]
    # The dying receiver gives no result: run it beside the others, collect the two.
    return tuple(run_in_processes(jobs, timeout_s=240, may_die={2})[:2])  # type: ignore[return-value]


@pytest.mark.parametrize("die_after", [0, 3], ids=["idle", "mid-push"])
def test_a_receiver_killed_before_or_during_a_push_is_dropped_and_the_rest_complete(die_after):
    sender, survivor = run_push_with_a_death(die_after)
    assert list(sender["lost"]) == [2]
    assert "Timed out" not in sender["lost"][2]  # seen from its closed connection
    assert survivor["checksums"] == sender["sent"]  # every tensor, exactly


def test_an_abort_request_reaches_every_member_through_rank_0s_store() -> None:
    port = find_free_port()
    with init_sync_group(HOST, port, 0, 1, timeout_s=5) as group:
        assert group.abort_reason() is None
        request_abort(HOST, port, "rollout worker 1 died")
        group._abort_checked -= ABORT_POLL_S  # the next check reads the store
        assert group.abort_reason() == "aborted: rollout worker 1 died"
