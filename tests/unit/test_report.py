"""The end-of-run report: markdown from records and evaluations, the figure's panels, the files."""

import json
import subprocess
import sys

import pytest

from gmai_rl.report import (
    OTHER,
    PANELS,
    RL_STEPS,
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
        "time_step_s": 4.0,  # the step's wall time: its parts (3.75 s) and the driver's work
        **extra,
    }


def pipelined(step, **extra):
    """An RL step with algo.max_staleness > 0: the batch it trains on was generated during the
    previous step, so its parts (4.0 s) add up to more than its wall time."""
    return rl(step, time_wait_rollout_s=0.25, time_step_s=2.5, **extra)


def untimed(record):
    """A record of metrics.jsonl before time_step_s was logged."""
    return {k: v for k, v in record.items() if k != "time_step_s"}


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


def time_rows(text):
    """The time table of a report: (stage, seconds, share) per row, sub-rows and total included."""
    table = text.split("## Time\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [tuple(cell.strip() for cell in row.strip("|").split("|")) for row in table]


def test_time_split_adds_up_to_the_wall_time_with_the_rl_parts_inside_the_rl_steps():
    split = time_split(RECORDS, wall_s=50.0)
    assert split.rows == [
        ("data preparation", 2.0),
        ("start-up (plan, Ray, actors)", 8.0),
        ("SFT", 10.0),
        (RL_STEPS, 12.0),  # time_step_s of the three steps, not their parts added on top
        ("held-out evaluation", 9.0),
        (OTHER, 50.0 - 41.0),
    ]
    assert split.total == 50.0 and split.rl == 12.0
    assert split.rl_parts == [
        ("generate", 6.0),
        ("reward", 0.75),
        ("train", 3.0),
        ("weight sync", 1.5),
    ]
    assert not split.parts_overlap and split.untimed_steps == 0 and split.resumed_step is None
    assert OTHER not in dict(time_split(RECORDS).rows)
    # A wall time shorter than the records say (clocks): other is 0, never negative.
    assert dict(time_split(RECORDS, wall_s=40.0).rows)[OTHER] == 0.0


def test_markdown_time_table_shares_add_up_to_the_wall_time_and_parts_are_not_added():
    text = report_markdown("t", [], RECORDS, RESULT, wall_s=50.0, figure=None)
    rows = time_rows(text)
    *stages, total = rows
    top = [row for row in stages if not row[0].startswith("↳")]
    assert total == ("total (wall time)", "50.0", "100.0%")
    assert sum(float(seconds) for _, seconds, _ in top) == 50.0
    assert sum(float(share.rstrip("%")) for _, _, share in top) == pytest.approx(100.0)
    assert [stage for stage, _, _ in top] == [
        "data preparation",
        "start-up (plan, Ray, actors)",
        "SFT",
        RL_STEPS,
        "held-out evaluation",
        OTHER,
    ]
    assert ("RL steps", "12.0", "24.0%") in rows and ("SFT", "10.0", "20.0%") in rows
    assert ("↳ generate", "6.0", "50.0% of RL steps") in rows
    assert ("↳ weight sync", "1.5", "12.5% of RL steps") in rows
    assert "overlap" not in text and "no wall time" not in text


def test_overlapping_parts_are_noted_under_the_table_and_still_not_added():
    records = [*RECORDS[:4], pipelined(0), pipelined(1), pipelined(2)]
    split = time_split(records, wall_s=40.0)
    assert split.rl == 7.5 and split.parts_overlap
    assert sum(s for _, s in split.rl_parts) == 12.0 and split.total == 40.0
    text = report_markdown("t", [], records, RESULT, wall_s=40.0, figure=None)
    assert ("↳ wait for the batches ahead", "0.8", "10.0% of RL steps") in time_rows(text)
    assert (
        "The RL steps' parts add up to 12.0 s, more than the 7.5 s the steps took: they overlap"
        in text
    )


def test_records_without_a_step_wall_time_count_their_parts_and_say_so():
    records = [*RECORDS[:4], untimed(rl(0)), untimed(rl(1)), rl(2)]
    split = time_split(records, wall_s=50.0)
    assert split.rl == 3.75 + 3.75 + 4.0 and split.untimed_steps == 2
    assert not split.parts_overlap and split.total == 50.0
    text = report_markdown("t", [], records, RESULT, wall_s=50.0, figure=None)
    assert "2 RL step(s) logged no wall time" in text and "overlap" not in text


def test_a_resumed_run_counts_this_process_records_only():
    resumed = {"stage": "setup", "data_seconds": 1.0, "startup_seconds": 5.0, "resumed_step": 1}
    records = [*RECORDS[:5], resumed, rl(1), rl(2), RECORDS[-1]]
    split = time_split(records, wall_s=30.0)
    assert dict(split.rows) == {
        "data preparation": 1.0,
        "start-up (plan, Ray, actors)": 5.0,
        "SFT": 0.0,
        RL_STEPS: 8.0,
        "held-out evaluation": 3.0,
        OTHER: 13.0,
    }
    assert split.total == 30.0 and split.resumed_step == 1
    text = report_markdown("t", [], records, RESULT, wall_s=30.0, figure=None)
    assert "Resumed after RL step 1: the times are this process's only." in text


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
    assert "| SFT | 10.0 | 20.0% |" in text and "| total (wall time) | 50.0 | 100.0% |" in text
    assert "| ↳ generate | 6.0 | 50.0% of RL steps |" in text
    assert "| data preparation | 2.0 | 4.0% |" in text
    assert text.rstrip().endswith("(report.png)")
    no_eval = report_markdown("t", summary, RECORDS[:3], {"output_dir": "x"}, figure=None)
    assert "No held-out evaluation" in no_eval and "## RL steps" not in no_eval
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
