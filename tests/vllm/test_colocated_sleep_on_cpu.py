"""Colocated engines that sleep at level 2: the run wakes and refills them in the order a GPU needs.

A colocated vLLM engine shares its GPU with a learner rank: it sleeps while the learner trains
and, at level 2, drops its weights in the sleep. vLLM has no sleep mode on CPU, but the engine
keeps the same account there (rollout/vllm.py: asleep, weights dropped) and refuses what would
misbehave on a GPU: any call on a sleeping engine, a generate on dropped weights. The driver's
calls to the actors are recorded too, and held to the rest of the GPU's rules:

- every wake directly follows the learners' release of their cached memory;
- no learner trains while an engine is awake (they would share the GPU's memory);
- after a wake from a level-2 sleep, a push of every weight comes before any generate.

Whole runs (`gmai_rl.loop.run`): with SFT and without (then the first generate, the evaluation
before RL, finds the weights the sleep at start dropped), and one resumed from its checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_grpo_on_ray_with_vllm import text_overrides

from gmai_rl.cluster.actors import Actors
from gmai_rl.cluster.cluster import Cluster
from gmai_rl.loop import run
from support import TESTS_DIR, train_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
ray = pytest.importorskip("ray")

COLOCATED = (
    "cluster.colocate=true",
    "cluster.rollout_workers=1",
    "rollout.vllm.enable_sleep_mode=true",
    "rollout.vllm.sleep_level=2",
    "trainer.eval_every=1",
    "data.max_eval_items=4",
)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, ...]]:
    """The driver's calls to the actors, in order: (kind, method[, buckets pushed])."""
    recorded: list[tuple[str, ...]] = []
    fan_out, train, generate = Actors.calls, Cluster._training_calls, Cluster.generate

    def record_fan_out(self, kind, method, *args, **kwargs):
        buckets = (str(len(args[0])),) if method == "receive_weights" else ()
        recorded.append((kind, method, *buckets))
        return fan_out(self, kind, method, *args, **kwargs)

    def record_training(self, method, args):
        recorded.append(("learner rank", method))
        return train(self, method, args)

    def record_generate(self, prompts, n, sampling):
        groups = generate(self, prompts, n, sampling)  # its wake and push are recorded first
        recorded.append(("rollout worker", "generate"))
        return groups

    monkeypatch.setattr(Actors, "calls", record_fan_out)
    monkeypatch.setattr(Cluster, "_training_calls", record_training)
    monkeypatch.setattr(Cluster, "generate", record_generate)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))  # the workers import the length reward
    return recorded


def gpu_rule_breaks(calls: list[tuple[str, ...]], full_plan_buckets: int) -> list[str]:
    """Where the recorded calls break the colocated GPU's rules (module docstring)."""
    breaks, asleep, dropped, previous = [], False, False, None
    for i, call in enumerate(calls):
        method = call[1]
        if method == "sleep":
            asleep = dropped = True  # level 2
        elif method == "wake_up":
            if previous != "release_cached_memory":
                breaks.append(f"call {i}: a wake not right after the learners' release")
            asleep = False
        elif method in ("train_rl", "train_sft") and not asleep:
            breaks.append(f"call {i}: {method} while an engine is awake")
        elif method == "receive_weights":
            if asleep:
                breaks.append(f"call {i}: a push into a sleeping engine")
            elif int(call[2]) == full_plan_buckets:
                dropped = False
        elif method == "generate" and (asleep or dropped):
            breaks.append(
                f"call {i}: generate on {'a sleeping engine' if asleep else 'dropped weights'}"
            )
        previous = method
    return breaks


def colocated_config(model_dir, data_dir, out_dir, *overrides: str):
    """test_grpo_on_ray_with_vllm's text-only run, colocated, with `overrides` replacing its
    settings of the same keys."""
    keys = {o.split("=", 1)[0] for o in (*COLOCATED, *overrides)}
    base = [
        o for o in text_overrides(model_dir, data_dir, out_dir) if o.split("=", 1)[0] not in keys
    ]
    return train_config(*base, *COLOCATED, *overrides)


def run_and_check(cfg, calls) -> dict[str, Any]:
    result = run(cfg)
    pushes = [int(c[2]) for c in calls if c[1] == "receive_weights"]
    assert pushes, calls
    # The run's largest push is a whole one (every weight; the first push is whole).
    assert gpu_rule_breaks(calls, max(pushes)) == [], calls
    return result


@pytest.mark.parametrize("sft", [True, False])
def test_a_colocated_run_wakes_and_refills_its_engines_in_the_order_a_gpu_needs(
    calls, text_model_dir, text_mcq_dir, tmp_path, sft
):
    cfg = colocated_config(
        text_model_dir,
        text_mcq_dir,
        tmp_path,
        "trainer.steps=2",
        f"sft.enabled={sft}",
        "sft.steps=1",
    )
    result = run_and_check(cfg, calls)
    assert [e["step"] for e in result["during_rl"]] == [1] and result["after_rl"]["n"] == 4
    methods = [c[1] for c in calls]
    assert methods.count("wake_up") >= 3  # the first generate, and after each step's training
    if not sft:  # the evaluation before RL: the start's sleep dropped the weights
        first_generate = methods.index("generate")
        assert "receive_weights" in methods[:first_generate]


def test_a_resumed_colocated_run_wakes_its_engines_before_restoring_their_weights(
    calls, text_model_dir, text_mcq_dir, tmp_path
):
    run(colocated_config(text_model_dir, text_mcq_dir, tmp_path, "trainer.steps=1"))
    calls.clear()
    cfg = colocated_config(
        text_model_dir, text_mcq_dir, tmp_path, "trainer.steps=2", "trainer.resume=auto"
    )
    result = run_and_check(cfg, calls)
    methods = [c[1] for c in calls]
    assert "load_state" in methods and result["after_rl"]["n"] == 4
    # The restoring push wakes the engines (the start put them to sleep) before it loads them.
    assert methods.index("wake_up") < methods.index("receive_weights")
