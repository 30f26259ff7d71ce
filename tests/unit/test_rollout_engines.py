"""One spec per rollout engine: every backend has one, and the built-in specs answer what the
config, plan and cluster work out with `Backend` branches."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gmai_rl.config import RolloutConfig, TrainConfig
from gmai_rl.rollout.engines import ENGINES, engine_spec, register
from gmai_rl.rollout.options import Backend, VLLMOptions
from gmai_rl.rollout.sizing import ModelShape
from gmai_rl.rollout.spec import EngineInputs, EngineSpec
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
        EngineSpec(name="x", label="X", make=dict, plan=print, options_key="x")  # type: ignore


def test_importing_the_specs_loads_no_engine_and_no_framework():
    """Config and plan ask the specs at start-up, in the driver: the engines (and torch,
    transformers, vLLM, Ray) load only in the rollout workers, through `make`."""
    code = (
        "import sys, gmai_rl.config, gmai_rl.rollout.engines\n"
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
