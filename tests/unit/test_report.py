"""The end-of-run report: markdown from records and evaluations, the figure's panels, the files."""

import json
import subprocess
import sys

import pytest

from gmai_rl.report import (
    PANELS,
    accuracy_rows,
    config_summary,
    curves_figure,
    report_markdown,
    time_split,
    write_report,
)
from support import train_config


def rl(step, **extra):
    return {
        "stage": "rl",
        "step": step,
        "reward_mean": 0.5 + 0.1 * step,
        "reward_std": 0.1,
        "accuracy": 0.25 + 0.25 * step,
        "format_rate": 1.0,
        "response_length_mean": 30.0 - step,
        "response_length_max": 48,
        "entropy": 1.5 - 0.1 * step,
        "approx_kl": 0.001,
        "time_generate_s": 2.0,
        "time_reward_s": 0.25,
        "time_train_s": 1.0,
        "time_sync_s": 0.5,
        **extra,
    }


BEFORE = {
    "accuracy": 0.25,
    "format_rate": 0.9,
    "n": 8,
    "accuracy_by_modality": {"CT": 0.5, "MRI": 0.0},
}
AFTER = {
    "accuracy": 0.75,
    "format_rate": 1.0,
    "n": 8,
    "accuracy_by_modality": {"CT": 1.0, "MRI": 0.5, "X-ray": 1.0},
}
RECORDS = [
    {"stage": "setup", "data_seconds": 2.0, "startup_seconds": 8.0},
    {"stage": "sft", "step": 0, "sft_loss": 3.0, "seconds": 4.0},
    {"stage": "sft", "step": 1, "sft_loss": 2.0, "seconds": 6.0},
    {"stage": "eval", "phase": "before_rl", "step": 0, **BEFORE, "seconds": 3.0},
    rl(0),
    rl(1, ref_kl=0.02),
    {"stage": "eval", "phase": "during_rl", "step": 2, "accuracy": 0.5, "seconds": 3.0},
    rl(2, ref_kl=0.03),
    {"stage": "eval", "phase": "after_rl", "step": 3, **AFTER, "seconds": 3.0},
]
RESULT = {"before_rl": BEFORE, "after_rl": AFTER, "output_dir": "/runs/x"}


def test_time_split_totals_each_stage_and_leaves_the_rest_to_other():
    split = dict(time_split(RECORDS, wall_s=50.0))
    assert split == {
        "data preparation": 2.0,
        "start-up (plan, Ray, actors)": 8.0,
        "SFT": 10.0,
        "RL: generate": 6.0,
        "RL: reward": 0.75,
        "RL: train": 3.0,
        "RL: weight sync": 1.5,
        "held-out evaluation": 9.0,
        "other (checkpoints, shutdown)": 50.0 - 40.25,
    }
    assert "other (checkpoints, shutdown)" not in dict(time_split(RECORDS))


def test_accuracy_rows_per_modality_with_the_change():
    rows = accuracy_rows(BEFORE, AFTER)
    assert rows == [
        ("overall (n=8)", "25.0%", "75.0%", "+50.0 points"),
        ("CT", "50.0%", "100.0%", "+50.0 points"),
        ("MRI", "0.0%", "50.0%", "+50.0 points"),
        ("X-ray", "–", "100.0%", "–"),
        ("answer format", "90.0%", "100.0%", "+10.0 points"),
    ]


def test_markdown_holds_config_accuracy_steps_and_time():
    summary = [("model", "tiny (float32)"), ("layout", "2 | 2")]
    text = report_markdown("gmai-rl run x", summary, RECORDS, RESULT, wall_s=50.0)
    assert text.startswith("# gmai-rl run x\n")
    assert "| model | tiny (float32) |" in text and "| layout | 2 \\| 2 |" in text
    assert "| overall (n=8) | 25.0% | 75.0% | +50.0 points |" in text
    assert "| MRI | 0.0% | 50.0% | +50.0 points |" in text
    assert "## RL steps (3)" in text and "| accuracy | 0.250 | 0.750 |" in text
    assert "| SFT | 10.0 | 20.0% |" in text and "| total | 50.0 | |" in text
    assert "| RL: generate | 6.0 | 12.0% |" in text and "| data preparation | 2.0 | 4.0% |" in text
    assert text.rstrip().endswith("(report.png)")
    no_eval = report_markdown("t", summary, RECORDS[:3], {"output_dir": "x"}, figure=None)
    assert "No held-out evaluation" in no_eval and "RL steps" not in no_eval
    assert "report.png" not in no_eval


def test_config_summary_names_model_data_layout_and_algorithm():
    rows = dict(config_summary(train_config("trainer.steps=7", "algo.loss.kl_coef=0.1")))
    assert list(rows) == ["model", "data", "layout", "algorithm", "SFT cold start", "seed"]
    assert "2 learner rank(s) (DeepSpeed ZeRO-2, CPU), 2 rollout worker(s) (hf" in rows["layout"]
    assert rows["algorithm"].startswith("grpo, 7 steps of 16 prompts x 8 samples")
    assert "KL coef 0.1 (k3)" in rows["algorithm"] and "accuracy filter off" in rows["algorithm"]
    assert rows["data"].endswith("eval.jsonl")
    assert dict(config_summary(train_config("sft.enabled=false")))["SFT cold start"] == "off"


def test_figure_has_one_panel_per_curve_and_marks_the_evaluations():
    fig = curves_figure(RECORDS)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == list(PANELS)
    by_title = {ax.get_title(): ax for ax in visible}
    accuracy = by_title["accuracy"]
    (held_out,) = [line for line in accuracy.get_lines() if line.get_label() == "held-out"]
    assert list(held_out.get_xdata()) == [0, 2, 3]
    assert list(held_out.get_ydata()) == [0.25, 0.5, 0.75]
    (rollouts,) = [line for line in accuracy.get_lines() if line.get_label() == "rollouts"]
    assert list(rollouts.get_xdata()) == [1, 2, 3]  # RL steps done
    kl = {line.get_label(): list(line.get_xdata()) for line in by_title["KL"].get_lines()}
    assert kl["to reference"] == [2, 3] and kl["to rollout policy"] == [1, 2, 3]
    without_kl = curves_figure([{k: v for k, v in rl(0).items() if "kl" not in k}])
    (kl_ax,) = [ax for ax in without_kl.axes if ax.get_title() == "KL"]
    assert [t.get_text() for t in kl_ax.texts] == ["not logged"]


def test_write_report_puts_a_png_and_the_markdown_beside_metrics_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    png, md = write_report(tmp_path, train_config(), RESULT, "run-1", wall_s=60.0)
    assert png == tmp_path / "report.png" and md == tmp_path / "report.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("# gmai-rl run run-1") and "| X-ray | – | 100.0% | – |" in text


@pytest.mark.timeout(60)
def test_importing_the_report_module_leaves_matplotlib_unloaded():
    code = "import sys, gmai_rl.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
