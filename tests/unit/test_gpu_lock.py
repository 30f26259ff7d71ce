"""The GPU lock's tooling (tools/gpu_lock.py) and the checked-in lock files.

The resolver run itself needs PyPI and takes minutes (make check-gpu-lock, in CI); these check
the parsing and comparison it relies on, and that the lock files agree with each other.
"""

import os

import pytest

from support import ROOT, load_script

gpu_lock = load_script("tools/gpu_lock.py", "gpu_lock")

VLLM_DIFFERS = {"torch", "torchvision", "transformers"}
"""Pinned in both locks at other versions because vLLM 0.32.0 requires it (constraints-gpu.in)."""


def test_parse_lock_reads_pins_under_canonical_names():
    text = "# header\n\nPyYAML==6.0.4\ntyping_extensions==4.16.0  # why\ntorch == 2.13.0\n"
    assert gpu_lock.parse_lock(text) == {
        "pyyaml": "6.0.4",
        "typing-extensions": "4.16.0",
        "torch": "2.13.0",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("torch>=2.13\n", "line 1"),
        ("torch==2.13.0; sys_platform == 'linux'\n", "not a `name==version` pin"),
        ("ray[default]==2.60.0\n", "not a `name==version` pin"),
        ("typing_extensions==4.16.0\ntyping-extensions==4.16.0\n", "pinned twice"),
    ],
)
def test_parse_lock_rejects_anything_but_exact_pins(text, message):
    with pytest.raises(ValueError, match=message):
        gpu_lock.parse_lock(text)


def test_pins_from_report_leaves_out_the_project():
    report = {
        "install": [
            {"metadata": {"name": "gmai-rl", "version": "0.1.0"}},
            {"metadata": {"name": "Jinja2", "version": "3.1.6"}},
            {"metadata": {"name": "torch", "version": "2.13.0"}},
        ]
    }
    assert gpu_lock.pins_from_report(report, ["gmai_rl"]) == {"jinja2": "3.1.6", "torch": "2.13.0"}


def test_lock_problems_names_every_difference():
    lock = {"torch": "2.13.0", "six": "1.17.0", "numpy": "2.3.5"}
    resolved = {"torch": "2.14.1", "numpy": "2.3.5", "sympy": "1.14.0"}
    assert gpu_lock.lock_problems(lock, resolved) == [
        "six==1.17.0 is pinned but not needed (stale pin)",
        "sympy 1.14.0 is needed but not pinned (the lock is incomplete)",
        "torch resolved to 2.14.1, the lock pins 2.13.0",
    ]
    assert gpu_lock.lock_problems(lock, dict(lock)) == []


def test_render_lock_round_trips_sorted():
    pins = {"torch": "2.13.0", "aiohttp": "3.14.5"}
    text = gpu_lock.render_lock(pins, header="# h")
    assert text == "# h\naiohttp==3.14.5\ntorch==2.13.0\n"
    assert gpu_lock.parse_lock(text) == pins


def test_traffic_counts_requests_and_body_bytes():
    log = (
        'https://pypi.org:443 "GET /simple/six/ HTTP/1.1" 200 18569\n'
        "  Found link https://files.pythonhosted.org/six-1.17.0.tar.gz\n"
        'https://files.pythonhosted.org:443 "HEAD /packages/torch.whl HTTP/1.1" 200 0\n'
        'https://files.pythonhosted.org:443 "GET /packages/torch.whl HTTP/1.1" 206 10240\n'
        'https://pypi.org:443 "GET /simple/x/ HTTP/1.1" 304 None\n'
    )
    requests, megabytes = gpu_lock.traffic(log)
    assert requests == 4
    assert megabytes == pytest.approx((18569 + 10240) / 1e6)


def test_failure_excerpt_keeps_pips_messages_and_drops_the_debug_noise():
    log = (
        "  Found link https://files.pythonhosted.org/urllib3-1.21.tar.gz, version: 1.21\n"
        "The conflict is caused by:\n"
        "    The user requested urllib3==1.21\n"
        "    requests 2.34.2 depends on urllib3<3 and >=1.26\n"
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/...\n"
        "Exception information:\n"
        "Traceback (most recent call last):\n"
        '  File "resolvers.py", line 1, in resolve\n'
    )
    assert gpu_lock.failure_excerpt(log).splitlines() == [
        "The conflict is caused by:",
        "    The user requested urllib3==1.21",
        "    requests 2.34.2 depends on urllib3<3 and >=1.26",
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/...",
        "Exception information:",
    ]
    assert gpu_lock.failure_excerpt(log, lines=1) == "Exception information:"


def test_isolated_env_drops_the_machines_pip_configuration():
    env = gpu_lock.isolated_env(
        {
            "PATH": "/bin",
            "PIP_CERT": "/etc/ca.pem",
            "PIP_CONSTRAINT": "/etc/xdg/pip/constraints.txt",
            "PIP_FIND_LINKS": "/opt/wheels",
            "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple",
            "PIP_INDEX_URL": "https://mirror.example/simple",
        }
    )
    assert env["PATH"] == "/bin" and env["PIP_CERT"] == "/etc/ca.pem"
    assert env["PIP_CONFIG_FILE"] == os.devnull
    assert not {"PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"} & set(
        env
    )


def _pins(name):
    return gpu_lock.parse_lock((ROOT / name).read_text())


def test_the_gpu_lock_holds_its_inputs_pins():
    """Every top-level pin of constraints-gpu.in is in the lock at that version: an edited input
    without `make lock-gpu` fails here, before CI's resolver run."""
    lock, inputs = _pins("constraints-gpu.txt"), _pins("constraints-gpu.in")
    assert {n: lock.get(n) for n in inputs} == inputs


def test_the_gpu_inputs_follow_the_cpu_lock_except_where_vllm_requires_otherwise():
    cpu, inputs = _pins("constraints.txt"), _pins("constraints-gpu.in")
    differ = {n for n in cpu.keys() & inputs.keys() if cpu[n] != inputs[n]}
    assert differ == VLLM_DIFFERS
    # Every project dependency the CPU lock pins is pinned for the GPU too, numpy aside (vLLM's
    # mistral_common caps it below the CPU lock's; the resolver picks it).
    assert cpu.keys() - inputs.keys() == {"numpy"}
