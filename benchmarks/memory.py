"""Memory of every process of a demo run, per RL step: a leak shows as growth per 100 steps.

    python benchmarks/memory.py [--interval 1] [--warmup 10] [--samples out.csv] [OVERRIDES ...]

OVERRIDES are hydra overrides handed to `python -m gmai_rl.train` (the demo), e.g.
`trainer.steps=100 trainer.seed=1`. The run is a child process in a session of its own, with a
local Ray (RAY_ADDRESS is dropped; `cluster.address` is refused): the driver starts Ray's daemons,
the raylet starts the actors' workers, so the whole run is the child's process tree. Every
`--interval` seconds each process of that tree is sampled: RSS, and its anonymous part (RSS less
file-backed and shared-memory pages, /proc/<pid>/statm): the heap, where a leak grows, without the
mapped model files and libraries. USS is left out: smaps_rollup walks each process's page tables,
~15 ms of kernel time per torch process per read, which cost 15% of a core at 1 s on the demo
(statm: ~1%). A process is named by its title: Ray titles an actor's worker `ray::Learner`
(`ray::Learner.train` inside a call), an idle worker `ray::IDLE`. Rows are
grouped as driver, actor, ray worker (idle or running a task), under a worker (a process an actor
or worker started, e.g. a compiler DeepSpeed calls) and ray system (Ray's daemons: raylet,
gcs_server, the dashboard and its agents, the monitors). Each process is one row, keyed by pid: a
replaced worker is a new row.

Samples are attributed to RL steps through the run's metrics.jsonl, polled as it grows: step k ran
from the moment the record before its own appeared to the moment its own did (so attribution is
as fine as `--interval`; a step shorter than that may get no sample). Steps are numbered as in
metrics.jsonl, from 0. Per process the table gives the peak RSS within the first, middle and last
RL step, the peak over the whole run (start-up, SFT and evaluations included), and the growth in
MiB per 100 RL steps: the least-squares slope of the per-step peaks over steps >= `--warmup`, with
its standard error. On a run without a leak the growth is within a few standard errors of 0.

What it does not see: memory of other nodes (a local run has none), GPU memory, and processes that
leave the tree (none of Ray's do on a local run).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil
from processes import ACTORS, WORKER_SCRIPTS, process_title, stop, tree

MIB = 2**20
KINDS = ("driver", "actor", "ray worker", "under a worker", "ray system")
"""Table order."""
REPORT_LINES = ("held-out accuracy:", "answer format:")
"""The demo's closing lines (gmai_rl.train.report), printed again under the table."""


@dataclass(frozen=True)
class Sample:
    t: float
    """Seconds since the run started."""
    pid: int
    name: str
    """`process_name` of the process at that moment."""
    rss_mib: float
    anon_mib: float
    """Anonymous RSS: RSS less file-backed and shared-memory pages."""
    ppid: int = 0
    """Its parent's pid."""


@dataclass(frozen=True)
class Row:
    kind: str
    name: str
    pid: int
    at_steps: tuple[float | None, float | None, float | None]
    """Peak RSS within the first, middle and last RL step (None: the process had no sample
    there and none on both sides of it)."""
    peak_rss: float
    rss_growth: tuple[float, float | None] | None
    """MiB per 100 RL steps and its standard error; None with fewer than 2 steps to fit."""
    anon_growth: tuple[float, float | None] | None


# --------------------------------------------------------------------------- the pure part


def process_name(argv: Sequence[str]) -> str:
    """A process's short name: its `process_title` with a Ray worker's method left out
    (`ray::Learner.train` -> `ray::Learner`)."""
    title = process_title(argv)
    return title.split(".")[0] if title.startswith("ray::") else title


def kind_of(name: str, is_driver: bool) -> str:
    """driver, actor (one of ACTORS), ray worker (WORKER_SCRIPTS before it takes a title,
    `ray::IDLE`, or running a task: a function's name, `ray::_node_address`) or ray system
    (everything else: `raylet`, `gcs_server`, `dashboard.py`, `ray::RuntimeEnvAgent`)."""
    if is_driver:
        return "driver"
    bare = name.removeprefix("ray::")
    if bare in ACTORS:
        return "actor"
    if name in WORKER_SCRIPTS or (
        name.startswith("ray::") and (bare == "IDLE" or not bare[:1].isupper())
    ):
        return "ray worker"
    return "ray system"


