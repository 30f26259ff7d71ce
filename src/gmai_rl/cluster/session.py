"""Ray for one run: connect or start it, check that the cluster can hold the run, reserve the
placement group.

`init_ray` connects to the configured cluster (`cluster.address`, $RAY_ADDRESS, or the cluster
of `ray job submit`), or starts a local Ray advertising enough CPUs for every actor. Before the
cluster creates anything, `check_resources` compares what the run holds at once with what the
cluster has and stops naming what is missing (`placement.resource_shortfall`, pure).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.util
from ray.util.placement_group import placement_group, remove_placement_group

from gmai_rl.cluster.errors import InsufficientResourcesError, StageTimeoutError
from gmai_rl.cluster.placement import (
    BundlePlan,
    format_resources,
    plan_bundles,
    resource_shortfall,
    run_demand,
)
from gmai_rl.config import TrainConfig

log = logging.getLogger(__name__)


def init_ray(cfg: TrainConfig) -> bool:
    """Connect to the cluster or start a local one; False when Ray was already initialised
    (nothing done)."""
    if ray.is_initialized():
        return False
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address)
        return True
    needed = run_demand(plan_bundles(cfg.cluster), cfg.reward.num_workers).get("CPU", 0)
    ports = {}
    if cfg.cluster.metrics_export_port is not None:
        ports["_metrics_export_port"] = cfg.cluster.metrics_export_port
    ray.init(
        num_cpus=cfg.cluster.num_cpus or max(math.ceil(needed), 1),
        include_dashboard=cfg.cluster.dashboard,
        log_to_driver=True,
        **ports,
    )
    return True


@contextmanager
def ray_session(cfg: TrainConfig) -> Iterator[None]:
    """Ray for one run (`init_ray`), shut down on exit if this run started it: the next run of
    a hydra multirun, in the same process, then starts its own."""
    started = init_ray(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_resources(cfg: TrainConfig, plan: BundlePlan) -> None:
    """Stop before creating anything when the cluster cannot hold the run; warn when it can but
    other work holds what it needs (the waits are then bounded by cluster.start_timeout_s)."""
    if not cfg.cluster.check_resources:
        return
    workers, strategy = cfg.reward.num_workers, str(cfg.cluster.placement_strategy)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problems = resource_shortfall(plan, workers, strategy, ray.cluster_resources(), nodes)
    if problems:
        raise InsufficientResourcesError(
            "start: the cluster cannot hold this run: "
            + "; ".join(problems)
            + ". Change those keys or add resources to the cluster (cluster.num_cpus for a "
            "local Ray; cluster.check_resources=false on an autoscaling cluster)."
        )
    busy = resource_shortfall(plan, workers, strategy, ray.available_resources())
    if busy:
        log.warning("start: waiting for resources other work holds: %s", "; ".join(busy))


def ready_placement_group(cfg: TrainConfig, plan: BundlePlan) -> Any:
    """The run's placement group once Ray has reserved it (at most cluster.start_timeout_s)."""
    timeout = cfg.cluster.start_timeout_s
    pg = placement_group(plan.bundles, strategy=str(cfg.cluster.placement_strategy))
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(pg)
        raise StageTimeoutError(
            f"start: the placement group ({plan.bundles}) was not ready within {timeout:g} s "
            f"(cluster.start_timeout_s); {free_resources()}"
        )
    return pg


def free_resources() -> str:
    """What the cluster has free, for a message: an actor that cannot be scheduled and one still
    loading its model look alike from the driver."""
    free, total = ray.available_resources(), ray.cluster_resources()
    return (
        f"the cluster has {format_resources(free) or 'nothing'} free of {format_resources(total)}"
    )


def node_address() -> tuple[str, int]:
    """This node's address as Ray sees it, and a port reserved on it (`find_free_port`). Run as
    a task in learner rank 0's bundle; it lives here, a module that imports no actor class, so
    the task's worker process starts light."""
    from gmai_rl.sync.group import find_free_port

    return ray.util.get_node_ip_address(), find_free_port()
