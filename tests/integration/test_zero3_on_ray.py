"""ZeRO-3 learners held to the GPU's rule on collectives: every rank issues the same ones.

Under ZeRO-3 each parameter is gathered from every rank when a module runs, and every rank must
enter each gather, all-reduce and broadcast in the same order: on GPUs a rank that skips one
leaves the others waiting until NCCL's timeout, and gathers that pair up wrongly corrupt
parameters. The learner ranks here run with `TORCH_DISTRIBUTED_DEBUG=DETAIL` (the driver's
setting travels to the actors: `cluster.environment.FORWARDED`), under which torch checks before
each collective that all ranks issue the same one (op, shapes, dtypes) and fails at once, naming
each rank's, where the job would hang. Through it: a whole run (SFT, RL steps on image prompts,
evaluations, checkpoints) and its resumption, and a weight push that a rollout worker dies in
(rank 0's broadcasts stop; every rank must still walk the plan's gathers).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_faults_on_ray import report, step_with_a_kill_in_the_push

from gmai_rl.feed import ItemSampler, load_datasets
from gmai_rl.loop import run
from support import LENGTH_REWARD, TESTS_DIR, one_step, running_cluster

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1800)]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def zero3_config(small_config, tmp_path_factory):
    def build(out_dir, *overrides):
        return small_config(
            out_dir,
            "learner.zero_stage=3",
            "cluster.rollout_workers=2",
            f"reward.fn={LENGTH_REWARD}",
            "algo.accuracy_filter=false",
            *overrides,
        )

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
        env.setenv("PYTHONPATH", str(TESTS_DIR), prepend=os.pathsep)  # the length reward
        yield build


def test_a_zero3_run_and_its_resumption_keep_every_rank_in_step(zero3_config, tmp_path):
    steps = ("sft.steps=2", "trainer.eval_every=1", "data.max_eval_items=8", "trainer.save_every=1")
    run(zero3_config(tmp_path, "trainer.steps=2", *steps))
    run(zero3_config(tmp_path, "trainer.steps=3", "trainer.resume=auto", *steps))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["stage"] == "rl"] == [0, 1, 2]
    assert [r["resumed_step"] for r in lines if "resumed_from" in r] == [2]


def test_a_lora_run_resumed_mid_way_ends_with_the_uninterrupted_runs_adapters(
    zero3_config, tmp_path
):
    """LoRA under ZeRO-3 (adapters partitioned like the base, the KL reference a copy of them
    per rank) through SFT, RL, checkpoints and a resumption: bit for bit the same adapters."""
    lora = ("model.lora.enabled=true", "model.lora.rank=4", "sft.steps=2", "trainer.save_every=1")
    lora += ("trainer.eval_every=0", "data.max_eval_items=8")
    run(zero3_config(tmp_path / "whole", "trainer.steps=3", *lora))
    run(zero3_config(tmp_path / "resumed", "trainer.steps=2", *lora))
    run(zero3_config(tmp_path / "resumed", "trainer.steps=3", "trainer.resume=auto", *lora))
    whole, resumed = (
        load_file(tmp_path / run_dir / "final" / "adapter_model.safetensors")
        for run_dir in ("whole", "resumed")
    )
    assert whole.keys() == resumed.keys() and len(whole) > 0
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.fixture(scope="module")
def zero3_trainer(zero3_config, tmp_path_factory):
    cfg = zero3_config(tmp_path_factory.mktemp("run"), "sync.timeout_s=600")
    with running_cluster(cfg) as cluster:
        sampler = ItemSampler(load_datasets(cfg).train, seed=0)
        one_step(cluster, sampler, cfg)
        yield cfg, cluster, sampler


def test_a_push_a_rollout_worker_dies_in_leaves_the_zero3_ranks_in_step(zero3_trainer):
    cfg, cluster, sampler = zero3_trainer
    report("during a ZeRO-3 weight push", step_with_a_kill_in_the_push(cfg, cluster, sampler))
    one_step(cluster, sampler, cfg)  # the ranks train and push together again
    first, second = ray.get([r.named_parameters.remote() for r in cluster.learners])
    assert [n for n, _ in first] == [n for n, _ in second]
    assert all(a.equal(b) for (_, a), (_, b) in zip(first, second, strict=True))


def test_under_detail_ranks_that_issue_different_collectives_fail_at_once(zero3_trainer):
    """The rule itself, on the learner ranks' own process group: rank 0 all-reduces while rank 1
    broadcasts. Without DETAIL this would wait out the group's timeout (30 min for gloo)."""
    _, cluster, _ = zero3_trainer

    def level(self):
        import torch.distributed as dist

        return str(dist.get_debug_level())

    def collective(self):
        import torch
        import torch.distributed as dist

        tensor = torch.ones(3)
        try:
            dist.all_reduce(tensor) if self.rank == 0 else dist.broadcast(tensor, 0)
        except RuntimeError as err:
            return str(err)
        return "no error"

    assert (
        ray.get([r.__ray_call__.remote(level) for r in cluster.learners])
        == ["DebugLevel.DETAIL"] * 2
    )
    errors = ray.get([r.__ray_call__.remote(collective) for r in cluster.learners], timeout=120)
    assert all("Detected mismatch between collectives on ranks" in e for e in errors), errors
    assert "OpType=ALLREDUCE" in errors[0] and "OpType=BROADCAST" in errors[1]
