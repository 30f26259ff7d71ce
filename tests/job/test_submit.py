"""`launch/submit.sh` on a local cluster: the job runs every stage and its outputs outlive it,
in the absolute folder it was given; the demo's artifacts go to the cache, not the job's copy of
the checkout."""

import re
import subprocess
import time
import uuid

import pytest

from jobs import REPO, TINY_RUN, wait_for_job

pytestmark = [pytest.mark.job, pytest.mark.timeout(1500)]
ray = pytest.importorskip("ray")

JOB_TIMEOUT_S = 1200


def test_a_submitted_job_writes_its_outputs_where_configured(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    out, cache = tmp_path / "run", tmp_path / "cache"
    job_id = f"gmai-rl-test-{uuid.uuid4().hex[:8]}"
    submitted = time.time()
    submit = subprocess.run(
        [
            str(REPO / "launch" / "submit.sh"),
            "--no-wait",
            f"--submission-id={job_id}",
            "--",
            *TINY_RUN,
            f"trainer.output_dir={out}",
        ],
        env={**ray_head.env, "GMAI_RL_CACHE": str(cache)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert f"outputs: {out}" in submit.stderr

    client = JobSubmissionClient(ray_head.dashboard)
    status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        print(logs)
    assert status == "SUCCEEDED"

    first_step = re.search(r"first RL step done at unix time ([0-9.]+)", logs)
    assert first_step, logs
    print(f"submit to first RL step: {float(first_step.group(1)) - submitted:.1f} s")

    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 4  # 2 SFT + 2 RL steps
    assert (out / "eval.json").exists()
    assert (out / "final" / "config.json").exists()
    assert (out / ".hydra" / "config.yaml").exists()  # hydra's run folder is the same
    assert (cache / "tiny-qwen2.5-vl-seed0" / "config.json").exists()
    assert len(list((cache / "synthetic").glob("*/train.jsonl"))) == 1
    packages = list(ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*"))
    assert packages  # the job ran in a copy of the checkout ...
    assert all(not (p / "outputs").exists() for p in packages)  # ... and wrote nothing there


def test_a_relative_output_dir_inside_the_job_copy_is_refused_at_start_up(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard)
    # What a bare `ray job submit --working-dir .` does: hydra's relative run folder.
    job_id = client.submit_job(
        entrypoint=f"python -m gmai_rl.train {' '.join(TINY_RUN)}",
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".git", ".venv", ".venv-vllm", "artifacts", "outputs", "multirun"],
            "env_vars": {"PYTHONPATH": "src", "GMAI_RL_CACHE": str(tmp_path / "cache")},
        },
    )
    assert wait_for_job(client, job_id, 600) == "FAILED"
    logs = client.get_job_logs(job_id)
    assert "trainer.output_dir=" in logs and "temporary working directory" in logs, logs
    assert not (tmp_path / "cache").exists()  # stopped before building anything
