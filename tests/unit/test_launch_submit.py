"""launch/submit.sh turns a user's command line into a `ray job submit` whose outputs land in an
absolute folder outside the job's temporary copy of the checkout (run against a stand-in `ray`
that records what it was asked)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_RAY = f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "auth": os.environ.get("RAY_AUTH_MODE"),
                  "address": os.environ.get("RAY_ADDRESS")}}))
"""


@pytest.fixture
def submit(tmp_path):
    """Run a copy of launch/submit.sh in a checkout without .venv, with the stand-in `ray` first
    on PATH; returns (what ray was asked: argv, auth, address; the script's stderr)."""
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "submit.sh", checkout / "launch" / "submit.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(stat.S_IRWXU)
    cwd = tmp_path / "here"
    cwd.mkdir()

    def run(*args, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        base["PATH"] = f"{bin_dir}{os.pathsep}{base['PATH']}"
        done = subprocess.run(
            [str(checkout / "launch" / "submit.sh"), *args],
            cwd=cwd,
            env={**base, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        asked = json.loads(done.stdout) if done.returncode == 0 else None
        return asked, done.stderr, done.returncode

    run.checkout, run.cwd = checkout, cwd
    return run


def entrypoint(asked):
    argv = asked["argv"]
    return argv[argv.index("--") + 1 :]


def test_without_an_output_dir_the_run_goes_to_the_checkouts_outputs(submit):
    asked, stderr, _ = submit("trainer.steps=10")
    command = entrypoint(asked)
    assert command[:4] == ["python", "-m", "gmai_rl.train", "trainer.steps=10"]
    (run_dir,) = [a.split("=", 1)[1] for a in command if a.startswith("hydra.run.dir=")]
    assert re.fullmatch(rf"{submit.checkout}/outputs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d", run_dir)
    assert f"outputs: {run_dir}" in stderr


def test_a_relative_output_dir_is_taken_from_where_the_user_is(submit):
    asked, stderr, _ = submit("trainer.output_dir=runs/a")
    out = f"{submit.cwd}/runs/a"
    assert entrypoint(asked)[3:] == [f"trainer.output_dir={out}", f"hydra.run.dir={out}"]
    assert f"outputs: {out}" in stderr


def test_a_sweep_gets_an_absolute_sweep_folder(submit):
    asked, stderr, _ = submit("-m", "trainer.seed=0,1")
    (sweep,) = [a.split("=", 1)[1] for a in entrypoint(asked) if a.startswith("hydra.sweep.dir=")]
    assert sweep.startswith(f"{submit.checkout}/multirun/")
    assert f"outputs: {sweep}/<job number>" in stderr
    _, stderr, code = submit("-m", "trainer.seed=0,1", "trainer.output_dir=/shared/x")
    assert code == 2 and "set hydra.sweep.dir instead" in stderr


def test_ray_options_go_before_the_entrypoint_and_the_env_travels(submit):
    asked, _, _ = submit(
        "--no-wait", "--submission-id=x", "--", "trainer.steps=1", GMAI_RL_CACHE="cache"
    )
    argv = asked["argv"]
    assert argv[:3] == ["job", "submit", "--address"]
    assert argv[argv.index("--") - 2 : argv.index("--")] == ["--no-wait", "--submission-id=x"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"] == {
        "PYTHONPATH": "src",
        "TOKENIZERS_PARALLELISM": "false",
        "GMAI_RL_CACHE": f"{submit.cwd}/cache",
    }
    assert "outputs" in runtime_env["excludes"]


def test_the_local_cluster_is_the_default_with_its_auth_mode(submit):
    asked, _, _ = submit()
    assert (asked["address"], asked["auth"]) == ("http://127.0.0.1:8265", "disabled")
    asked, _, _ = submit(RAY_ADDRESS="http://head:8265")
    assert (asked["address"], asked["auth"]) == ("http://head:8265", None)  # the user's to set
