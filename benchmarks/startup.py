"""Where a run's start-up goes: the setup line's seconds, and the CPU every process spends on it.

    python benchmarks/startup.py [--repeat 3] [--interval 0.1] [OVERRIDES ...]

Each repeat runs `python -m gmai_rl.train` (the demo, cut to one SFT and one RL step, plus any
OVERRIDES) in a session of its own with a local Ray, and stops it once metrics.jsonl holds its
first record, {"stage": "setup", "data_seconds", "startup_seconds"}: start-up is the pre-flight
plan, `ray.init` and `Cluster.start` (placement group, actors' constructors, the weight-sync
group), after the data is prepared. Every `--interval` seconds each process of the run's tree is
sampled: its title and the CPU seconds it has used (user + system). Processes are grouped as
memory.py groups them: the driver, each actor class (Ray titles a worker `ray::Learner`, and
`ray::Learner.__init__` while its constructor runs), Ray's workers that host no actor (prestarted
`ray::IDLE` ones, task workers such as `ray::_node_address`) and Ray's daemons (raylet,
gcs_server, dashboard.py, agents, monitors).

Why CPU: on a 2-core machine start-up is CPU-bound (every actor imports torch, torchvision,
transformers in parallel), so the CPU all processes spend, halved, is a floor under the wall
time; and CPU seconds move far less than wall seconds when other work shares the cores (the
load average at the start and end of each repeat is printed to judge that). Python writes no
bytecode cache under PYTHONDONTWRITEBYTECODE, and then every process compiles from source each
module it imports that has no cache yet (`make install` caches what a run imports): a repeat
says which.

What it does not see: processes shorter than `--interval` (a compiler DeepSpeed runs to probe
an op), and a cluster given by `cluster.address` (refused: its processes are not the run's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from processes import ACTORS, WORKER_SCRIPTS, process_title, stop, tree

DEMO_CUT = (
    "trainer.steps=1",
    "sft.steps=1",
    "trainer.eval_every=0",
    "data.max_eval_items=8",
)
"""The run is stopped at its setup record; these only keep it short should it get further."""
GROUPS = ("driver", *ACTORS, "ray worker (no actor)", "ray daemons")
"""Table order."""


@dataclass
class Process:
    """What the samples saw of one process."""

    pid: int
    first_seen: float
    """Seconds from the run's start to its first sample."""
    ppid: int = 0
    titles: list[str] = field(default_factory=list)
    """Its names over time, without repeats (`process_title`)."""
    cpu: float = 0.0
    """CPU seconds at its last sample."""
    init: tuple[float, float] | None = None
    """For an actor: its constructor's span, from the first sample titled `ray::<Class>.__init__`
    to the first after it (`constructor_span`), in seconds from the run's start."""


# --------------------------------------------------------------------------- the pure part


def group_of(process: Process, driver_pid: int) -> str:
    """The table row a process counts in (GROUPS): its actor class once it took one's title."""
    if process.pid == driver_pid:
        return "driver"
    for title in process.titles:
        bare = title.removeprefix("ray::").split(".")[0]
        if title.startswith("ray::") and bare in ACTORS:
            return bare
    # Ray's agents are titled too (`ray::DashboardAgent`), but are no workers.
    worker = any(t in WORKER_SCRIPTS or t.startswith("ray::") for t in process.titles)
    agent = any(t.startswith("ray::") and t.endswith("Agent") for t in process.titles)
    return "ray worker (no actor)" if worker and not agent else "ray daemons"


def constructor_span(titles_seen: Sequence[tuple[float, str]]) -> tuple[float, float] | None:
    """When an actor's constructor ran: from the first sample titled `ray::<Class>.__init__` to
    the first whose title is the actor's but no longer that (idle `ray::<Class>`, or a method's
    title). Ray gives a worker the title as it starts the constructor, after the worker's own
    start (and, for a worker Ray started ahead, its idle wait). None when no sample caught the
    constructor running and ending."""
    began = None
    for t, title in titles_seen:
        bare = title.removeprefix("ray::")
        if title.startswith("ray::") and bare.endswith(".__init__"):
            began = t if began is None else began
        elif began is not None and title.startswith("ray::") and bare.split(".")[0] in ACTORS:
            return began, t
    return None


@dataclass(frozen=True)
class Summary:
    startup_s: float
    data_s: float
    cpu: dict[str, float]
    """CPU seconds by group (GROUPS)."""
    count: dict[str, int]
    """Processes by group."""
    constructors: dict[str, list[float]]
    """Each actor class's constructor wall times (`Process.init`)."""
    load: tuple[float, float]
    """1-minute load average at the start and at the end."""
    bytecode: bool
    """Whether Python may write bytecode caches (PYTHONDONTWRITEBYTECODE unset)."""


