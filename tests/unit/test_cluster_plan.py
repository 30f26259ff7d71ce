"""Placement-group bundle layout (pure)."""

import pytest

from gmai_rl.cluster import plan_bundles, sync_backend
from gmai_rl.config import ClusterConfig


def test_separate_placement_gives_each_actor_its_bundle():
    plan = plan_bundles(
        ClusterConfig(
            learner_ranks=2,
            rollout_workers=3,
            gpus_per_learner=1,
            gpus_per_rollout_worker=1,
            cpus_per_actor=4,
        )
    )
    assert plan.bundles == [{"CPU": 4, "GPU": 1}] * 5
    assert plan.learner_bundles == [0, 1]
    assert plan.rollout_bundles == [2, 3, 4]
    assert plan.learner_resources == {"CPU": 4, "GPU": 1}


def test_cpu_bundles_ask_for_no_gpu():
    plan = plan_bundles(ClusterConfig(learner_ranks=2, rollout_workers=2))
    assert plan.bundles == [{"CPU": 1}] * 4
    assert sync_backend(ClusterConfig()) == "gloo"


def test_colocated_actors_split_a_shared_bundle():
    plan = plan_bundles(
        ClusterConfig(
            learner_ranks=2,
            rollout_workers=2,
            gpus_per_learner=1,
            gpus_per_rollout_worker=1,
            cpus_per_actor=2,
            colocate=True,
        )
    )
    assert plan.bundles == [{"CPU": 2, "GPU": 1}] * 2
    assert plan.learner_bundles == plan.rollout_bundles == [0, 1]
    assert plan.learner_resources == plan.rollout_resources == {"CPU": 1, "GPU": 0.5}
    assert sync_backend(ClusterConfig(gpus_per_learner=1, gpus_per_rollout_worker=1)) == "nccl"


def test_colocation_needs_one_worker_per_rank():
    with pytest.raises(ValueError, match="rollout_workers"):
        plan_bundles(ClusterConfig(learner_ranks=2, rollout_workers=3, colocate=True))