def after_exec(own: Sequence[Sample], parent_name: str | None) -> list[Sample]:
    """A process's samples without those taken between fork and exec, when it still carried its
    parent's image and name (a raylet forked by the driver reads as the driver's ~470 MiB, all
    shared): the leading samples named like the parent go, unless the process never became
    anything else (a forked helper that stays a copy of its parent)."""
    i = 0
    while i < len(own) and own[i].name == parent_name:
        i += 1
    return list(own[i:]) if i < len(own) else list(own)


def worker_above(pid: int, parents: Mapping[int, int], kinds: Mapping[int, str]) -> int | None:
    """The nearest ancestor of `pid` that is an actor or Ray worker: a process one of them
    started (a compiler, a subprocess of its engine) belongs to it, not to Ray's daemons."""
    seen, p = {pid}, parents.get(pid)
    while p is not None and p in kinds and p not in seen:
        if kinds[p] in ("actor", "ray worker"):
            return p
        seen.add(p)
        p = parents.get(p)
    return None


def label(names: Sequence[str]) -> str:
    """The name a process is listed under, from its names over time: a worker is titled
    `ray::IDLE` before and between tasks, so its last other title names it."""
    busy = [n for n in names if n != "ray::IDLE"]
    return busy[-1] if busy else names[-1]


def step_windows(
    events: Iterable[tuple[float, Mapping[str, Any]]],
) -> list[tuple[float, float, int]]:
    """(start, end, step) of each RL step, from metrics.jsonl records and the times they were
    seen: step k ran from when the record before its own was seen (setup, the last SFT step,
    the evaluation before RL, or step k-1) to when its own was seen. Records in file order."""
    windows, previous = [], None
    for t, record in events:
        if record.get("stage") == "rl" and previous is not None:
            windows.append((previous, t, int(record["step"])))
        previous = t
    return windows


def step_at(t: float, windows: Sequence[tuple[float, float, int]]) -> int | None:
    """The RL step running at time t (start < t <= end), None outside every step."""
    i = bisect.bisect_left([end for _, end, _ in windows], t)
    if i < len(windows) and windows[i][0] < t:
        return windows[i][2]
    return None


def per_step_peak(points: Iterable[tuple[int | None, float]]) -> dict[int, float]:
    """step -> the largest value sampled within it (points outside any step are left out)."""
    peaks: dict[int, float] = {}
    for step, value in points:
        if step is not None:
            peaks[step] = max(value, peaks.get(step, value))
    return peaks


