"""A LoRA run on a local Ray cluster: only the adapters travel, and the rollout workers sample with
the log-probs the learners score.

Real components (Ray actors, a 2-rank ZeRO-2 engine on gloo, HF generate, the gloo weight-sync
group) on the tiny model with `model.lora.enabled`, driven by the run's own step.
"""

import os

import pytest

from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.sync.weights import checksums
from support import LENGTH_REWARD, KillWhen, one_step, running_cluster, titled

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def trainer(small_config, tmp_path_factory):
    cfg = small_config(
        tmp_path_factory.mktemp("run"),
        f"reward.fn={LENGTH_REWARD}",
        "algo.accuracy_filter=false",
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "optim.lr=2e-2",
    )
    with running_cluster(cfg) as cluster:
        yield cfg, cluster


def adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_only_adapters_are_pushed_from_the_first_push(trainer):
    _, cluster = trainer
    plan = {s.name: s for b in cluster.sync.full_plan for s in b.specs}
    assert plan and all(adapter(name) for name in plan)
    assert cluster.sync.plan() == cluster.sync.trainable_plan == cluster.sync.full_plan
    weights = cluster.learner_weights()
    assert set(plan) == {name for name in weights if adapter(name)}
    pushed = sum(s.numel for s in plan.values())
    assert pushed < sum(t.numel() for t in weights.values()) / 10


def test_the_workers_sample_with_the_log_probs_the_learners_score(trainer):
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=0)
    before = cluster.learner_weights()
    for _ in range(3):
        record = one_step(cluster, sampler, cfg)  # sync.verify: every pushed tensor checked
        # The learners' log-probs at the step's start against the rollout engine's, token by
        # token: the workers generated with the adapters the learners held.
        assert record.train_metrics["logprob_diff_max"] < 1e-4
        assert cluster.rollout_checksums() == [learner_adapters(cluster)] * len(cluster.rollouts)
    after = cluster.learner_weights()
    moved = {n for n in before if not (before[n] == after[n]).all()}
    assert moved and all(adapter(n) for n in moved)


def learner_adapters(cluster) -> dict[str, str]:
    weights = cluster.learner_weights().items()
    return checksums((name, t) for name, t in weights if adapter(name))


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


@pytest.mark.faults
def test_a_worker_replaced_while_the_learners_train_gets_the_current_adapters(trainer):
    """SIGKILLed mid-run, once the adapters have moved: its replacement loads the base and the
    adapters of the push that follows, and samples with the learners' log-probs."""
    cfg, cluster = trainer
    sampler = ItemSampler(load_datasets(cfg).train, seed=1)
    one_step(cluster, sampler, cfg)
    replaced, restarts = cluster.rollouts[1], cluster.rollout_restarts
    watched = [pid_of(a) for a in (*cluster.rollouts, *cluster.learners)]
    with KillWhen(watched[1], watched, titled("Learner.train_rl")) as killer:
        one_step(cluster, sampler, cfg)
    assert killer.killed_at is not None, "the moment never came: nothing was killed"
    assert cluster.rollouts[1] is not replaced and cluster.rollout_restarts == restarts + 1
    assert cluster.rollout_checksums() == [learner_adapters(cluster)] * len(cluster.rollouts)
    record = one_step(cluster, sampler, cfg)
    assert {g.policy_version for g in record.groups} == {cluster.policy_version() - 1}
    assert record.train_metrics["logprob_diff_max"] < 1e-4