def summarise(
    processes: Mapping[int, Process],
    driver_pid: int,
    setup: Mapping[str, float],
    load: tuple[float, float],
    bytecode: bool,
) -> Summary:
    cpu: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    constructors: dict[str, list[float]] = defaultdict(list)
    groups = {pid: group_of(p, driver_pid) for pid, p in processes.items()}
    workers = (*ACTORS, "ray worker (no actor)")
    for pid, p in processes.items():
        group = groups[pid]
        if groups.get(p.ppid) in workers:
            # A process a worker started (a compiler DeepSpeed runs, ldconfig): its CPU is the
            # worker's. Forked, it carries the worker's title until it execs.
            cpu[groups[p.ppid]] += p.cpu
            continue
        cpu[group] += p.cpu
        count[group] += 1
        if group in ACTORS and p.init is not None:
            constructors[group].append(p.init[1] - p.init[0])
    return Summary(
        float(setup["startup_seconds"]),
        float(setup["data_seconds"]),
        dict(cpu),
        dict(count),
        dict(constructors),
        load,
        bytecode,
    )


def render(summaries: Sequence[Summary]) -> str:
    """One column per repeat and a median column: the setup line, then CPU by group."""

    def median(values: Sequence[float]) -> str:
        return f"{statistics.median(values):.1f}" if values else "-"

    head = [f"run {i + 1}" for i in range(len(summaries))]
    lines = [
        f"| | {' | '.join(head)} | median |",
        "|---|" + "---|" * (len(head) + 1),
    ]

    def row(label: str, values: Sequence[float | None], fmt: str = "{:.1f}") -> None:
        cells = ["-" if v is None else fmt.format(v) for v in values]
        known = [v for v in values if v is not None]
        lines.append(f"| {label} | {' | '.join(cells)} | {median(known)} |")

    row("startup_seconds (setup line)", [s.startup_s for s in summaries])
    row("data_seconds", [s.data_s for s in summaries])
    for group in GROUPS:
        counts = {s.count.get(group, 0) for s in summaries}
        n = "/".join(str(c) for c in sorted(counts))
        row(f"CPU s: {group} ({n})", [s.cpu.get(group, 0.0) for s in summaries])
        if group in ACTORS:
            row(
                f"  {group} constructor, wall s (median)",
                [
                    statistics.median(s.constructors[group]) if s.constructors.get(group) else None
                    for s in summaries
                ],
            )
    row("CPU s: all processes", [sum(s.cpu.values()) for s in summaries])
    row("load average at start", [s.load[0] for s in summaries])
    row("load average at end", [s.load[1] for s in summaries])
    caches = {s.bytecode for s in summaries}
    lines.append(
        "\nCPU: user + system seconds at each process's last sample; (n): processes in the group. "
        + (
            "Python wrote and read bytecode caches."
            if caches == {True}
            else "PYTHONDONTWRITEBYTECODE was set: every process compiled the modules it imported that had "
            "no bytecode cache."
        )
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------ the measurement


def sample(
    root: psutil.Process,
    t: float,
    seen: dict[int, Process],
    titles: dict[int, list[tuple[float, str]]],
) -> None:
    """Read the title and CPU of `root` and every process below it at time t."""
    for p in tree(root):
        try:
            with p.oneshot():
                name, times, ppid = process_title(p.cmdline()), p.cpu_times(), p.ppid()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # it ended between the listing and the read
        record = seen.setdefault(p.pid, Process(p.pid, t, ppid))
        if not record.titles or record.titles[-1] != name:
            record.titles.append(name)
            titles[p.pid].append((t, name))
        record.cpu = times.user + times.system


def setup_record(path: Path) -> dict[str, float] | None:
    """metrics.jsonl's first record once it is complete, else None."""
    try:
        first = path.read_text().split("\n", 1)
    except FileNotFoundError:
        return None
    if len(first) < 2:
        return None
    record = json.loads(first[0])
    if record.get("stage") != "setup":
        raise RuntimeError(f"{path}: the first record is not the setup record: {record}")
    return record


def measure(overrides: Sequence[str], out: Path, interval: float, log: Path) -> Summary:
    """One run up to its setup record, sampled."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable,
        "-m",
        "gmai_rl.train",
        *DEMO_CUT,
        f"trainer.output_dir={out}",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    seen: dict[int, Process] = {}
    titles: dict[int, list[tuple[float, str]]] = defaultdict(list)
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        root = psutil.Process(proc.pid)
        while (setup := setup_record(out / "metrics.jsonl")) is None:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended ({proc.returncode}) before setup: see {log}")
            sample(root, time.monotonic() - started, seen, titles)
            time.sleep(interval)
    finally:
        load_end = os.getloadavg()[0]
        stop(proc)
    for pid, record in seen.items():
        record.init = constructor_span(titles[pid])
    bytecode = not os.environ.get("PYTHONDONTWRITEBYTECODE")
    return summarise(seen, proc.pid, setup, (load_start, load_end), bytecode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for gmai_rl.train")
    args = parser.parse_args()
    if any(o.startswith("cluster.address=") for o in args.overrides):
        parser.error("start-up is measured on a local Ray: leave cluster.address out")
    summaries = []
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}"
            summaries.append(measure(args.overrides, out, args.interval, Path(tmp) / f"{i}.log"))
            print(f"run {i + 1}: startup_seconds {summaries[-1].startup_s:.1f}", file=sys.stderr)
    print(render(summaries))


if __name__ == "__main__":
    main()
