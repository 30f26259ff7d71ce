"""Layers point one way: every import in the package goes down the stack or stays in its own room.

    types -> pure rooms (algo, data, reward rules, sync plan) -> benchmark formats and scoring
          -> models, sync transport
          -> actors (rollout, learner, reward worker) -> config -> its cross-field checks
          -> cluster, Ray metrics -> progress
          -> driver support (feed, metrics, evaluate, rejection sampling, plan) -> a step's
          batch (batches)
          -> run outputs (dashboards, report) -> the step (pipeline) -> the run (loop)
          -> entry points (train, synth) -> cli

Read from the source (every import statement, including those inside functions, which are
arrows too), so the test sees what `sys.modules` would hide once another test imported it all.
A module may import from a lower layer and from its own room; an import upward or sideways into
another room of the same layer is a violation, and so is any cycle. Only the cluster and the
actors (and ray_metrics, the driver's gauges in Ray's metrics system) may import Ray; the pure
rooms import no heavy framework at all.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import gmai_rl

PACKAGE = Path(gmai_rl.__file__).parent

LAYERS: list[list[str]] = [
    ["types"],
    ["algo", "data", "reward", "sync.buckets"],
    ["benchmarks"],
    ["models", "sync"],
    ["rollout", "learner", "reward.worker"],
    ["config"],
    ["config_checks"],
    ["cluster", "ray_metrics"],
    ["progress"],
    ["feed", "metrics", "evaluate", "plan", "checkpoint", "rejection"],
    ["batches"],
    ["dashboards", "report"],
    ["pipeline"],
    ["loop"],
    ["train", "synth"],
    ["cli"],
]
"""Each layer's rooms, by module path under gmai_rl; the longest matching room wins."""

PURE_ROOMS = (
    "types",
    "algo",
    "data",
    "reward.mcq",
    "reward.overlong",
    "reward.plugins",
    "sync.buckets",
    "cluster.placement",
    "cluster.environment",
    "cluster.errors",
)
"""Modules that import no heavy framework (the cluster's three are its arithmetic, its checks of
the environment and its error classes: the pre-flight plan uses them without Ray)."""
HEAVY = {"ray", "vllm", "deepspeed", "transformers"}
MAY_IMPORT_RAY = ("cluster", "rollout", "learner", "reward.worker", "ray_metrics")
"""ray_metrics: the driver's own gauges in Ray's metrics system (a dashboards sink), kept out of
cluster.py, which is about the actors."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of this package that `path` imports, top-level names of other packages)."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from gmai_rl.x import y`: y may be a submodule; else the arrow goes to gmai_rl.x.
            names = [
                f"{node.module}.{a.name}"
                if f"{node.module}.{a.name}".removeprefix("gmai_rl.") in known
                else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == "gmai_rl" or name.startswith("gmai_rl."):
                own.add(name.removeprefix("gmai_rl").removeprefix("."))
            else:
                other.add(name.split(".")[0])
    return own, other


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found))[0] - {name} for name, path in found.items()}


def room_of(module: str) -> tuple[int, str]:
    """(layer index, room) of a module: the longest room that is the module or a package of it."""
    matches = [
        (len(room), layer, room)
        for layer, rooms in enumerate(LAYERS)
        for room in rooms
        if module == room or module.startswith(room + ".")
    ]
    if not matches:
        raise KeyError(f"gmai_rl.{module} is in no layer: add it to LAYERS")
    _, layer, room = max(matches)
    return layer, room


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the stack or sideways into another room of its layer."""
    out = []
    for module, targets in sorted(graph.items()):
        if not module:  # the package's own __init__ imports nothing (checked below)
            continue
        layer, room = room_of(module)
        for target in sorted(t for t in targets if t):
            target_layer, target_room = room_of(target)
            if target_layer > layer:
                out.append(f"{module} (layer {layer}) imports {target} (layer {target_layer}): up")
            elif target_layer == layer and target_room != room:
                out.append(f"{module} imports {target}: sideways between rooms of layer {layer}")
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of the import graph (one path for each back edge found depth first)."""
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


# ------------------------------------------------------------------------ the package itself


def test_every_module_sits_in_a_layer_and_imports_only_downward():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    assert layering_violations(graph) == []


def test_the_package_has_no_import_cycle():
    assert import_cycles(import_graph()) == []


def test_only_the_cluster_and_the_actors_import_ray():
    found = modules()
    importers = {name for name, path in found.items() if "ray" in imports_of(path, set(found))[1]}
    assert importers and all(name.startswith(MAY_IMPORT_RAY) for name in importers), importers
    assert "cluster.cluster" in importers and "loop" not in importers


def test_pure_rooms_import_no_heavy_framework():
    found = modules()
    for name, path in found.items():
        if name.startswith(PURE_ROOMS) or name == "":
            heavy = imports_of(path, set(found))[1] & HEAVY
            assert not heavy, f"gmai_rl.{name} imports {sorted(heavy)}"


def test_importing_the_data_room_loads_nothing_heavy():
    """At run time too (a fresh interpreter: other tests have imported everything here)."""
    code = (
        "import sys, gmai_rl.data, gmai_rl.data.records, gmai_rl.reward, gmai_rl.types\n"
        "print(','.join(m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'datasets',"
        " 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_the_pre_flight_plan_and_the_cluster_package_load_no_ray():
    """`gmai-rl plan` runs on a laptop: the placement arithmetic it uses comes without Ray."""
    code = (
        "import sys, gmai_rl.cluster, gmai_rl.cluster.placement, gmai_rl.plan\n"
        "print(','.join(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""


# ----------------------------------------------------------------- the checker catches them


def test_the_checker_reports_the_arrows_this_layout_removed():
    # Imports main had before the layering: config took its option classes from the learner
    # actor, the learner its token helper from the HF engine, the vLLM engine its options from
    # the config (rollout -> config -> learner -> rollout, a cycle between the rooms).
    old = {
        "config": {"learner.worker", "models.loading"},
        "learner.worker": {"rollout.hf", "algo"},
        "rollout.vllm": {"config", "rollout.hf"},
        "rollout.hf": {"models.inputs"},
        "loop": {"learner.worker", "cluster"},
        "cluster": {"config"},
    }
    violations = layering_violations(old)
    assert violations == [
        "learner.worker imports rollout.hf: sideways between rooms of layer 4",
        "rollout.vllm (layer 4) imports config (layer 5): up",
    ]


def test_the_checker_finds_a_cycle_and_an_unplaced_module():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    try:
        room_of("plugins.extra")
    except KeyError as err:
        assert "add it to LAYERS" in str(err)
    else:
        raise AssertionError("a module outside every layer must be reported")


def test_the_layers_name_real_modules():
    found = modules()
    for rooms in LAYERS:
        for room in rooms:
            assert room in found, room
    assert importlib.util.find_spec("gmai_rl.loop") is not None
