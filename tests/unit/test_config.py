"""The config tree: every shipped option composes onto the schema, every field is documented,
and cross-field rules fail at start-up with the keys to change."""

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gmai_rl.config import SyntheticDataConfig, TrainConfig, artifacts_cache, synthetic_key
from gmai_rl.config_checks import validate
from gmai_rl.train import CONF_DIR, to_train_config
from support import compose, train_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _default_groups() -> set[str]:
    """Groups with an entry in conf/config.yaml's defaults list (`group=option` overrides them);
    the others, such as experiment/ presets, are added with `+group=option`."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    return {key for entry in defaults if isinstance(entry, dict) for key in entry}


def _select(group: str, option: str) -> str:
    return f"{'' if group in _default_groups() else '+'}{group}={option}"


def test_default_config_is_the_valid_demo():
    cfg = train_config()
    validate(cfg)
    assert cfg.model.build_tiny_if_missing and cfg.data.synthetic is not None
    assert cfg.cluster.learner_ranks == 2 and cfg.cluster.rollout_workers == 2
    assert cfg.algo.loss.temperature == cfg.rollout.temperature  # interpolated


@pytest.mark.parametrize(
    "override",
    [_select(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))],
)
def test_every_group_option_composes_onto_the_schema(override):
    # gmai_reasoning10k (alone or inside a preset) leaves data.root for the user to set.
    cfg = compose(override, "data.root=/data/gmai")
    OmegaConf.to_object(cfg)  # type-checks every key against TrainConfig


def test_unknown_key_fails_with_its_name():
    with pytest.raises(Exception, match="no_such_key"):
        compose("algo.no_such_key=1")


def schema_classes(root=TrainConfig) -> list[type]:
    """Every dataclass reachable from the schema through field types."""
    found, todo = [], [root]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            todo += [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
    return found


def undocumented_fields(cls: type) -> list[str]:
    """Fields followed by no docstring, other than nested sections (documented in their class)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    hints = typing.get_type_hints(cls)
    missing = []
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign):
            continue
        hint = hints[node.target.id]
        nested = any(dataclasses.is_dataclass(t) for t in (hint, *typing.get_args(hint)))
        documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if not documented and not nested:
            missing.append(f"{cls.__name__}.{node.target.id}")
    return missing


def test_every_config_field_is_documented():
    missing = [name for cls in schema_classes() for name in undocumented_fields(cls)]
    assert missing == []


