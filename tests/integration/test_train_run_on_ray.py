"""`gmai_rl.loop.run` end to end on a local Ray cluster: SFT, evaluation, GRPO steps, outputs,
dashboards (TensorBoard, Ray's metrics endpoint) and the end-of-run report."""

import json
import math
import time
import urllib.request

import pytest

from gmai_rl.cluster.session import init_ray
from gmai_rl.dashboards import run_name
from gmai_rl.loop import run
from gmai_rl.ray_metrics import metrics_endpoint

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


def test_end_to_end_run_writes_metrics_and_eval(small_config, tmp_path):
    from benchmark_fixtures import write_gmai_mmbench, write_vqa_rad

    mcq = write_gmai_mmbench(tmp_path / "benchmarks" / "mmbench", bad_rows=False)
    vqa = write_vqa_rad(tmp_path / "benchmarks" / "vqa_rad", bad_rows=False)
    benchmarks = (
        f"eval.benchmarks=[{{name:gmai-mmbench,path:'{mcq.path}'}},"
        f"{{name:vqa-rad,path:'{vqa.path}'}}]"
    )
    cfg = small_config(
        tmp_path, "trainer.steps=2", "trainer.eval_every=1", "data.max_eval_items=8", benchmarks
    )
    init_ray(cfg)  # started here, so the run leaves it up for the scrape below
    try:
        result = run(cfg)
        # The driver's gauges reach the node's metrics agent every few seconds: scrape while Ray
        # is still up.
        scraped = scrape_ray_metrics(run_name(tmp_path), deadline_s=90)
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
    evals = [r for r in lines if r["stage"] == "eval"]
    assert [(r["phase"], r["step"]) for r in evals] == [
        ("before_rl", 0),
        ("during_rl", 1),
        ("after_rl", 2),
    ]
    assert len([r for r in lines if r["stage"] == "sft"]) == 2
    (setup,) = [r for r in lines if r["stage"] == "setup"]
    assert setup["data_seconds"] >= 0 and setup["startup_seconds"] > 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["before_rl"]["n"] == saved["after_rl"]["n"] == 8
    assert 0 <= saved["after_rl"]["accuracy"] <= 1
    assert (tmp_path / "final" / "config.json").exists() and result["checkpoint"].endswith("final")

    assert result["report"] == str(tmp_path / "report.md")
    check_benchmarks(lines, saved, {"gmai-mmbench": mcq.good, "vqa-rad": vqa.good})
    check_cli_eval_of_final(cfg, tmp_path / "final", saved, mcq.path, vqa.path)
    check_tensorboard(tmp_path / "tensorboard")
    check_report(tmp_path, saved)
    check_ray_metrics(scraped)


def check_benchmarks(lines, saved, sizes):
    """Both benchmarks evaluated with the held-out set (before, during and after RL) on the
    rollout workers, in metrics.jsonl and eval.json, and the report's table."""
    bench = [r for r in lines if r["stage"] == "bench"]
    assert [(r["phase"], r["step"]) for r in bench] == [
        ("before_rl", 0),
        ("during_rl", 1),
        ("after_rl", 2),
    ]
    for name, n in sizes.items():
        assert all(r[f"{name}/n"] == n for r in bench)
        for phase in ("before_rl", "after_rl"):
            result = saved[phase]["benchmarks"][name]
            assert result["n"] == n and result["prompt_style"] == "trained"
    assert 0 <= bench[-1]["gmai-mmbench/accuracy"] <= 1


def check_cli_eval_of_final(cfg, final, saved, mcq, vqa):
    """`gmai-rl eval` of the exported checkpoint asks it with the system prompt its run trained
    with (recorded beside the weights) and so answers as the run's evaluation after RL did."""
    from gmai_rl.cli import main
    from gmai_rl.data.trained_prompt import system_prompt_for

    assert system_prompt_for(final)[0] == cfg.data.system_prompt
    out = final.parent / "cli_eval.json"
    args = ["eval", "--model", str(final), "--output", str(out)]
    args += ["--max-new-tokens", str(cfg.rollout.max_new_tokens)]
    args += ["--benchmark", "gmai-mmbench", "--data", str(mcq)]
    args += ["--benchmark", "vqa-rad", "--data", str(vqa)]
    assert main(args) == 0
    cli = json.loads(out.read_text())
    for name, in_run in saved["after_rl"]["benchmarks"].items():
        assert cli[name]["system_prompt"] == in_run["system_prompt"] == cfg.data.system_prompt
        assert cli[name]["accuracy"] == in_run["accuracy"], name
        assert cli[name]["no_answer_rate"] == in_run["no_answer_rate"], name


def check_tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("rl/reward_mean")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("sft/sft_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("bench/gmai-mmbench/accuracy")] == [0, 1, 2]


def check_report(out, saved):
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    before, after = saved["before_rl"], saved["after_rl"]
    assert (
        f"| overall (n=8) | {100 * before['accuracy']:.1f}% | {100 * after['accuracy']:.1f}% |"
        in text
    )
    for modality, accuracy in after["accuracy_by_modality"].items():
        assert f"| {modality} | " in text and f"| {100 * accuracy:.1f}% |" in text
    stages = ("start-up (plan, Ray, actors)", "SFT", "RL steps", "↳ generate", "↳ weight sync")
    for stage in (*stages, "total (wall time)"):
        assert f"| {stage} | " in text, stage
    assert "## RL steps (2)" in text
    after = saved["after_rl"]["benchmarks"]["gmai-mmbench"]
    assert "## Medical benchmarks" in text and f"| gmai-mmbench | {after['n']} | " in text
    assert "GMAI-VL 62.43 (its authors'" in text  # the published number, labelled


def scrape_ray_metrics(run, deadline_s):
    """{(name, stage tag or None): value} of this run's gmai_rl series on the head node's metrics
    endpoint, once the last step's gauges are there (exports are periodic)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = metrics_endpoint()
    found, end = {}, time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        found = {
            (s.name, s.labels.get("stage")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("ray_gmai_rl_") and s.labels.get("run") == run
        }
        if (
            found.get(("ray_gmai_rl_step", None)) == 2
            and ("ray_gmai_rl_eval_accuracy", None) in found
        ):
            break
        time.sleep(2)
    print(
        "\n".join(
            f"{name}{{stage={stage}}} {value}"
            for (name, stage), value in sorted(found.items(), key=str)
        )
    )
    return found


def check_ray_metrics(found):
    assert found.get(("ray_gmai_rl_step", None)) == 2, found
    assert 0 <= found[("ray_gmai_rl_accuracy", None)] <= 1
    assert 0 <= found[("ray_gmai_rl_eval_accuracy", None)] <= 1
    assert math.isfinite(found[("ray_gmai_rl_reward_mean", None)])
    assert found[("ray_gmai_rl_generate_tokens_per_s", None)] > 0
    assert found[("ray_gmai_rl_generated_tokens_total", None)] > 0
    assert found[("ray_gmai_rl_policy_version_lag", None)] == 0
    assert found[("ray_gmai_rl_policy_version", None)] == 3
    for stage in ("generate", "reward", "train", "sync", "sft", "eval", "data", "startup"):
        assert found[("ray_gmai_rl_stage_seconds", stage)] >= 0, stage
