"""One spec per rollout engine: every backend has one, the built-in specs answer what the config,
plan and cluster used to work out with `Backend` branches, and an engine registered here, in a
test, is made, validated, planned and put to sleep through its spec alone, with no line of the
config, plan or rollout worker naming it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from gmai_rl.config import RolloutConfig, TrainConfig
from gmai_rl.config_checks import validate
from gmai_rl.models.loading import ModelOptions
from gmai_rl.plan import Hardware, ModelFacts, ParamCounts, check, make_plan, render
from gmai_rl.rollout.engines import ENGINES, engine_spec, register
from gmai_rl.rollout.options import Backend, VLLMOptions
from gmai_rl.rollout.sizing import GIB, EnginePlan, ModelShape
from gmai_rl.rollout.spec import EngineInputs, EngineSpec, RolloutRun, Sleep
from gmai_rl.rollout.worker import RolloutWorker
from gmai_rl.types import Group, Prompt, SamplingParams
from support import train_config

# ------------------------------------------------------------------------------- registry


def test_every_backend_has_a_spec_under_its_name():
    for backend in Backend:
        assert engine_spec(backend).name == backend
        assert engine_spec(str(backend)) is engine_spec(backend)  # the config's str works too


def test_an_unknown_backend_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown rollout backend 'sglang'; registered: hf, vllm"):
        engine_spec("sglang")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'vllm' is registered already"):
        register(dataclasses.replace(engine_spec(Backend.vllm), label="another vLLM"))


def test_an_engines_options_are_a_section_of_the_rollout_config():
    """What `make` receives under `options_key` is the config's section of that name, typed."""
    fields = {f.name: f for f in dataclasses.fields(RolloutConfig)}
    rollout = TrainConfig().rollout
    for spec in ENGINES.values():
        kwargs = spec.engine_kwargs(rollout)
        if spec.options_key is None:
            assert kwargs == {}
            continue
        assert spec.options_key in fields, f"RolloutConfig has no section {spec.options_key!r}"
        assert isinstance(kwargs[spec.options_key], spec.options_type)
        assert kwargs[spec.options_key] is getattr(rollout, spec.options_key)
    assert engine_spec(Backend.vllm).options_type is VLLMOptions


def test_options_key_and_type_go_together():
    with pytest.raises(ValueError, match="go together"):
        EngineSpec(name="x", label="X", make=FakeEngine, plan=fake_plan, options_key="x")


