"""The GPU node's lock, constraints-gpu.txt: compile it with pip's resolver, check that it resolves.

    python tools/gpu_lock.py compile   # rewrite constraints-gpu.txt (make lock-gpu)
    python tools/gpu_lock.py check     # fail unless the lock resolves to exactly its pins (CI)

Both run pip's resolver (`pip install --dry-run --report`) on the project with its `vllm` and `dev`
extras, against PyPI alone, in a scratch virtual environment with a pinned pip: `compile` under
the top-level pins of constraints-gpu.in, `check` under the lock itself, which must come back
unchanged: every pinned package resolved at its pin, nothing missing, nothing left over.

No wheel is downloaded whole. PyPI's simple index here serves no PEP 658 metadata files, so
without help pip would download every wheel to read its METADATA (4 GB for this lock: torch,
vLLM, the CUDA libraries); `--use-feature=fast-deps` makes it read only the end of each wheel
(the zip directory and the .dist-info) with HTTP range requests. The check counts what pip
fetched and fails past DOWNLOAD_BUDGET_MB, so a silent fallback to whole wheels is caught.

The machine's own pip configuration is set aside (config files, extra indexes, find-links, a
global constraints file): the lock is what PyPI serves a GPU node, not what a local wheel cache
holds. Only transport settings (certificate, timeout, proxy) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints-gpu.txt"
INPUTS = ROOT / "constraints-gpu.in"
PROJECT = ".[vllm,dev]"
"""What a GPU node installs (make install-gpu), resolved from the repository root."""
INDEX_URL = "https://pypi.org/simple"
PIP = "pip==26.3"
"""The resolver's version: the lock is what this pip resolves (the vLLM environment's pip too)."""
DOWNLOAD_BUDGET_MB = 400.0
"""Index pages and wheel tails come to ~100 MB; one wheel fetched whole (torch: 527 MB) exceeds it."""
KEEP_ENV = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_PROXY", "PIP_RETRIES")
"""PIP_* variables that only say how to reach the index, kept; every other one is dropped."""

HEADER = """\
# The GPU node's lock (make install-gpu): vLLM 0.32.0 with its CUDA torch, DeepSpeed, Ray and this
# project's dependencies, for CPython 3.11 on x86_64 Linux, as pip's resolver picks them from PyPI.
# Installed with `pip install -c constraints-gpu.txt -e '.[vllm,dev]'`; CI checks that pip resolves
# exactly these pins (make check-gpu-lock). Generated, do not edit: change constraints-gpu.in (the
# top-level pins) and run `make lock-gpu`, which runs tools/gpu_lock.py compile.
#
# It differs from the CPU lock (constraints.txt) where vLLM 0.32.0 requires it: torch 2.13.0 (the
# CUDA 13 build PyPI serves for Linux), torchvision 0.28.0, transformers < 5.20 and numpy < 2.4
# (mistral_common). The learner's numerics tests run on this torch/transformers pair in the vLLM
# test environment (make test-vllm).
#
# Attention: SDPA (in torch) is the backend of every shipped config; vLLM brings its own kernels
# (FlashInfer, pinned here, and the FlashAttention build inside its wheel). The flash-attn package
# is not in the lock: PyPI has it only as a source distribution that compiles against the node's
# CUDA toolkit with nvcc (hours, and not resolvable without building), so pip could not check a
# lock that holds it. It stays optional: install it on the node and pass
# model.attn_implementation=flash_attention_2 (README, "Training on real data and models").
#
# deepspeed is a source distribution on PyPI; pip builds it on install without compiling its ops
# (DeepSpeed builds an op just in time when one is used; the learner's optimizer is torch's AdamW)."""


@dataclass(frozen=True)
class Resolution:
    """What one resolver run gave: {normalized name: version}, and what it cost."""

    pins: dict[str, str]
    seconds: float
    requests: int
    downloaded_mb: float


def canonical(name: str) -> str:
    """PEP 503 normalized name: `PyYAML` and `pyyaml`, `typing_extensions` and
    `typing-extensions` are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """{normalized name: version} of a lock's `name==version` lines (comments, blanks skipped).

    Raises ValueError naming the line for anything else: the lock pins exact versions only.
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;,]+)", line)
        if match is None:
            raise ValueError(f"line {number}: {raw!r} is not a `name==version` pin")
        name = canonical(match.group(1))
        if name in pins:
            raise ValueError(f"line {number}: {match.group(1)} is pinned twice")
        pins[name] = match.group(2)
    return pins


def pins_from_report(report: Mapping[str, object], exclude: Iterable[str] = ()) -> dict[str, str]:
    """{normalized name: version} of everything a `pip install --report` would install, less
    `exclude` (the project itself)."""
    skip = {canonical(n) for n in exclude}
    pins: dict[str, str] = {}
    for item in report["install"]:  # type: ignore[attr-defined]
        metadata = item["metadata"]
        name = canonical(metadata["name"])
        if name not in skip:
            pins[name] = metadata["version"]
    return pins


