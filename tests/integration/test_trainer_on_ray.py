"""The distributed trainer on a local Ray cluster: rollout + reward + DeepSpeed learners + sync.

Real components throughout (Ray actors in a placement group, a 2-rank ZeRO-2 engine on gloo, HF
generate, the gloo weight-sync group) on the tiny offline model.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from gmai_rl.cluster import init_ray, start_cluster
from gmai_rl.loop import (
    ItemSampler,
    StageTimer,
    collect_groups,
    load_datasets,
    make_train_samples,
    rollout_fn,
    sync_weights,
    train,
)
from gmai_rl.sync.weights import checksums

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def trainer(small_config, tmp_path_factory):
    # A random model never answers in format, so the MCQ rule would give every sample 0 and
    # GRPO no gradient: a user reward (loaded by dotted path in the reward actor) varies instead.
    cfg = small_config(
        tmp_path_factory.mktemp("run"),
        "reward.fn=rewards_for_tests:length_reward",
        "algo.accuracy_filter=false",
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)  # for the Ray workers
    init_ray(cfg)
    cluster = start_cluster(cfg)
    yield cfg, cluster
    cluster.shutdown()
    ray.shutdown()
    mp.undo()


def learner_weights(cluster):
    return dict(ray.get([learner.named_parameters.remote() for learner in cluster.learners])[0])


def test_rollout_workers_start_with_the_learners_weights(trainer):
    _, cluster = trainer
    expected = checksums(learner_weights(cluster).items())
    assert len(expected) == sum(len(bucket.specs) for bucket in cluster.sync_plan)
    for worker in cluster.rollouts:
        assert ray.get(worker.weight_checksums.remote(cluster.sync_plan)) == expected


def test_training_steps_change_the_policy_and_every_worker_follows(trainer):
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    before = learner_weights(cluster)
    start_version = ray.get(cluster.rollouts[0].get_policy_version.remote())
    for step in range(2):
        groups, _ = collect_groups(
            rollout_fn(cluster, cfg, StageTimer()), sampler, cfg.algo.prompts_per_step, cfg.algo
        )
        assert len(groups) == cfg.algo.prompts_per_step
        assert {g.policy_version for g in groups} == {start_version + step}  # on-policy
        rewards = [r["total"] for g in groups for r in g.rewards]
        assert len(rewards) == 16 and all(math.isfinite(r) for r in rewards)
        metrics = train(cluster, make_train_samples(groups, "grpo"), num_minibatches=1)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        version = sync_weights(cluster, verify=True)  # raises if any tensor differs
        assert version == start_version + step + 1
        # Independently of verify mode: every worker's weights equal the learner's, bit for bit.
        expected = checksums(learner_weights(cluster).items())
        for worker in cluster.rollouts:
            assert ray.get(worker.weight_checksums.remote(cluster.sync_plan)) == expected
            assert ray.get(worker.get_policy_version.remote()) == version
    after = learner_weights(cluster)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2


def test_ranks_hold_identical_parameters_after_training(trainer):
    _, cluster = trainer
    per_rank = ray.get([learner.named_parameters.remote() for learner in cluster.learners])
    first = dict(per_rank[0])
    for other in per_rank[1:]:
        assert all(torch.equal(first[name], tensor) for name, tensor in other)
