"""Start-up leaves nothing behind: a cluster too small for the run stops it before anything is
placed, naming what is missing; an actor that fails to start takes the others and the placement
group with it."""

import re

import pytest

from gmai_rl.cluster.cluster import Cluster
from gmai_rl.cluster.errors import ActorDiedError, InsufficientResourcesError
from gmai_rl.cluster.session import init_ray
from gmai_rl.loop import run

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

# 2 learner ranks + 2 rollout workers take the 4 CPUs; the reward worker's half CPU is missing.
MISSING = "the placement group takes 4 CPUs, the reward worker needs 0.5 more; the cluster has 4"


def test_a_reward_worker_that_cannot_fit_stops_the_run_before_anything_is_placed(
    small_config, tmp_path
):
    # Without the check, the reward worker would wait start_timeout_s and fail otherwise.
    cfg = small_config(tmp_path, "cluster.num_cpus=4", "cluster.start_timeout_s=120")
    # A run stops in its pre-flight plan, before Ray starts, with the cluster check's words.
    with pytest.raises(ValueError, match=re.escape(f"cluster.num_cpus=4: {MISSING}")):
        run(cfg)
    assert not ray.is_initialized()
    # On a running cluster of that size (e.g. `ray start --num-cpus 4`), the cluster's own check.
    init_ray(cfg)
    try:
        with pytest.raises(InsufficientResourcesError, match=re.escape(MISSING)) as err:
            Cluster.start(cfg)
        assert "reward.num_workers" in str(err.value) and "cluster.num_cpus" in str(err.value)
        assert ray.util.placement_group_table() == {}
    finally:
        ray.shutdown()


def test_an_actor_that_fails_to_start_takes_the_placement_group_with_it(small_config, tmp_path):
    cfg = small_config(tmp_path, "reward.fn=no_such_module:reward")
    init_ray(cfg)
    try:
        with pytest.raises(ActorDiedError, match="reward worker 0 died") as err:
            Cluster.start(cfg)
        assert "cannot load reward function 'no_such_module:reward'" in str(err.value)
        states = [pg["state"] for pg in ray.util.placement_group_table().values()]
        assert states == ["REMOVED"]
    finally:
        ray.shutdown()
