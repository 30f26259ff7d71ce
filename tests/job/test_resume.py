"""A run killed mid-step and resumed from its last checkpoint equals the uninterrupted run.

Run A trains 4 RL steps straight through, checkpointing every 2. Run B is the same job started as
a user would (`python -m gmai_rl.train`), killed with SIGKILL (driver and its Ray processes) once
the step-2 checkpoint is complete and step 3 is under way, then continued with
`trainer.resume=auto`. On CPU every stage is deterministic (seeded sampling restored from the
rollout workers' RNG states, DeepSpeed's optimizer state restored exactly, gloo reductions in a
fixed order), so B's per-step metrics and final weights must equal A's bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gmai_rl.loop import run
from support import TEST_SIZE

# The job tier: six minutes per case on 2 CPU cores (two runs, one a process of its own).
pytestmark = [pytest.mark.job, pytest.mark.timeout(1800)]
ray = pytest.importorskip("ray")

TIMING = ("seconds", "generate_tokens_per_s")


def steady(record):
    """A metrics record without its wall-clock fields."""
    return {
        k: v
        for k, v in record.items()
        if not k.startswith(("time_", "idle_ratio_")) and k not in TIMING
    }


def metrics(out: Path):
    """Every record but the per-process start-up ones (a resumed run writes its own)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [steady(r) for r in records if r["stage"] != "setup"]


@pytest.fixture(scope="module")
def job(tiny_model_dir, synthetic_dir):
    """The job's overrides, shared by the in-process run and the command line."""
    return [
        f"model.path={tiny_model_dir}",
        "model.build_tiny_if_missing=false",
        f"data.synthetic.dir={synthetic_dir}",
        "data.image_check_cache=null",
        *TEST_SIZE,
        "data.max_eval_items=8",
        "trainer.steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=0",
        "trainer.keep_checkpoints=1",
    ]


@pytest.mark.parametrize("max_staleness", [0, 1], ids=["synchronous", "one-step-off"])
def test_a_killed_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(
    job, tmp_path, max_staleness
):
    """With `algo.max_staleness=1` the pipeline drains before each checkpoint, so the resumed
    run collects the same batches with the same weights as the run it continues."""
    from support import train_config

    job = [*job, f"algo.max_staleness={max_staleness}"]

    straight = tmp_path / "straight"
    try:
        run(train_config(*job, f"trainer.output_dir={straight}"))
    finally:
        ray.shutdown()

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gmai_rl.train",
            *job,
            f"trainer.output_dir={killed}",
            f"hydra.run.dir={killed}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes its Ray processes too
    )
    try:
        deadline = time.monotonic() + 900
        step_2 = killed / "checkpoints" / "step_2" / "driver.json"
        while not step_2.exists():
            assert proc.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "eval.json").exists()  # it really died before the end

    try:
        result = run(train_config(*job, f"trainer.output_dir={killed}", "trainer.resume=auto"))
    finally:
        ray.shutdown()

    assert metrics(killed) == metrics(straight)
    assert [r["step"] for r in metrics(killed) if r["stage"] == "rl"] == [0, 1, 2, 3]
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert result["before_rl"] == json.loads((straight / "eval.json").read_text())["before_rl"]
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step_4"]