def test_importing_the_specs_loads_no_engine_and_no_framework():
    """Config and plan ask the specs at start-up, in the driver: the engines (and torch,
    transformers, vLLM, Ray) load only in the rollout workers, through `make`."""
    code = (
        "import sys, gmai_rl.config, gmai_rl.config_checks, gmai_rl.rollout.engines\n"
        "heavy = ('torch', 'transformers', 'vllm', 'ray', 'gmai_rl.rollout.hf',"
        " 'gmai_rl.rollout.vllm')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


# ------------------------------------------------------------------ the built-in engines


@pytest.mark.parametrize(
    ("overrides", "sleeps", "discards"),
    [
        (["rollout=vllm", "rollout.vllm.enable_sleep_mode=true", "cluster.colocate=true"], 1, 0),
        (
            [
                "rollout=vllm",
                "rollout.vllm.enable_sleep_mode=true",
                "rollout.vllm.sleep_level=2",
                "cluster.colocate=true",
            ],
            1,
            1,
        ),
        (
            ["rollout=vllm", "rollout.vllm.enable_sleep_mode=true", "rollout.vllm.sleep_level=2"],
            0,
            0,
        ),
        (["rollout=vllm", "cluster.colocate=true", "rollout.vllm.sleep_level=2"], 0, 0),
        (["cluster.colocate=true"], 0, 0),  # HF engines have no sleep mode
    ],
)
def test_only_colocated_vllm_engines_with_sleep_mode_sleep_and_level_2_loses_the_weights(
    overrides, sleeps, discards
):
    cfg = train_config(*overrides)
    spec = engine_spec(cfg.rollout.backend)
    assert spec.sleeps(cfg) is bool(sleeps)
    assert spec.sleep_discards_weights(cfg) is bool(discards)


def test_vllm_engines_receive_weights_in_their_own_workers_and_hf_in_the_rollout_worker():
    assert engine_spec(Backend.vllm).sync_in_engine
    assert not engine_spec(Backend.hf).sync_in_engine


def test_only_vllm_has_a_fixed_window_and_it_is_max_model_len():
    cfg = train_config("rollout=vllm", "rollout.vllm.max_model_len=1234")
    assert engine_spec(Backend.vllm).window(cfg) == 1234
    assert engine_spec(Backend.vllm).window_key == "rollout.vllm.max_model_len"
    assert engine_spec(Backend.hf).window(train_config()) is None


SHAPE = ModelShape(params=1000, layers=2, kv_heads=2, head_dim=8, vocab=64)


def test_vllm_on_cpu_sizes_its_kv_cache_as_vllm_cpu_is_told():
    spec, cfg = engine_spec(Backend.vllm), train_config("rollout=vllm")
    sized = spec.plan(EngineInputs(cfg, SHAPE, gpu_memory=None, longest=100))
    assert sized.kv_cache == 256 * 2**20  # VLLM_CPU_KV_MIB, what vllm_requests.engine_args sets
    assert sized.kv_tokens == sized.kv_cache // sized.kv_per_token
    assert sized.problems == ()


# -------------------------------------------------------- an engine registered in a test


class FakeEngine:
    """Answers every prompt with an empty group, and records how it was made."""

    def __init__(self, model: ModelOptions, device: str, seed: int) -> None:
        self.made_with = (model.path, device, seed)
        self.policy_version = 0
        self.asleep = False

    def generate(self, prompts, n, sampling) -> list[Group]:
        return [Group(p, [1, 2], [], self.policy_version) for p in prompts]

    def load_weights(self, weights) -> int:
        return len(list(weights))

    def named_weights(self):
        return iter(())

    def sleep(self) -> None:
        self.asleep = True


def fake_plan(inputs: EngineInputs) -> EnginePlan:
    """One byte per parameter, 1 GiB more per GPU; too big for a GPU of under 2 GiB."""
    weights = float(inputs.model.params)
    reserved = weights + (GIB if inputs.on_gpu else 0.0)
    g = inputs.gpu_memory
    return EnginePlan(
        weights=weights,
        kv_per_token=1,
        kv_cache=None,
        scores=0.0,
        reserved=reserved,
        asleep_on_host=0.0,
        lines=(f"rollout    the fake engine: {reserved:.0f} bytes",),
        problems=(
            ("the fake engine needs 2 GiB",)
            if inputs.on_gpu and g is not None and g < 2 * GIB
            else ()
        ),
        notes=("the fake engine was sized by its spec",),
    )


def fake_errors(run: RolloutRun) -> list[str]:
    return ["rollout.backend=fake cannot colocate"] if run.cluster.colocate else []


def fake_sleep(run: RolloutRun) -> Sleep:
    return Sleep.drops_weights if run.cluster.colocate else Sleep.never


FAKE = EngineSpec(
    name="fake",
    label="Fake",
    make=FakeEngine,
    plan=fake_plan,
    validate=fake_errors,
    window=lambda run: 4096,
    window_key="rollout.fake_window",
    sleep_mode=fake_sleep,
)

SHAPE_FACTS = ModelFacts(
    architecture="Fake",
    params=ParamCounts(total=1000, trainable=1000, vision=0, largest_layer=100),
    layers=2,
    kv_heads=2,
    head_dim=8,
    vocab=64,
    max_positions=8192,
    patch_size=None,
    merge_size=None,
    max_pixels=None,
    source="a test",
)


@pytest.fixture
def fake_engine():
    register(FAKE)
    try:
        yield FAKE
    finally:
        ENGINES.pop("fake")


def fake_config(*overrides: str) -> TrainConfig:
    cfg = train_config(*overrides)
    cfg.rollout.backend = "fake"  # past hydra's choice check: no Backend member names it
    return cfg


def test_a_registered_engine_is_validated_through_its_spec(fake_engine):
    validate(fake_config())
    with pytest.raises(ValueError, match=r"rollout\.backend=fake cannot colocate"):
        validate(fake_config("cluster.colocate=true"))


def test_a_registered_engine_is_planned_through_its_spec(fake_engine):
    cfg = fake_config()
    hw = Hardware(8, 1 * GIB, "a 1 GiB GPU", single_node=True, host_memory=1024 * GIB)
    plan = make_plan(cfg, SHAPE_FACTS, hw)
    assert plan.engine.reserved == 1000.0  # CPU workers: its weights only
    workers, ranks = cfg.cluster.rollout_workers, cfg.cluster.learner_ranks
    # CPU learners: their states and the larger of a micro-batch's and a push's working set.
    working = max(
        sum(m.host for m in plan.working.values()), sum(m.host for m in plan.push.values())
    )
    assert working > 0
    assert plan.host_needed == ranks * (plan.learner_total.host + working) + workers * 1000.0
    assert plan.prompt.window == 4096
    text = render(plan)
    assert "rollout    the fake engine: 1000 bytes" in text
    assert "(rollout.fake_window 4096; the model has 8192 positions)" in text
    assert "note       the fake engine was sized by its spec" in text
    assert "the fake engine needs 2 GiB" not in check(plan)  # not on a GPU

    on_gpu = make_plan(fake_config("cluster.gpus_per_rollout_worker=1"), SHAPE_FACTS, hw)
    assert on_gpu.engine_device == 1000.0 + GIB
    assert "the fake engine needs 2 GiB" in check(on_gpu)


def rollout_worker(backend: str, seed: int = 0) -> RolloutWorker:
    """A worker in this process, leaving the test process's torch threads and RNG as they were
    (the worker sets both for its own process)."""
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            return RolloutWorker(backend, ModelOptions(path="unused"), device="cpu", seed=seed)
    finally:
        torch.set_num_threads(threads)


def test_a_registered_engine_is_made_by_the_rollout_worker_through_its_spec(fake_engine):
    worker = rollout_worker("fake", seed=7)
    assert isinstance(worker.engine, FakeEngine)
    assert worker.engine.made_with == ("unused", "cpu", 7)
    assert worker.sync_members() == 1 and worker.syncing is None  # it receives the weights
    (group,) = worker.generate([Prompt("p", [])], 2, SamplingParams())
    assert group.prompt_ids == [1, 2]
    worker.sleep()
    assert worker.engine.asleep


def test_a_spec_that_says_its_engine_syncs_itself_must_be_right(fake_engine):
    ENGINES["fake"] = dataclasses.replace(FAKE, sync_in_engine=True)
    with pytest.raises(TypeError, match="FakeEngine does not implement SyncingEngine"):
        rollout_worker("fake")


def test_a_registered_engine_sleeps_as_its_spec_says(fake_engine):
    assert not FAKE.sleeps(fake_config())
    colocated = fake_config("cluster.colocate=true")
    assert FAKE.sleeps(colocated) and FAKE.sleep_discards_weights(colocated)