def lock_problems(lock: Mapping[str, str], resolved: Mapping[str, str]) -> list[str]:
    """Every way `resolved` differs from `lock`, one line each; empty when they are equal."""
    problems = []
    for name in sorted(lock.keys() | resolved.keys()):
        pinned, got = lock.get(name), resolved.get(name)
        if got is None:
            problems.append(f"{name}=={pinned} is pinned but not needed (stale pin)")
        elif pinned is None:
            problems.append(f"{name} {got} is needed but not pinned (the lock is incomplete)")
        elif pinned != got:
            problems.append(f"{name} resolved to {got}, the lock pins {pinned}")
    return problems


def render_lock(pins: Mapping[str, str], header: str = HEADER) -> str:
    """The lock file's text: the header, then one `name==version` per line, sorted by name."""
    return header + "\n" + "".join(f"{n}=={pins[n]}\n" for n in sorted(pins))


_HTTP_LINE = re.compile(r'"(?:GET|HEAD) \S+ HTTP/[\d.]+" (\d{3}) (\d+|None)')


def traffic(log: str) -> tuple[int, float]:
    """(requests, MB of response bodies) from pip's -vv log (urllib3's one line per response:
    `https://host:443 "GET /path HTTP/1.1" 206 10240`); a body of unknown length counts 0."""
    sizes = [int(size) for _, size in _HTTP_LINE.findall(log) if size != "None"]
    return len(_HTTP_LINE.findall(log)), sum(sizes) / 1e6


def failure_excerpt(log: str, lines: int = 40) -> str:
    """The end of a failed pip run's log as a person needs it: pip's own messages (the conflict,
    the connection errors), without the -vv noise of index links and the tracebacks that -vv
    appends after its ERROR lines."""
    kept: list[str] = []
    seen_error = False
    for line in log.splitlines():
        if seen_error and line.startswith("Traceback (most recent call last):"):
            break
        seen_error = seen_error or line.startswith("ERROR:")
        if not line.lstrip().startswith(("Found link", "Skipping link", "Link requires")):
            kept.append(line)
    return "\n".join(kept[-lines:])


def isolated_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the machine's pip configuration: no config files, and of the PIP_*
    variables only those in KEEP_ENV."""
    env = {k: v for k, v in environ.items() if not k.startswith("PIP_") or k in KEEP_ENV}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no config file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def resolve(constraints: Path, workdir: Path) -> Resolution:
    """Run pip's resolver on PROJECT under `constraints`, in a scratch venv under `workdir`."""
    env = isolated_env(os.environ)
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    network = ["--index-url", INDEX_URL, "--timeout", "60", "--retries", "3"]
    _pip(python, ["install", "--quiet", *network, PIP], env, workdir / "pip.log")
    report_path, log_path = workdir / "report.json", workdir / "resolve.log"
    start = time.monotonic()
    _pip(
        python,
        [
            "install",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report_path),
            "--use-feature=fast-deps",
            *network,
            "-vv",  # urllib3's per-request lines, for the download count
            "-c",
            str(constraints),
            PROJECT,
        ],
        env,
        log_path,
    )
    seconds = time.monotonic() - start
    requests, megabytes = traffic(log_path.read_text(errors="replace"))
    report = json.loads(report_path.read_text())
    return Resolution(pins_from_report(report, [_project_name()]), seconds, requests, megabytes)


def _pip(python: str, args: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(
            [python, "-m", "pip", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise SystemExit(
            f"{failure_excerpt(log.read_text(errors='replace'))}\npip {args[0]} failed (exit {done.returncode}): the GPU lock could not be "
            f"resolved. If the lines above show connection errors, {INDEX_URL} is unreachable "
            "from here: this check needs PyPI and does not pass without it."
        )


def _project_name() -> str:
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["name"]


def _summary(r: Resolution) -> str:
    return (
        f"{len(r.pins)} packages resolved in {r.seconds:.0f} s; pip fetched "
        f"{r.downloaded_mb:.0f} MB in {r.requests} requests (index pages and wheel tails)"
    )


def _check_budget(r: Resolution) -> None:
    if r.downloaded_mb > DOWNLOAD_BUDGET_MB:
        raise SystemExit(
            f"{_summary(r)}: over the {DOWNLOAD_BUDGET_MB:.0f} MB budget. pip downloaded whole "
            "wheels (the index stopped honouring range requests, or fast-deps changed): "
            "the check must not download the CUDA stack."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["compile", "check"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-lock-") as tmp:
        if args.command == "compile":
            result = resolve(INPUTS, Path(tmp))
            LOCK.write_text(render_lock(result.pins))
            print(f"wrote {LOCK.name}: {_summary(result)}")
            _check_budget(result)
            return
        lock = parse_lock(LOCK.read_text())
        result = resolve(LOCK, Path(tmp))
        print(_summary(result))
        _check_budget(result)
        problems = lock_problems(lock, result.pins)
        if problems:
            raise SystemExit(
                f"{LOCK.name} does not resolve to its own pins:\n  "
                + "\n  ".join(problems)
                + "\nRegenerate it with `make lock-gpu`."
            )
        print(f"{LOCK.name}: pip's resolver accepts all {len(lock)} pins as they are")


if __name__ == "__main__":
    main()
