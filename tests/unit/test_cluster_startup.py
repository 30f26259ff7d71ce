"""What the cluster checks before it starts anything (pure): whether the cluster can hold the
run, the environment the actors get, and where a submitted job may write."""

import json
from pathlib import Path

import pytest

from gmai_rl.cluster.environment import actor_env, job_working_dir, output_dir_error
from gmai_rl.cluster.placement import plan_bundles, resource_shortfall, run_demand
from gmai_rl.config import ClusterConfig
from support import train_config

DEMO = plan_bundles(ClusterConfig(learner_ranks=2, rollout_workers=2))
"""Four 1-CPU bundles: 2 learner ranks and 2 rollout workers."""


def test_the_run_holds_the_placement_group_and_half_a_cpu_per_reward_worker():
    assert run_demand(DEMO, reward_workers=1) == {"CPU": 4.5}
    gpu = plan_bundles(ClusterConfig(gpus_per_learner=1, gpus_per_rollout_worker=2))
    assert run_demand(gpu, reward_workers=3) == {"CPU": 5.5, "GPU": 6}


def test_a_cluster_that_fits_the_run_has_no_shortfall():
    assert resource_shortfall(DEMO, 1, "PACK", {"CPU": 4.5}) == []
    assert resource_shortfall(DEMO, 2, "PACK", {"CPU": 6, "GPU": 0}, [{"CPU": 6}]) == []


def test_a_reward_worker_left_without_a_cpu_is_named_with_what_the_cluster_has():
    (problem,) = resource_shortfall(DEMO, 1, "PACK", {"CPU": 4})
    assert problem.startswith(
        "the placement group takes 4 CPUs, the reward worker needs 0.5 more; the cluster has 4"
    )
    assert "reward.num_workers" in problem and "cluster.cpus_per_actor" in problem


def test_several_reward_workers_and_a_missing_gpu_are_each_named():
    plan = plan_bundles(ClusterConfig(gpus_per_learner=1, gpus_per_rollout_worker=1))
    problems = resource_shortfall(plan, 2, "PACK", {"CPU": 3, "GPU": 2})
    assert problems[0].startswith(
        "the placement group takes 4 CPUs, the reward workers need 1 more; the cluster has 3"
    )
    assert problems[1].startswith("the placement group takes 4 GPUs; the cluster has 2")
    assert "cluster.gpus_per_rollout_worker" in problems[1]


def test_a_bundle_no_node_can_hold_is_named_even_when_the_totals_fit():
    plan = plan_bundles(ClusterConfig(learner_ranks=1, rollout_workers=1, cpus_per_actor=8))
    nodes = [{"CPU": 4}] * 4
    (problem,) = resource_shortfall(plan, 1, "PACK", {"CPU": 32}, nodes)
    assert problem == "no node can hold a bundle of 8 CPU (nodes: 4 CPU; 4 CPU; 4 CPU; 4 CPU)"


@pytest.mark.parametrize(
    ("strategy", "nodes", "message"),
    [
        ("STRICT_PACK", [{"CPU": 3}, {"CPU": 3}], "STRICT_PACK puts every bundle (4 CPU in all)"),
        ("STRICT_SPREAD", [{"CPU": 8}] * 3, "each of the 4 bundles on a node of its own"),
    ],
)
def test_strict_strategies_need_one_large_node_or_one_node_per_bundle(strategy, nodes, message):
    (problem,) = resource_shortfall(DEMO, 0, strategy, {"CPU": 24}, nodes)
    assert message in problem


def test_actors_get_what_they_need_in_their_own_env():
    cpu = actor_env(train_config(), {"HF_HUB_OFFLINE": "1", "OTHER": "x"})
    assert cpu == {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
    }
    gpu = actor_env(train_config("cluster=gpu_node"), {})
    assert gpu == {"TOKENIZERS_PARALLELISM": "false"}  # no DeepSpeed on CPU, no offline flag
    debug = actor_env(train_config("cluster=gpu_node"), {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"})
    assert debug["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"  # the ranks check their collectives


RESOURCES = Path("/tmp/ray/session_2026-12-01_10-00-00_1_1/runtime_resources")
PACKAGE = RESOURCES / "working_dir_files" / "_ray_pkg_0123abcd"


def test_a_job_driver_runs_in_the_unpacked_working_dir():
    assert job_working_dir(PACKAGE, {}) == PACKAGE
    assert job_working_dir(PACKAGE / "sub", {}) == PACKAGE
    assert job_working_dir(Path("/home/me/gmai-rl"), {}) is None


def test_the_job_config_tells_when_the_path_does_not():
    def job(working_dir):
        return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": working_dir})}

    here = Path("/scratch/ray/pkg")
    assert job_working_dir(here, job({"working_dir": "gcs://_ray_pkg_0123.zip"})) == here
    assert job_working_dir(here, job({"working_dir": "local:///scratch/ray/pkg"})) is None
    assert job_working_dir(here, job({"env_vars": {"A": "1"}})) is None  # no working_dir
    assert job_working_dir(here, {"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}) is None


def test_outputs_inside_the_job_working_dir_are_refused_naming_the_key():
    error = output_dir_error("outputs/2026-12-01/10-00-00", PACKAGE, {})
    assert error is not None and error.startswith(f"trainer.output_dir={PACKAGE}/outputs/")
    assert "deletes with the session" in error and "launch/submit.sh" in error
    assert output_dir_error(str(PACKAGE), PACKAGE, {}) is not None  # the folder itself too


def test_outputs_outside_the_job_working_dir_are_fine():
    assert output_dir_error("/shared/runs/a", PACKAGE, {}) is None
    assert output_dir_error("outputs/x", Path("/home/me/gmai-rl"), {}) is None
    assert output_dir_error(f"{PACKAGE}_other/x", PACKAGE, {}) is None  # a sibling, not inside
