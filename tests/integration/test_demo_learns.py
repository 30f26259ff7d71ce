"""The embedded demo, as `make demo` runs it, learns: held-out accuracy rises by 20 points or more;
with shuffled options (`+experiment=demo_shuffled`) by 30 points or more.

The default tier never trains long enough to show learning; this is the check that the trainer as
a whole (rollout, reward, GRPO loss, DeepSpeed step, weight sync) improves the policy. It takes
the demo's time (6-11 min on 2 cores): `make test-slow`.
"""

import json

import pytest

from gmai_rl.loop import run
from support import train_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ray = pytest.importorskip("ray")


def _isolated(tmp_path, *overrides):
    return train_config(
        f"trainer.output_dir={tmp_path / 'run'}",
        f"model.path={tmp_path / 'tiny-qwen2.5-vl'}",
        f"data.synthetic.dir={tmp_path / 'synthetic'}",
        f"data.image_check_cache={tmp_path / 'image-checks.json'}",
        "trainer.seed=0",
        "trainer.save_final=false",
        *overrides,
    )


def _accuracy_before_and_after_rl(cfg):
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    return result["before_rl"]["accuracy"], result["after_rl"]["accuracy"]


def test_the_demo_learns_on_seed_0(tmp_path):
    cfg = _isolated(tmp_path)
    before, after = _accuracy_before_and_after_rl(cfg)
    assert after - before >= 0.20, (before, after)
    steps = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"stage": "rl"' in line
    ]
    assert len(steps) == cfg.trainer.steps
    assert all(s["staleness_max"] == 0 for s in steps)


def test_the_shuffled_options_demo_learns_on_seed_0(tmp_path):
    cfg = _isolated(tmp_path, "+experiment=demo_shuffled", "trainer.save_every=0")
    before, after = _accuracy_before_and_after_rl(cfg)
    assert after - before >= 0.30, (before, after)
