"""Placement-group bundle layout and work splitting (pure), and what the cluster decides from
the config without Ray."""

import pytest

from gmai_rl.cluster.cluster import Cluster
from gmai_rl.cluster.placement import contiguous_shares, plan_bundles, sync_backend
from gmai_rl.cluster.recovery import RestartLimit
from gmai_rl.cluster.weight_sync import WeightSync
from gmai_rl.config import ClusterConfig
from support import train_config


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


@pytest.mark.parametrize(
    ("overrides", "sleeps"),
    [
        (["rollout=vllm", "rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true"], True),
        (["rollout=vllm", "rollout.vllm.enable_sleep_mode=true"], False),  # own GPUs: keep them
        (["rollout=vllm", "cluster.colocate=true"], False),  # sleep mode off
        (["cluster.colocate=true"], False),  # HF engines have no sleep mode
    ],
)
def test_only_colocated_vllm_engines_with_sleep_mode_sleep_during_training(overrides, sleeps):
    assert Cluster(train_config(*overrides), None).rollouts_sleep is sleeps


def test_work_is_cut_into_contiguous_shares_in_worker_order():
    assert contiguous_shares(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert contiguous_shares([1, 2], 3) == [[1], [2], []]


def test_frozen_parameters_travel_with_the_first_push_only():
    sync = WeightSync(train_config(), None)
    sync.full_plan, sync.trainable_plan = ["full"], ["trainable"]
    assert sync.plan() == ["full"]
    sync.frozen_pushed = True  # what a successful push records
    assert sync.plan() == ["trainable"]


def test_engines_that_drop_their_weights_in_sleep_get_every_push_whole():
    sleeping = [
        "rollout=vllm",
        "cluster.colocate=true",
        "rollout.vllm.enable_sleep_mode=true",
        "rollout.vllm.sleep_level=2",
    ]
    cluster = Cluster(train_config(*sleeping), None)
    cluster.sync.full_plan, cluster.sync.trainable_plan = ["full"], ["trainable"]
    cluster.sync.frozen_pushed = True
    assert cluster.sync.plan() == ["full"]


def test_the_restart_limit_counts_replacements_within_a_sliding_window():
    limit = RestartLimit(max_restarts=2, window_s=100.0)
    assert limit.allow(0.0) and limit.allow(10.0)
    assert not limit.allow(50.0)  # a third within 100 s of the first two
    assert limit.allow(100.5)  # the first has left the window
    assert not limit.allow(105.0)
    assert not RestartLimit(max_restarts=0, window_s=1.0).allow(0.0)
