"""The distributed trainer on a local Ray cluster: rollout + reward + DeepSpeed learners + sync.

Real components throughout (Ray actors in a placement group, a 2-rank ZeRO-2 engine on gloo, HF
generate, the gloo weight-sync group) on the tiny offline model, driven by the run's own step
(`Pipeline.step`).
"""

import dataclasses
import math
import shutil

import pytest
import torch

from gmai_rl.data import build_prompt
from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.sync.weights import checksums
from gmai_rl.types import SamplingParams
from support import LENGTH_REWARD, one_step, running_cluster

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def trainer(small_config, tmp_path_factory):
    # A random model never answers in format: a user reward (loaded by dotted path in the reward
    # actor) varies instead.
    cfg = small_config(
        tmp_path_factory.mktemp("run"),
        f"reward.fn={LENGTH_REWARD}",
        "algo.accuracy_filter=false",
        "model.freeze_vision=true",
    )
    # The learner ranks check that they issue the same collectives (tests/integration/
    # test_zero3_on_ray.py): a mismatch fails at once instead of hanging.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
        with running_cluster(cfg) as cluster:
            yield cfg, cluster


def test_rollout_workers_start_with_the_learners_weights(trainer):
    _, cluster = trainer
    expected = checksums(cluster.learner_weights().items())
    assert len(expected) == sum(len(bucket.specs) for bucket in cluster.sync.full_plan)
    assert cluster.rollout_checksums() == [expected] * len(cluster.rollouts)


def test_training_steps_change_the_policy_and_every_worker_follows(trainer):
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    before = cluster.learner_weights()
    start_version = cluster.policy_version()
    for step in range(2):
        record = one_step(cluster, sampler, cfg)  # sync.verify: raises if any tensor differs
        assert len(record.groups) == cfg.algo.prompts_per_step
        assert {g.policy_version for g in record.groups} == {start_version + step}  # on-policy
        rewards = [r["total"] for g in record.groups for r in g.rewards]
        assert len(rewards) == 16 and all(math.isfinite(r) for r in rewards)
        assert math.isfinite(record.train_metrics["loss"])
        assert math.isfinite(record.train_metrics["grad_norm"])
        assert record.policy_version == start_version + step + 1
        assert set(record.timer.seconds) == {"generate", "reward", "train", "sync"}
        # Independently of verify mode: every worker's weights equal the learner's, bit for bit.
        expected = checksums(cluster.learner_weights().items())
        assert cluster.rollout_checksums() == [expected] * len(cluster.rollouts)
        assert cluster.policy_version() == record.policy_version
    after = cluster.learner_weights()
    trainable = {s.name for b in cluster.sync.trainable_plan for s in b.specs}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable and len(changed) > len(trainable) // 2


def test_frozen_parameters_leave_the_push_plan_after_the_first_push(trainer):
    _, cluster = trainer
    full = {s.name for b in cluster.sync.full_plan for s in b.specs}
    trainable = {s.name for b in cluster.sync.trainable_plan for s in b.specs}
    frozen = full - trainable
    assert frozen and all(".visual." in f or f.startswith("model.visual.") for f in frozen)
    # After the first push (the first RL step's), only trainable parameters travel; the
    # workers' frozen ones still equal the learner's (checked over the full plan above).
    assert cluster.sync.frozen_pushed and cluster.sync.plan() == cluster.sync.trainable_plan


def test_the_learner_ranks_check_their_collectives(trainer):
    _, cluster = trainer
    levels = ray.get(
        [
            r.__ray_call__.remote(
                lambda self: str(__import__("torch").distributed.get_debug_level())
            )
            for r in cluster.learners
        ]
    )
    assert levels == ["DebugLevel.DETAIL"] * len(cluster.learners)


def test_ranks_hold_identical_parameters_after_training(trainer):
    _, cluster = trainer
    per_rank = ray.get([learner.named_parameters.remote() for learner in cluster.learners])
    first = dict(per_rank[0])
    for other in per_rank[1:]:
        assert all(torch.equal(first[name], tensor) for name, tensor in other)


def test_a_prompt_whose_image_went_after_the_load_comes_back_dropped(trainer, tmp_path):
    """Through the actors: the worker answers a dropped group, the cluster passes it on as it is,
    and the other prompts (on both workers) generate."""
    cfg, cluster = trainer
    items = load_datasets(cfg).train[:4]
    gone = tmp_path / "gone.png"
    shutil.copy(items[1].images[0], gone)
    items[1] = dataclasses.replace(items[1], images=(str(gone),))
    gone.unlink()
    prompts = [build_prompt(item, cfg.data.system_prompt) for item in items]
    groups = cluster.generate(prompts, 2, SamplingParams(max_new_tokens=4))
    assert [g.prompt.id for g in groups] == [item.id for item in items]
    assert [g.dropped is not None for g in groups] == [False, True, False, False]
    assert (
        groups[1].dropped == f"missing_image: image not found: {gone}" and not groups[1].completions
    )
    assert all(len(g.completions) == 2 for g in groups if g.dropped is None)


def test_the_one_step_off_pipeline_trains_on_batches_one_push_old(trainer):
    """`algo.max_staleness=1` on the real actors: the next batch is generated (on the driver's
    second thread) while the learners train, by the policy pushed before; every worker ends with
    the learners' weights."""
    from gmai_rl.metrics import step_metrics
    from gmai_rl.pipeline import Pipeline

    cfg, cluster = trainer
    cfg = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, max_staleness=1))
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    version = cluster.version
    with Pipeline(cluster, sampler, cfg, steps=3) as pipeline:
        records = [step_metrics(step, pipeline.step(step)) for step in range(3)]
    assert [r["staleness_max"] for r in records] == [0, 1, 1]
    assert [r["policy_version"] for r in records] == [version + 1, version + 2, version + 3]
    assert all(r["time_wait_rollout_s"] >= 0 for r in records[:2])
    assert all(0 <= r["idle_ratio_learner"] <= 1 for r in records)
    learner = checksums(cluster.learner_weights().items())
    assert cluster.rollout_checksums() == [learner] * len(cluster.rollouts)
