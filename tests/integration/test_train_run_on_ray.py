"""`gmai_rl.loop.run` end to end on a local Ray cluster: SFT, evaluation, GRPO steps, outputs."""

import json
import math

import pytest

from gmai_rl.loop import run

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


def test_end_to_end_run_writes_metrics_and_eval(small_config, tmp_path):
    cfg = small_config(tmp_path, "trainer.steps=2", "trainer.eval_every=1", "data.max_eval_items=8")
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in lines if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [0, 1]
    assert [r["policy_version"] for r in rl] == [2, 3]  # 1 after the SFT sync, +1 per step
    for key in (
        "reward_mean",
        "reward_std",
        "accuracy",
        "format_rate",
        "groups_generated",
        "response_length_mean",
        "entropy",
        "clip_frac",
        "grad_norm",
        "lr",
        "time_generate_s",
        "time_reward_s",
        "time_train_s",
        "time_sync_s",
        "generate_tokens_per_s",
        "staleness_max",
    ):
        assert all(math.isfinite(r[key]) for r in rl), key
    assert [r["step"] for r in lines if r["stage"] == "eval"] == [1]
    assert len([r for r in lines if r["stage"] == "sft"]) == 2
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["before_rl"]["n"] == saved["after_rl"]["n"] == 8
    assert 0 <= saved["after_rl"]["accuracy"] <= 1
    assert (tmp_path / "final" / "config.json").exists() and result["checkpoint"].endswith("final")
