"""The config tree: every shipped option composes onto the schema, every field is documented,
and cross-field rules fail at start-up with the keys to change."""

import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gmai_rl.config import TrainConfig, validate
from gmai_rl.train import CONF_DIR, to_train_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _default_groups() -> set[str]:
    """Groups with an entry in conf/config.yaml's defaults list (`group=option` overrides them);
    the others, such as experiment/ presets, are added with `+group=option`."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    return {key for entry in defaults if isinstance(entry, dict) for key in entry}


def _select(group: str, option: str) -> str:
    return f"{'' if group in _default_groups() else '+'}{group}={option}"


def compose_config(overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.output_dir=/tmp/unused", *overrides])
    return cfg


def test_default_config_is_the_valid_demo():
    cfg = to_train_config(compose_config())
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
    cfg = compose_config([override, "data.root=/data/gmai"])
    OmegaConf.to_object(cfg)  # type-checks every key against TrainConfig


def test_unknown_key_fails_with_its_name():
    with pytest.raises(Exception, match="no_such_key"):
        compose_config(["algo.no_such_key=1"])


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
    cfg = to_train_config(
        compose_config(
            ["rollout.samples_per_prompt=1", "algo.prompts_per_step=3", "algo.estimator=ppo"]
        )
    )
    with pytest.raises(ValueError) as err:
        validate(cfg)
    message = str(err.value)
    assert "rollout.samples_per_prompt=1" in message
    assert "algo.estimator='ppo'" in message
    assert "algo.prompts_per_step" in message  # 3 x 1 samples do not split over 2 ranks


def test_paths_are_made_absolute_for_the_actors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = to_train_config(compose_config())
    assert Path(cfg.model.path).is_absolute() and Path(cfg.data.train).is_absolute()
    assert cfg.data.train.startswith(str(tmp_path))