def value_near(by_step: Mapping[int, float], step: int) -> float | None:
    """The value at `step`, else at the nearest sampled step (the earlier on a tie); None when
    `step` is outside the steps the process was sampled in (it started later or ended before)."""
    if not by_step or not min(by_step) <= step <= max(by_step):
        return None
    nearest = min(by_step, key=lambda s: (abs(s - step), s))
    return by_step[nearest]


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float | None] | None:
    """Least-squares slope of ys on xs and its standard error (None from 2 points); None with
    fewer than 2 distinct xs."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if n == 2:
        return slope, None
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(residual / (n - 2) / sxx)


def growth_per_100(by_step: Mapping[int, float], warmup: int) -> tuple[float, float | None] | None:
    """Growth of the per-step peaks in units per 100 RL steps, fitted over steps >= warmup."""
    steps = sorted(s for s in by_step if s >= warmup)
    fit = fit_slope(steps, [by_step[s] for s in steps])
    if fit is None:
        return None
    slope, se = fit
    return 100 * slope, None if se is None else 100 * se


def summarise(
    samples: Sequence[Sample],
    windows: Sequence[tuple[float, float, int]],
    driver_pid: int,
    warmup: int,
) -> list[Row]:
    """One row per process sampled, driver first, then actors, Ray's workers, the processes
    those started, and Ray's daemons."""
    steps = sorted(step for _, _, step in windows)
    marks = (steps[0], steps[(len(steps) - 1) // 2], steps[-1]) if steps else None
    by_pid: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_pid[s.pid].append(s)
    first_names = {pid: label([s.name for s in own]) for pid, own in by_pid.items()}
    by_pid = {
        pid: after_exec(own, first_names.get(own[0].ppid)) if pid != driver_pid else own
        for pid, own in by_pid.items()
    }
    names = {pid: label([s.name for s in own]) for pid, own in by_pid.items()}
    kinds = {pid: kind_of(name, pid == driver_pid) for pid, name in names.items()}
    parents = {pid: own[-1].ppid for pid, own in by_pid.items()}
    rows = []
    for pid, own in by_pid.items():
        name, kind = names[pid], kinds[pid]
        if kind == "ray system" and (worker := worker_above(pid, parents, kinds)) is not None:
            kind, name = "under a worker", f"{name} (of {names[worker]} {worker})"
        rss = per_step_peak((step_at(s.t, windows), s.rss_mib) for s in own)
        anon = per_step_peak((step_at(s.t, windows), s.anon_mib) for s in own)
        at = tuple(value_near(rss, m) for m in marks) if marks else (None, None, None)
        rows.append(
            Row(
                kind=kind,
                name=name,
                pid=pid,
                at_steps=(at[0], at[1], at[2]),
                peak_rss=max(s.rss_mib for s in own),
                rss_growth=growth_per_100(rss, warmup),
                anon_growth=growth_per_100(anon, warmup),
            )
        )
    return sorted(rows, key=lambda r: (KINDS.index(r.kind), r.name, r.pid))


def render(rows: Sequence[Row], windows: Sequence[tuple[float, float, int]], warmup: int) -> str:
    """The markdown table."""
    steps = sorted(step for _, _, step in windows)
    marks = (steps[0], steps[(len(steps) - 1) // 2], steps[-1]) if steps else ("-",) * 3

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def growth(fit: tuple[float, float | None] | None) -> str:
        if fit is None:
            return "-"
        return f"{fit[0]:+.1f}" + ("" if fit[1] is None else f" ± {fit[1]:.1f}")

    lines = [
        f"| kind | process | pid | RSS step {marks[0]} | RSS step {marks[1]} | "
        f"RSS step {marks[2]} | peak RSS | RSS growth /100 steps | anon growth /100 steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.name} | {r.pid} | {mib(r.at_steps[0])} | {mib(r.at_steps[1])} | "
            f"{mib(r.at_steps[2])} | {mib(r.peak_rss)} | {growth(r.rss_growth)} | "
            f"{growth(r.anon_growth)} |"
        )
    lines.append(
        f"\nMiB. RSS at a step: its peak within that step (steps as numbered in metrics.jsonl). "
        f"Growth: slope of the per-step peaks over steps >= {warmup}, ± its standard error."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------ the measurement


def sample_tree(root: psutil.Process, t: float) -> list[Sample]:
    """RSS and anonymous RSS of `root` and every process below it at time t."""
    samples = []
    for p in tree(root):
        try:
            with p.oneshot():
                name, ppid, mem = process_name(p.cmdline()), p.ppid(), p.memory_info()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # it ended between the listing and the read
        # statm's "shared" counts resident file-backed and shared-memory pages.
        samples.append(Sample(t, p.pid, name, mem.rss / MIB, (mem.rss - mem.shared) / MIB, ppid))
    return samples


def read_new_records(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete lines written to metrics.jsonl since byte `offset`, and the new offset."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()], offset + len(complete)


def echo(stream: TextIO, kept: list[str]) -> None:
    """Pass the run's stdout on to our stderr (stdout is the table's), keeping its report."""
    for line in stream:
        sys.stderr.write(line)
        if line.startswith(REPORT_LINES):
            kept.append(line.rstrip())


def measure(
    overrides: list[str], out: Path, interval: float
) -> tuple[int, int, list[Sample], list[tuple[float, dict[str, Any]]], list[str]]:
    """Run the demo and sample it; returns its exit status, its pid, the samples, the
    metrics.jsonl records with the times they were seen, and its report lines."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "gmai_rl.train", *overrides]
    metrics = out / "metrics.jsonl"
    samples: list[Sample] = []
    events: list[tuple[float, dict[str, Any]]] = []
    report: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    reader = threading.Thread(target=echo, args=(proc.stdout, report), daemon=True)
    reader.start()
    offset = 0
    try:
        root = psutil.Process(proc.pid)
        for tick in itertools.count(1):
            samples += sample_tree(root, time.monotonic() - started)
            records, offset = read_new_records(metrics, offset)
            seen = time.monotonic() - started
            events += [(seen, r) for r in records]
            try:  # on a fixed grid: the time a sample takes does not stretch the interval
                proc.wait(timeout=max(0.0, tick * interval - (time.monotonic() - started)))
                break
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # stop the run, and still print what was measured
        print("interrupted: stopping the run", file=sys.stderr)
    finally:
        if proc.poll() is None:
            stop(proc)
        try:  # anything of the run still alive in its group (normally nothing)
            os.killpg(proc.pid, signal.SIGKILL)
            print(f"killed processes left in the run's group {proc.pid}", file=sys.stderr)
        except ProcessLookupError:
            pass
    reader.join(timeout=10)
    records, offset = read_new_records(metrics, offset)
    events += [(time.monotonic() - started, r) for r in records]
    return proc.returncode, proc.pid, samples, events, report


def write_samples(
    path: Path, samples: Sequence[Sample], windows: Sequence[tuple[float, float, int]]
) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "pid", "process", "rl_step", "rss_mib", "anon_mib"])
        for s in samples:
            step = step_at(s.t, windows)
            writer.writerow(
                [
                    f"{s.t:.2f}",
                    s.pid,
                    s.name,
                    "" if step is None else step,
                    f"{s.rss_mib:.1f}",
                    f"{s.anon_mib:.1f}",
                ]
            )


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C and SIGTERM (`timeout`, kill) stop the run, then print what was measured. Handled,
    # not inherited: a shell starting this in the background ignores SIGINT, and an ignored
    # signal stays ignored in the run, which Ray would then outlive.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--warmup", type=int, default=10, help="first RL step of the fit")
    parser.add_argument("--samples", type=Path, help="write every sample to this CSV file")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for gmai_rl.train")
    args = parser.parse_args()
    if any(o.split("=")[0].lstrip("+~") == "cluster.address" for o in args.overrides):
        parser.error("cluster.address: only a local Ray run is one process tree to sample")
    given = [o for o in args.overrides if o.startswith("trainer.output_dir=")]
    with tempfile.TemporaryDirectory(prefix="gmai-memory-") as tmp:
        out = Path(given[-1].split("=", 1)[1]).expanduser().resolve() if given else Path(tmp)
        # hydra's own run folder (.hydra/, the log) goes beside metrics.jsonl, not to outputs/.
        ours = {"hydra.run.dir": out, "trainer.output_dir": out}
        given_keys = {o.split("=")[0] for o in args.overrides}
        overrides = [f"{k}={v}" for k, v in ours.items() if k not in given_keys]
        overrides += args.overrides
        rc, driver, samples, events, report = measure(overrides, out, args.interval)
    windows = step_windows(events)
    rows = summarise(samples, windows, driver, args.warmup)
    print(render(rows, windows, args.warmup))
    duration = max((s.t for s in samples), default=0.0)
    print(
        f"\n{len(samples)} samples every {args.interval:g} s over {duration:.0f} s "
        f"(sampling took {time.process_time():.0f} s of CPU); "
        f"{len(windows)} RL steps seen in metrics.jsonl."
    )
    if report:
        print("\n" + "\n".join(report))
    if args.samples:
        write_samples(args.samples, samples, windows)
    if rc:
        sys.exit(f"the run failed (exit status {rc})")


if __name__ == "__main__":
    main()
