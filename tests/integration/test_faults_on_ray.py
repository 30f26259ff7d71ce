"""Faults injected into a running trainer on a local Ray cluster (the faults tier, `make
test-faults`). One cluster for the module, faults in order, each followed by a full RL step:

1. a rollout worker's process SIGKILLed (as a pre-emption or the kernel's OOM killer would):
   replaced, its prompts generated again, none lost or repeated, the policy version kept;
   killed before a weight push instead: the push's other members leave the broken collective,
   the replacement gets the new weights with the others, checked, and the new policy version;
2. a reward worker's process exiting mid-batch: replaced, its batch scored again;
3. a reward function that hangs: cut by `reward.timeout_s`, the worker replaced, its batch's
   completions counted as failed;
4. a stalled rollout worker (generate, weight sync) or learner rank (train): the stage stops
   within `cluster.call_timeout_s`, naming the stage and the actor (a stalled reward worker is
   case 3);
5. a learner rank killed: the training stage stops at once, naming it;
6. one death more than `cluster.max_restarts` (4) allows: the run stops, naming the limit.

7. a NaN advantage in one sample (one rank's loss NaN): the step skipped on every rank and
   counted, then learner.max_skipped_steps (3) such steps in a row stop training.

The same NaN fault under ZeRO-0, -2 and -3, with the parameters compared across ranks:
tests/integration/test_learner_numerics.py::test_a_nan_on_one_rank_skips_the_step_on_every_rank.
"""

import os
import signal
import time

import pytest

from gmai_rl.cluster.errors import ActorDiedError, StageTimeoutError
from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.learner.rank_metrics import NonFiniteTrainingError
from gmai_rl.loop import make_train_samples, rl_step, rollout_fn
from gmai_rl.metrics import StageTimer, step_metrics
from gmai_rl.sync.weights import checksums
from gmai_rl.types import SamplingParams
from support import FAULTS_DIR_ENV, FAULTY_REWARD, running_cluster

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1200)]
ray = pytest.importorskip("ray")

REWARD_TIMEOUT_S = 15
SYNC_TIMEOUT_S = 20  # how long the push's survivors wait on a dead member (sync.timeout_s)
CALL_TIMEOUT_S = 5  # cluster.call_timeout_s while a stall is injected
STALL_S = 30


@pytest.fixture(scope="module")
def faults_dir(tmp_path_factory):
    """Where a test drops "die" / "hang" for the reward function (support.FAULTY_REWARD)."""
    folder = tmp_path_factory.mktemp("faults")
    os.environ[FAULTS_DIR_ENV] = str(folder)  # before Ray starts: its workers inherit it
    yield folder
    del os.environ[FAULTS_DIR_ENV]


@pytest.fixture(scope="module")
def trainer(small_config, tmp_path_factory, faults_dir):
    cfg = small_config(
        tmp_path_factory.mktemp("run"),
        "cluster.rollout_workers=2",
        "reward.num_workers=2",
        f"reward.fn={FAULTY_REWARD}",  # length reward: a random model never answers in format
        f"reward.timeout_s={REWARD_TIMEOUT_S}",
        "algo.accuracy_filter=false",
        f"sync.timeout_s={SYNC_TIMEOUT_S}",
        "cluster.max_restarts=4",
    )
    with running_cluster(cfg) as cluster:
        sampler = ItemSampler(load_datasets(cfg).train, seed=0)
        first = rl_step(cluster, sampler, cfg)
        assert step_metrics(0, first)["rollout_restarts"] == 0
        yield cfg, cluster, sampler


def kill_process_of(actor) -> int:
    """SIGKILL the actor's process (no clean-up runs, as with a pre-emption); its pid."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    return pid


def next_prompts(sampler, k):
    """The ids the sampler's next `k` draws will be, without drawing them."""
    twin = ItemSampler(sampler.items, seed=0)
    twin.load_state(sampler.state())
    return [item.id for item in twin.take(k)]


def step_with_all_prompts(cfg, cluster, sampler):
    """One RL step; checks that it trained on exactly the prompts the sampler drew, in order,
    each with all its samples scored, and that every worker holds the learner's weights."""
    expected = next_prompts(sampler, cfg.algo.prompts_per_step)
    version = cluster.version  # the driver's count: asking the workers would meet the dead one
    record = rl_step(cluster, sampler, cfg)
    assert [g.prompt.id for g in record.groups] == expected
    for g in record.groups:
        assert len(g.completions) == len(g.rewards) == cfg.rollout.samples_per_prompt
    assert {g.policy_version for g in record.groups} == {version}
    # One push per step, as without a fault.
    assert record.policy_version == version + 1 == cluster.policy_version()
    learner = checksums(cluster.learner_weights().items())
    assert cluster.rollout_checksums() == [learner] * len(cluster.rollouts)
    return step_metrics(0, record)


def test_a_killed_rollout_worker_is_replaced_and_its_prompts_generated_again(trainer):
    cfg, cluster, sampler = trainer
    replaced = cluster.rollouts[1]
    kill_process_of(replaced)
    metrics = step_with_all_prompts(cfg, cluster, sampler)
    assert metrics["rollout_restarts"] == 1 and metrics["reward_restarts"] == 0
    assert cluster.rollouts[1] is not replaced and cluster.sync.generation == 1


