"""`gmai-rl synth --ray`: rejection sampling on a generation cluster's rollout and reward workers,
SIGKILLed mid-way (the driver and the Ray instance it started, as a lost node or a pre-emption
would) and started again on the same output: every question is sampled and listed exactly once,
and no trace of a question is written twice (faults tier)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]
pytest.importorskip("ray")

QUESTIONS = 24


def synth_command(model, data, out):
    return [
        *(sys.executable, "-m", "gmai_rl.cli", "synth", "--model", model, "--data", str(data)),
        *("--out", str(out), "--max-items", str(QUESTIONS), "--k", "2", "--max-new-tokens", "8"),
        *("--ray", "cluster.rollout_workers=2", "rollout.max_batch_prompts=1"),
    ]


def listed(done_file):
    if not done_file.exists():
        return []
    return [json.loads(line)["id"] for line in done_file.read_text().splitlines() if line]


def test_a_synth_killed_mid_way_resumes_without_writing_a_question_twice(
    tiny_model_dir, synthetic_dir, tmp_path
):
    out = tmp_path / "synth.jsonl"
    done_file = tmp_path / "synth.jsonl.done.jsonl"
    command = synth_command(tiny_model_dir, synthetic_dir / "train.jsonl", out)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}
    first = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(listed(done_file)) < 4 and first.poll() is None:
            assert time.monotonic() < deadline, "the synth listed no batch done in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        first.wait()
    cut = listed(done_file)
    assert 4 <= len(cut) < QUESTIONS, "the kill came after the synth had finished"

    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=300)
    done = listed(done_file)
    assert done[: len(cut)] == cut and len(done) == len(set(done)) == QUESTIONS
    records = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(records) == len(set(records))
    assert {r.rsplit("-synth", 1)[0] for r in records} <= set(done)
    provenance = json.loads((tmp_path / "synth.jsonl.provenance.json").read_text())
    assert provenance["generated_by"] == "ray" and provenance["filters"]["k"] == 2