def test_cross_field_rules_name_the_keys():
    cfg = train_config("rollout.samples_per_prompt=1", "algo.prompts_per_step=3")
    with pytest.raises(ValueError) as err:
        validate(cfg)
    message = str(err.value)
    assert "rollout.samples_per_prompt=1" in message
    assert "algo.prompts_per_step" in message  # 3 x 1 samples do not split over 2 ranks


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.learner_ranks=0", "cluster.learner_ranks must be >= 1"),
        ("learner.num_minibatches=0", "learner.num_minibatches=0 must be >= 1"),
    ],
)
def test_a_zero_divisor_of_the_batch_is_named_not_divided_by(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(train_config(override))


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("algo.estimator=ppo", "grpo, drgrpo, rloo"),
        ("algo.loss.loss_agg=mean", "token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"),
        ("algo.loss.kl_estimator=k4", "k1, k2, k3"),
        ("rollout.backend=sglang", "hf, vllm"),
        ("data.on_error=ignore", "raise, skip"),
        ("model.dtype=fp8", "float32, bfloat16, float16"),
        ("cluster.placement_strategy=pack", "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    ],
)
def test_a_choice_outside_its_set_fails_at_start_up_listing_the_allowed_ones(override, allowed):
    with pytest.raises(Exception) as err:  # hydra's override error, caused by OmegaConf's
        train_config(override)
    messages = f"{err.value}\n{err.value.__cause__}"
    assert f"expected one of [{allowed}]" in messages
    assert override.split("=")[0] in messages


def test_choices_reach_the_pure_functions_as_their_plain_strings():
    cfg = train_config(
        "algo.loss.loss_agg=seq_mean_token_sum_norm", "algo.loss.norm_len=48", "algo.estimator=rloo"
    )
    assert cfg.algo.loss.loss_agg == "seq-mean-token-sum-norm" and cfg.algo.estimator == "rloo"
    assert f"{cfg.algo.estimator}" == str(cfg.algo.estimator) == "rloo"
    assert {"rloo": 1}[cfg.algo.estimator] == 1


def test_the_choice_enums_list_exactly_what_the_pure_functions_take():
    from gmai_rl.algo import AGG_MODES, ESTIMATORS, KL_ESTIMATORS
    from gmai_rl.learner.options import Estimator, KLEstimator, LossAgg

    assert [e.value for e in Estimator] == list(ESTIMATORS)
    assert [e.value for e in LossAgg] == list(AGG_MODES)
    assert [e.value for e in KLEstimator] == list(KL_ESTIMATORS)


def test_the_wiring_follows_the_keys_it_names():
    cfg = train_config("rollout.temperature=0.7", "trainer.seed=5", "trainer.steps=10")
    assert cfg.algo.loss.temperature == 0.7 and cfg.learner.seed == 5
    # Unset total_steps: the RL schedule spans every optimizer step of the stage.
    assert cfg.rl_optim.total_steps == 10 * cfg.learner.num_minibatches * cfg.learner.ppo_epochs
    assert cfg.sft_optim.total_steps == cfg.sft.steps
    assert train_config("optim.total_steps=3").rl_optim.total_steps == 3


# Keys a group option sets although the schema has the same default: they name the option
# (zero2 is stage 2, hf is the hf backend, local_cpu has no GPUs) whatever the default becomes.
DEFINING_KEYS = {
    "learner/zero2.yaml": {"zero_stage"},
    "rollout/hf.yaml": {"backend"},
    "cluster/local_cpu.yaml": {"gpus_per_learner", "gpus_per_rollout_worker"},
}


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_config_groups_hold_only_what_differs_from_the_schema_defaults():
    """One source of defaults: the dataclasses. config.yaml holds no values; a group option
    (other than the experiment/ recipes, which pin a whole recipe) only what differs."""
    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    assert set(top) == {"defaults", "hydra"}
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    repeated = []
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        group = path.parent.name
        if group == "experiment":
            continue
        defaults = dict(_flat(schema[group]))
        option = OmegaConf.to_container(OmegaConf.load(path)) or {}
        allowed = DEFINING_KEYS.get(f"{group}/{path.name}", set())
        repeated += [
            f"{group}/{path.name}: {key}"
            for key, value in _flat(option)
            if key in defaults and defaults[key] == value and key not in allowed
        ]
    assert repeated == []


def test_paths_are_made_absolute_for_the_actors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = to_train_config(
        compose("model.path=models/tiny", "data.synthetic.dir=data", "trainer.output_dir='~/out'")
    )
    assert cfg.model.path == str(tmp_path / "models" / "tiny")
    assert cfg.data.train == str(tmp_path / "data" / "train.jsonl")
    assert cfg.trainer.output_dir == str(tmp_path / "home" / "out")


def test_the_demo_builds_its_artifacts_in_the_cache_not_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GMAI_RL_CACHE", str(tmp_path / "cache"))
    cfg = to_train_config(compose())
    assert cfg.model.path == str(tmp_path / "cache" / "tiny-qwen2.5-vl-seed0")
    synthetic = Path(cfg.data.synthetic.dir)
    assert synthetic.parent == tmp_path / "cache" / "synthetic"
    assert cfg.data.train == str(synthetic / "train.jsonl")
    assert cfg.data.eval == str(synthetic / "eval.jsonl")


def test_the_cache_folder_comes_from_the_environment(tmp_path):
    home = tmp_path / "home"
    assert artifacts_cache({}, home) == home / ".cache" / "gmai-rl"
    assert artifacts_cache({"XDG_CACHE_HOME": "/xdg"}, home) == Path("/xdg/gmai-rl")
    assert artifacts_cache({"GMAI_RL_CACHE": "/c", "XDG_CACHE_HOME": "/xdg"}, home) == Path("/c")


def test_each_seed_has_its_own_tiny_model():
    assert train_config("trainer.seed=1").model.path.endswith("tiny-qwen2.5-vl-seed1")
    assert train_config().model.path.endswith("tiny-qwen2.5-vl-seed0")


SYNTHETIC_CHANGES = {
    "n_train": "200",
    "n_eval": "40",
    "seed": "1",
    "tasks": "[modality,lesion_quadrant]",
    "image_size": "28",
    "shuffle_options": "true",
    "sft_answers": "random",
}


def test_every_synthetic_setting_has_its_own_cache_folder():
    fields = {f.name for f in dataclasses.fields(SyntheticDataConfig)} - {"dir"}
    assert set(SYNTHETIC_CHANGES) == fields  # a new setting must be listed here, and keyed
    default = train_config().data.synthetic.dir
    folders = {
        train_config(f"data.synthetic.{key}={value}").data.synthetic.dir
        for key, value in SYNTHETIC_CHANGES.items()
    }
    assert len(folders) == len(SYNTHETIC_CHANGES) and default not in folders


def test_the_synthetic_key_reads_like_the_settings():
    settings = {"dir": "ignored", "n_train": 8, "tasks": ["a", "b"], "shuffle_options": False}
    assert synthetic_key(settings) == "n_train=8,tasks=a+b,shuffle_options=false"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cluster.gpus_per_learner=2"], "a learner rank drives one GPU"),
        (["cluster.gpus_per_learner=0.5"], "a learner rank drives one GPU"),
        (["cluster.gpus_per_rollout_worker=1.5"], "must be a whole number"),
        (["cluster.gpus_per_rollout_worker=2"], "the HF engine runs on one GPU"),
        (["rollout.device=cuda"], "rollout.device=cuda needs"),
        (
            [
                "rollout=vllm",
                "cluster.colocate=true",
                "cluster.gpus_per_learner=1",
                "cluster.gpus_per_rollout_worker=1",
            ],
            "needs rollout.vllm.enable_sleep_mode=true",
        ),
    ],
)
def test_gpu_layouts_the_actors_cannot_use_fail_at_start_up(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(train_config(*overrides))


def test_a_colocated_vllm_engine_that_sleeps_is_a_valid_gpu_layout():
    validate(
        train_config(
            "rollout=vllm",
            "cluster.colocate=true",
            "cluster.gpus_per_learner=1",
            "cluster.gpus_per_rollout_worker=1",
            "rollout.vllm.enable_sleep_mode=true",
        )
    )


COLOCATED_SLEEPING_VLLM = (
    "rollout=vllm",
    "cluster.colocate=true",
    "cluster.gpus_per_learner=1",
    "cluster.gpus_per_rollout_worker=1",
    "rollout.vllm.enable_sleep_mode=true",
)


def test_batches_ahead_are_refused_where_the_engines_sleep_while_the_learners_train():
    with pytest.raises(ValueError, match=r"algo\.max_staleness=1 with engines that sleep"):
        validate(train_config(*COLOCATED_SLEEPING_VLLM, "algo.max_staleness=1"))
    validate(train_config(*COLOCATED_SLEEPING_VLLM, "algo.max_staleness=0"))
    # Engines on GPUs of their own keep theirs: generating ahead overlaps training, as designed.
    validate(
        train_config(
            "rollout=vllm",
            "cluster.gpus_per_learner=1",
            "cluster.gpus_per_rollout_worker=1",
            "algo.max_staleness=1",
        )
    )


def test_bf16_without_zero_is_refused_before_deepspeed_would_fail():
    with pytest.raises(ValueError, match="bf16 training needs ZeRO >= 1"):
        validate(train_config("learner.zero_stage=0", "learner.bf16=true"))
    validate(train_config("learner.zero_stage=1", "learner.bf16=true"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reward.overlong_buffer=-1"], "reward.overlong_buffer=-1 must be 0 (off) or less than"),
        (["reward.overlong_buffer=48"], "or less than rollout.max_new_tokens=48"),
        (
            ["reward.overlong_buffer=16", "rollout.max_new_tokens=8"],
            "reward.overlong_buffer=16 must be 0 (off) or less than rollout.max_new_tokens=8",
        ),
        (["reward.overlong_penalty=-0.5"], "reward.overlong_penalty=-0.5 must be >= 0"),
        (["reward.overlong_penalty=nan"], "reward.overlong_penalty=nan must be >= 0"),
    ],
)
def test_overlong_shaping_must_fit_the_generation_budget(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(train_config(*overrides))


def test_overlong_shaping_is_off_by_default_and_valid_inside_the_budget():
    assert train_config().reward.overlong_buffer == 0
    validate(train_config("reward.overlong_buffer=47", "reward.overlong_penalty=0"))
    validate(train_config("reward.overlong_buffer=0", "rollout.max_new_tokens=1"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algo.loss.behaviour_is_cap=2", "algo.loss.use_rollout_logprobs=true"],
            "algo.loss.behaviour_is_cap needs algo.loss.use_rollout_logprobs=false",
        ),
        (["algo.loss.behaviour_is_cap=0.5"], "algo.loss.behaviour_is_cap=0.5 must be >= 1"),
        (["algo.loss.behaviour_is_cap=nan"], "algo.loss.behaviour_is_cap=nan must be >= 1"),
    ],
)
def test_the_off_policy_correction_needs_the_learners_own_old_logprobs(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(train_config(*overrides))


def test_the_off_policy_correction_is_off_by_default_and_valid_on_its_own():
    assert train_config().algo.loss.behaviour_is_cap is None
    validate(train_config("algo.loss.behaviour_is_cap=2"))
    validate(train_config("algo.loss.use_rollout_logprobs=true"))


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (["algo.max_staleness=1"], True),
        (["algo.max_staleness=1", "algo.loss.behaviour_is_cap=2.0"], False),
        (["algo.max_staleness=1", "algo.loss.use_rollout_logprobs=true"], False),
        (["algo.max_staleness=0"], False),
    ],
)
def test_stale_batches_without_an_off_policy_correction_are_warned_about(overrides, warned, caplog):
    with caplog.at_level("WARNING", logger="gmai_rl.config_checks"):
        validate(train_config(*overrides))
    messages = [r.getMessage() for r in caplog.records if r.name == "gmai_rl.config_checks"]
    assert bool(messages) == warned
    if warned:
        assert "algo.loss.behaviour_is_cap" in messages[0]
