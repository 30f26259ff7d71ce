"""The job tier (make test-job): training as a user launches it, in processes of its own.

A local Ray cluster started the way a user starts one (`ray start --head`, authentication
disabled for both the cluster and the submitting client), jobs submitted with
launch/submit.sh, hydra multiruns of `python -m gmai_rl.train`, and a run killed mid-job and
resumed from its checkpoint. The cluster gets its own temporary folder and ports, so it neither
meets nor disturbs another Ray on the machine, and it is stopped process by process (the
processes of its session and their children) rather than with `ray stop`, which would stop every
Ray on the machine.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs import JOB_CPUS, HeadNode, cluster_env, free_ports, stop_session


@pytest.fixture(scope="session")
def ray_head() -> Iterator[HeadNode]:
    """A local Ray head node started with `ray start --head`, stopped whatever happens."""
    # Short: Ray's socket paths live under it, and a Unix socket path has ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="gmai-ray-", dir="/tmp"))
    gcs, dashboard, client, agent = free_ports(4)
    env = cluster_env(f"http://127.0.0.1:{dashboard}")
    # Its own session: every process `ray start` leaves behind can be found and stopped.
    start = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            f"--num-cpus={JOB_CPUS}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = start.communicate(timeout=300)
        if start.returncode != 0:
            pytest.fail(f"ray start failed:\n{output}")
        yield HeadNode(env["RAY_ADDRESS"], env, temp_dir)
    finally:
        stop_session(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