def test_a_rollout_worker_that_dies_at_the_weight_push_is_replaced_with_the_new_weights(trainer):
    cfg, cluster, sampler = trainer
    groups = rollout_fn(cluster, cfg, StageTimer())(sampler.take(cfg.algo.prompts_per_step))
    cluster.train(make_train_samples(groups, "grpo"), 1)
    version, replaced = cluster.version, cluster.rollouts[0]
    kill_process_of(replaced)
    started = time.monotonic()
    assert cluster.sync_weights(cfg.sync.verify) == version + 1
    recovered_s = time.monotonic() - started
    print(f"weight push with a dead rollout worker: recovered in {recovered_s:.1f} s")
    assert cluster.rollouts[0] is not replaced and cluster.rollout_restarts == 2
    assert cluster.sync.generation == 2
    learner = checksums(cluster.learner_weights().items())
    assert cluster.rollout_checksums() == [learner] * len(cluster.rollouts)
    assert cluster.policy_version() == version + 1
    # The survivor left the broken broadcast at its own deadline, not the driver's.
    assert recovered_s < cfg.cluster.call_timeout_s
    step_with_all_prompts(cfg, cluster, sampler)  # and training goes on


def test_a_reward_worker_that_dies_mid_batch_is_replaced_and_the_batch_scored_again(
    trainer, faults_dir
):
    cfg, cluster, sampler = trainer
    (faults_dir / "die").touch()
    metrics = step_with_all_prompts(cfg, cluster, sampler)
    assert (faults_dir / "die.claimed").exists()
    assert metrics["reward_restarts"] == 1 and metrics["reward_failures"] == 0


def test_a_hanging_reward_function_is_cut_and_its_batch_counted_as_failed(trainer, faults_dir):
    cfg, cluster, sampler = trainer
    (faults_dir / "hang").touch()
    metrics = step_with_all_prompts(cfg, cluster, sampler)
    assert metrics["reward_restarts"] == 1
    # One of the two workers' halves of the 4 x 4 completions: scored 0 and counted.
    assert metrics["reward_failures"] == 8
    assert metrics["time_reward_s"] >= REWARD_TIMEOUT_S


def stall(actor, seconds):
    """Keep the actor busy for `seconds` (an actor runs one call at a time): a stalled worker."""
    return actor.__ray_call__.remote(lambda self: time.sleep(seconds))


def wait_until_idle(cluster):
    """Every actor has finished what was queued on it (a ping runs after it)."""
    actors = cluster.learners + cluster.rollouts
    ray.get([a.__ray_call__.remote(lambda self: None) for a in actors], timeout=300)


@pytest.mark.parametrize("stage", ["generate", "train", "weight sync"])
def test_a_stalled_stage_stops_within_the_call_timeout_naming_stage_and_actor(trainer, stage):
    cfg, cluster, sampler = trainer
    items = sampler.take(cfg.algo.prompts_per_step)
    groups = rollout_fn(cluster, cfg, StageTimer())(items)
    actor, name = (
        (cluster.learners[1], "learner rank 1")
        if stage == "train"
        else (cluster.rollouts[1], "rollout worker 1")
    )
    busy = stall(actor, STALL_S)
    cluster.timeout_s = CALL_TIMEOUT_S
    started = time.monotonic()
    try:
        with pytest.raises(StageTimeoutError) as stopped:
            if stage == "generate":
                cluster.generate([g.prompt for g in groups], 2, SamplingParams(max_new_tokens=4))
            elif stage == "train":
                cluster.train(make_train_samples(groups, "grpo"), 1)
            else:
                cluster.sync_weights(cfg.sync.verify)
        waited = time.monotonic() - started
    finally:
        cluster.timeout_s = cfg.cluster.call_timeout_s
        ray.get(busy)  # the stall ends; the calls queued behind it then run to completion
        wait_until_idle(cluster)  # a push's members leave it by sync.timeout_s at the latest
    assert f"{stage}: no answer from" in str(stopped.value) and name in str(stopped.value)
    assert f"within {CALL_TIMEOUT_S:g} s" in str(stopped.value)
    assert CALL_TIMEOUT_S <= waited < STALL_S  # bounded by the timeout, not by the stall


def test_nan_losses_skip_the_step_on_every_rank_and_too_many_in_a_row_stop(trainer):
    cfg, cluster, sampler = trainer
    groups = rollout_fn(cluster, cfg, StageTimer())(sampler.take(cfg.algo.prompts_per_step))
    samples = make_train_samples(groups, "grpo")
    samples[-1].advantage = float("nan")  # one rank's loss turns NaN, the others' stay finite
    before = checksums(cluster.learner_weights().items())
    for in_a_row in (1, 2):
        metrics = cluster.train(samples, 1)
        assert (metrics["skipped_steps"], metrics["optim_steps"]) == (1, 0), in_a_row
        assert checksums(cluster.learner_weights().items()) == before  # nothing stepped
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row"):
        cluster.train(samples, 1)


def test_a_learner_rank_that_dies_in_training_stops_the_stage_at_once_naming_it(trainer):
    # Rank 0 waits for rank 1 inside a collective and would until the process group's own
    # timeout; the driver does not wait with it. (The run then resumes from its last
    # checkpoint: tests/job/test_resume.py.)
    cfg, cluster, sampler = trainer
    groups = rollout_fn(cluster, cfg, StageTimer())(sampler.take(cfg.algo.prompts_per_step))
    kill_process_of(cluster.learners[1])
    started = time.monotonic()
    with pytest.raises(ActorDiedError, match="train: learner rank 1 died"):
        cluster.train(make_train_samples(groups, "grpo"), 1)
    assert time.monotonic() - started < CALL_TIMEOUT_S  # far below cluster.call_timeout_s


def test_a_death_past_the_restart_limit_stops_the_run_naming_it(trainer):
    cfg, cluster, sampler = trainer  # four replacements so far: the limit
    kill_process_of(cluster.rollouts[0])
    with pytest.raises(ActorDiedError) as stopped:
        rl_step(cluster, sampler, cfg)
    message = str(stopped.value)
    assert "generate: rollout worker 0 died" in message
    assert "cluster.max_restarts=4" in message
