"""A hydra multirun of `python -m gmai_rl.train`: every job has its own output folder and its own
Ray (hydra runs the jobs one after another in one process, so each run shuts down the Ray it
started and the next one starts afresh)."""

import json
import os
import subprocess
import sys

import pytest

from jobs import REPO, TINY_RUN

pytestmark = [pytest.mark.job, pytest.mark.timeout(1500)]


def test_a_two_job_sweep_gives_each_job_its_own_outputs_and_ray(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    env = {**os.environ, "GMAI_RL_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
    env.pop("RAY_ADDRESS", None)  # a local Ray per job, not a running cluster
    sweep_args = ["trainer.seed=0,1", f"hydra.sweep.dir={sweep}", "trainer.save_final=false"]
    done = subprocess.run(
        [sys.executable, "-m", "gmai_rl.train", "-m", *TINY_RUN, *sweep_args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("Started a local Ray instance") == 2, output
    for job, seed in ((0, 0), (1, 1)):
        folder = sweep / str(job)
        assert (folder / "metrics.jsonl").read_text().strip()
        assert json.loads((folder / "eval.json").read_text())["output_dir"] == str(folder)
        assert f"trainer.seed={seed}" in (folder / ".hydra" / "overrides.yaml").read_text()
        assert (cache / f"tiny-qwen2.5-vl-seed{seed}" / "config.json").exists()
        # Each job's own end-of-run report and TensorBoard events, not the sweep's last job's.
        saved = json.loads((folder / "eval.json").read_text())
        accuracy = 100 * saved["after_rl"]["accuracy"]
        assert f"% | {accuracy:.1f}% |" in (folder / "report.md").read_text()
        assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
