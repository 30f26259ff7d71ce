"""Security rules a refactor must not quietly break; docs/security.md says why each one holds.

- No file a user did not write is unpickled: `torch.load` only with `weights_only=True`; no pickle,
  marshal, dill, cloudpickle, joblib, shelve or pandas pickle loads; `np.load` never with
  `allow_pickle`; YAML only through a safe loader. `torch.save` (a pickle) only where listed.
- Model output is never run as code: `eval`/`exec`/`compile`/`__import__` of literals only, no
  `shell=True`, `os.system` or `os.popen`, no code loaded from a file path.
- Reward plug-ins come only from an explicit dotted path: `importlib.import_module` is called in
  one place, the reward loader, and that loader refuses anything that is not a dotted path.
- No remote model code unless the user asks: no literal `trust_remote_code=True` anywhere.
- No wildcard bind address in the source; the local Ray cluster's dashboard binds 127.0.0.1.

The scan reads every module's syntax tree (imports inside functions too), so aliases such as
`import torch as t; t.load(...)` or `from pickle import loads` are seen; each finding names
file:line. `test_the_scanner_reports_*` feed it one snippet per rule, so the scan cannot pass by
seeing nothing.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import gmai_rl
from gmai_rl.config import TrainConfig
from gmai_rl.config_checks import validate
from gmai_rl.reward.worker import RewardWorker, resolve_reward_fn
from gmai_rl.rollout.options import Backend
from gmai_rl.types import MCQItem

PACKAGE = Path(gmai_rl.__file__).parent
ROOT = PACKAGE.parents[1]
SCANNED = [PACKAGE, ROOT / "tools", ROOT / "benchmarks"]
"""The package, and the scripts that ship beside it."""

# ---------------------------------------------------------------------------------- the scanner

UNPICKLE = {
    f"{module}.{fn}"
    for module in ("pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal")
    for fn in ("load", "loads", "Unpickler")
} | {"joblib.load", "shelve.open", "pandas.read_pickle", "jsonpickle.decode"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
TORCH_SAVE = {"torch.save", "torch.serialization.save"}
CODE_FROM_FILE = {
    "runpy.run_path",
    "runpy.run_module",
    "importlib.util.spec_from_file_location",
    "importlib.machinery.SourceFileLoader",
    "torch.jit.load",
    "torch.package.PackageImporter",
}
RUN_CODE = {"eval", "exec", "compile", "builtins.eval", "builtins.exec", "builtins.compile"}
IMPORT_BY_NAME = {"importlib.import_module", "__import__", "builtins.__import__"}
SHELL = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
YAML_LOAD = {"yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::", "[::]"}
HOST_KEYWORDS = {"host", "dashboard_host", "bind", "bind_address", "listen_host"}
CHECKED_CALLS = (
    TORCH_LOAD | UNPICKLE | CODE_FROM_FILE | RUN_CODE | IMPORT_BY_NAME | SHELL | UNSAFE_YAML
) | YAML_LOAD
"""Functions whose calls are checked: one handed on uncalled (`partial(torch.load)`, a callback)
would escape the check, so it is reported too."""


@dataclass(frozen=True)
class Finding:
    rule: str
    file: str
    line: int
    function: str
    """The enclosing function ("<module>" at top level): allow-lists name it, not the line."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.function}): {self.rule}"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name for every import in the module (function bodies included)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _is_const(node: ast.AST | None, *values: object) -> bool:
    return isinstance(node, ast.Constant) and any(
        node.value is v or node.value == v for v in values
    )


class _Scanner(ast.NodeVisitor):
    def __init__(self, file: str, aliases: dict[str, str]) -> None:
        self.file, self.aliases = file, aliases
        self.functions = ["<module>"]
        self.findings: list[Finding] = []
        self.called: set[int] = set()

    def report(self, node: ast.AST, rule: str) -> None:
        line = getattr(node, "lineno", 0)
        self.findings.append(Finding(rule, self.file, line, self.functions[-1]))

    def dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        self.called.add(id(node.func))
        name = self.dotted(node.func) or ""
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        first = node.args[0] if node.args else None
        if name in TORCH_LOAD:
            if "pickle_module" in kw:
                self.report(node, f"{name} with pickle_module: unpickles arbitrary objects")
            elif not _is_const(kw.get("weights_only"), True):
                self.report(node, f"{name} without weights_only=True: unpickles arbitrary objects")
        elif name in TORCH_SAVE:
            self.report(node, f"{name} writes a pickle: write safetensors (save_file)")
        elif name in UNPICKLE:
            self.report(node, f"{name}: unpickles arbitrary objects")
        elif name == "numpy.load" and "allow_pickle" in kw:
            if not _is_const(kw["allow_pickle"], False):
                self.report(node, "numpy.load with allow_pickle: unpickles arbitrary objects")
        elif name in UNSAFE_YAML:
            self.report(node, f"{name}: builds arbitrary Python objects; use yaml.safe_load")
        elif name in YAML_LOAD:
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.dotted(loader) not in SAFE_YAML_LOADERS:
                self.report(node, f"{name} without a safe Loader; use yaml.safe_load")
        elif name in RUN_CODE and not _literal(first):
            self.report(node, f"{name} of a non-literal: runs data as code")
        elif name in IMPORT_BY_NAME and not _literal(first):
            self.report(node, f"{name} of a non-literal: imports a module named by data")
        elif name in CODE_FROM_FILE:
            self.report(node, f"{name}: runs code from a file")
        elif name in SHELL:
            self.report(node, f"{name}: runs a shell command line")
        if "shell" in kw and not _is_const(kw["shell"], False):
            self.report(node, f"{name or 'call'} with shell=True: runs a shell command line")
        if _is_const(kw.get("trust_remote_code"), True):
            self.report(node, f"{name or 'call'} with trust_remote_code=True: runs a model's code")
        for key in HOST_KEYWORDS & kw.keys():
            value = kw[key]
            literal = isinstance(value, ast.Constant) and isinstance(value.value, str)
            if literal and value.value not in LOOPBACK:
                self.report(node, f"{key}={value.value!r}: binds beyond this machine")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._uncalled(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._uncalled(node)
        self.generic_visit(node)

    def _uncalled(self, node: ast.Name | ast.Attribute) -> None:
        name = self.dotted(node)
        if name in CHECKED_CALLS and id(node) not in self.called and isinstance(node.ctx, ast.Load):
            self.report(node, f"{name} handed on uncalled: its arguments cannot be checked")

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if _named(node.target, "trust_remote_code") and _is_const(node.value, True):
            self.report(node, "trust_remote_code defaults to True: runs a model's code")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(_named(t, "trust_remote_code") for t in node.targets) and _is_const(
            node.value, True
        ):
            self.report(node, "trust_remote_code set to True: runs a model's code")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if _is_const(key, "trust_remote_code") and _is_const(value, True):
                self.report(node, "trust_remote_code: True in a dict: runs a model's code")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in WILDCARD:
            self.report(node, f"wildcard address {node.value!r}: binds every interface")


def _literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)


def _named(target: ast.AST, name: str) -> bool:
    return (isinstance(target, ast.Name) and target.id == name) or (
        isinstance(target, ast.Attribute) and target.attr == name
    )


def scan_source(source: str, file: str = "<snippet>") -> list[Finding]:
    tree = ast.parse(source, file)
    scanner = _Scanner(file, _aliases(tree))
    scanner.visit(tree)
    return sorted(scanner.findings, key=lambda f: f.line)


def scan_project() -> list[Finding]:
    findings = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            findings += scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return findings


ALLOWED: dict[tuple[str, str, str], str] = {
    ("src/gmai_rl/reward/plugins.py", "load_plugin", "importlib.import_module"): (
        "the plug-in loader: reward.fn and the benchmark judge, dotted paths the user wrote"
    ),
    ("src/gmai_rl/learner/worker.py", "save_state", "torch.save"): (
        "this rank's RNG states, read back by load_state with weights_only=True"
    ),
    ("src/gmai_rl/rollout/worker.py", "save_state", "torch.save"): (
        "this worker's RNG states, read back by load_state with weights_only=True"
    ),
}
"""(file, function, call) -> why it is there. A finding matches when its rule names the call."""


def _allowed(finding: Finding) -> bool:
    return any(
        finding.file == file and finding.function == fn and finding.rule.startswith(call)
        for file, fn, call in ALLOWED
    )


# ---------------------------------------------------------------------------- the scanner works

FORBIDDEN = {
    "torch.load without weights_only": "import torch\ntorch.load(path)",
    "torch.load weights_only=False": "import torch\ntorch.load(path, weights_only=False)",
    "torch.load weights_only from a variable": "import torch\ntorch.load(p, weights_only=flag)",
    "torch.load with pickle_module": (
        "import torch, pickle\ntorch.load(p, weights_only=True, pickle_module=pickle)"
    ),
    "torch.load through an alias": "import torch as t\nt.load(path)",
    "torch.load imported by name": "from torch import load\nload(path)",
    "torch.serialization.load": "import torch.serialization\ntorch.serialization.load(p)",
    "torch.save": "import torch\ntorch.save(state, path)",
    "pickle.load": "import pickle\npickle.load(f)",
    "pickle.loads by name": "from pickle import loads as l\nl(data)",
    "pickle.Unpickler": "import pickle\npickle.Unpickler(f).load()",
    "cloudpickle.loads": "import cloudpickle\ncloudpickle.loads(b)",
    "dill.load": "import dill\ndill.load(f)",
    "joblib.load": "import joblib\njoblib.load(path)",
    "marshal.loads": "import marshal\nmarshal.loads(b)",
    "shelve.open": "import shelve\nshelve.open(path)",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle(path)",
    "np.load allow_pickle=True": "import numpy as np\nnp.load(path, allow_pickle=True)",
    "np.load allow_pickle from a variable": "import numpy as np\nnp.load(path, allow_pickle=x)",
    "yaml.load without Loader": "import yaml\nyaml.load(text)",
    "yaml.load unsafe Loader": "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "yaml.load_all FullLoader": "import yaml\nyaml.load_all(text, yaml.FullLoader)",
    "yaml.unsafe_load": "import yaml\nyaml.unsafe_load(text)",
    "yaml.full_load": "import yaml\nyaml.full_load(text)",
    "eval of model output": "eval(completion)",
    "exec of a variable": "exec(code, {})",
    "compile of a variable": "compile(source, '<s>', 'exec')",
    "builtins.eval": "import builtins\nbuiltins.eval(text)",
    "eval of an f-string": "eval(f'{x}')",
    "__import__ of a variable": "__import__(name)",
    "import_module of a variable": "import importlib\nimportlib.import_module(name)",
    "import_module by name": "from importlib import import_module\nimport_module(name)",
    "runpy.run_path": "import runpy\nrunpy.run_path(path)",
    "spec_from_file_location": (
        "import importlib.util\nimportlib.util.spec_from_file_location('m', path)"
    ),
    "torch.jit.load": "import torch\ntorch.jit.load(path)",
    "subprocess shell=True": "import subprocess\nsubprocess.run(cmd, shell=True)",
    "Popen shell from a variable": "import subprocess\nsubprocess.Popen(cmd, shell=use_shell)",
    "os.system": "import os\nos.system(cmd)",
    "os.popen": "import os\nos.popen(cmd)",
    "subprocess.getoutput": "import subprocess\nsubprocess.getoutput(cmd)",
    "trust_remote_code=True": "from_pretrained(p, trust_remote_code=True)",
    "trust_remote_code default True": "class O:\n    trust_remote_code: bool = True",
    "trust_remote_code assigned True": "opts.trust_remote_code = True",
    "trust_remote_code in a dict": "kwargs = {'trust_remote_code': True}",
    "wildcard bind": "sock.bind(('0.0.0.0', 0))",
    "IPv6 wildcard": "server = make_server('::', port, app)",
    "host keyword beyond loopback": "ray.init(dashboard_host='10.0.0.5')",
    "a forbidden call inside a function": "def f():\n    import pickle\n    return pickle.loads(b)",
    "torch.load in a partial": "import functools, torch\nfunctools.partial(torch.load, p)",
    "pickle.loads as a callback": "import pickle\nrun(decode=pickle.loads)",
    "eval as a value": "fns = [eval]",
}


@pytest.mark.parametrize("snippet", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_the_scanner_reports_each_forbidden_call_with_its_line(snippet):
    source = "x = 1\n" + snippet  # the call is never on line 1
    findings = scan_source(source, "snippet.py")
    assert findings, f"not reported:\n{source}"
    last_line = len(source.splitlines())
    assert findings[-1].line == last_line, [str(f) for f in findings]
    assert str(findings[-1]).startswith(f"snippet.py:{last_line} ")


ALLOWED_SNIPPETS = {
    "torch.load weights_only=True": "import torch\ntorch.load(p, weights_only=True)",
    "safetensors": "from safetensors.torch import load_file, save_file\nload_file(p)",
    "np.load default": "import numpy as np\nnp.load(path)",
    "np.load allow_pickle=False": "import numpy as np\nnp.load(path, allow_pickle=False)",
    "yaml.safe_load": "import yaml\nyaml.safe_load(text)",
    "yaml.load SafeLoader": "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "json": "import json\njson.loads(text)",
    "re.compile": "import re\nre.compile(pattern)",
    "model.eval()": "model.eval()",
    "eval of a literal": "eval('1 + 1')",
    "ast.literal_eval": "import ast\nast.literal_eval(text)",
    "import_module of a literal": "import importlib\nimportlib.import_module('json')",
    "subprocess without a shell": "import subprocess\nsubprocess.run(['ls', path], check=True)",
    "shell=False": "import subprocess\nsubprocess.run(['ls'], shell=False)",
    "trust_remote_code from the config": "from_pretrained(p, trust_remote_code=opts.trc)",
    "trust_remote_code default False": "class O:\n    trust_remote_code: bool = False",
    "loopback host": "ray.init(dashboard_host='127.0.0.1')",
    "an unrelated load method": "processor.load(path)",
    "a local function named load": "def load(p):\n    return p\nload(x)",
}


@pytest.mark.parametrize("snippet", ALLOWED_SNIPPETS.values(), ids=ALLOWED_SNIPPETS.keys())
def test_the_scanner_passes_safe_forms(snippet):
    assert scan_source(snippet) == []


# ------------------------------------------------------------------------------ the project scan


def test_the_scan_reads_the_package():
    files = [p for folder in SCANNED for p in folder.rglob("*.py")]
    assert len(files) > 50, files  # a moved package would make every scan below vacuous
    assert PACKAGE / "reward" / "worker.py" in files


def test_nothing_unpickles_runs_data_as_code_or_trusts_remote_code():
    """Every finding in the package, tools/ and benchmarks/ outside the allow-list, by file:line."""
    found = [str(f) for f in scan_project() if not _allowed(f)]
    assert found == [], "forbidden calls (see docs/security.md):\n" + "\n".join(found)


def test_the_allow_list_is_current():
    """Each allowed call is still where the allow-list says: a moved or removed one must leave it
    (and a new one must be argued into it, not inherit an old entry)."""
    findings = scan_project()
    stale = [
        key
        for key in ALLOWED
        if not any(
            f.file == key[0] and f.function == key[1] and f.rule.startswith(key[2])
            for f in findings
        )
    ]
    assert stale == []


def test_torch_files_the_project_reads_are_read_weights_only():
    """Both resume paths read their RNG files with weights_only=True (the scan's positive side:
    the calls exist, so the rule above is about real code)."""
    loads = [
        f
        for path in (PACKAGE / "learner" / "worker.py", PACKAGE / "rollout" / "worker.py")
        for f in _calls(path, TORCH_LOAD)
    ]
    assert len(loads) == 2, loads
    assert all(weights_only for _, weights_only in loads), loads


def _calls(path: Path, names: set[str]) -> list[tuple[int, bool]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scanner = _Scanner(str(path), _aliases(tree))
    return [
        (
            node.lineno,
            any(k.arg == "weights_only" and _is_const(k.value, True) for k in node.keywords),
        )
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and scanner.dotted(node.func) in names
    ]


def test_the_local_cluster_dashboard_binds_loopback():
    """launch/local_cluster.sh starts the head with its dashboard on 127.0.0.1 (Ray's default
    too; stated so that a copy of the line keeps it)."""
    script = (ROOT / "launch" / "local_cluster.sh").read_text(encoding="utf-8")
    starts = [line for line in script.splitlines() if re.search(r"\bray start\b.*--head", line)]
    assert starts, "no `ray start --head` in launch/local_cluster.sh"
    for line in starts:
        assert re.search(r"--dashboard-host[ =](127\.0\.0\.1|localhost)\b", line), line


def test_launch_scripts_do_not_eval():
    for script in sorted((ROOT / "launch").glob("*.sh")):
        code = [
            ln for ln in script.read_text(encoding="utf-8").splitlines() if ln.strip()[:1] != "#"
        ]
        assert not [ln for ln in code if re.search(r"(^|[;&|]\s*)eval\b", ln.strip())], script


# ------------------------------------------------------------------- reward plug-ins by dotted path

ITEM = MCQItem("q1", "Which modality?", {"A": "CT", "B": "MRI"}, "A")


def plugin_reward(completion: str, item: MCQItem) -> dict[str, float]:
    return {"total": float(item.answer in completion)}


NOT_DOTTED = {
    "empty": "",
    "blank": " ",
    "missing function": "my_pkg.rewards:",
    "missing module": ":score",
    "absolute file path": "/tmp/rewards.py",
    "file name": "rewards.py",
    "file name and function": "rewards.py:score",
    "relative file": "./rewards.py:score",
    "relative import": ".rewards:score",
    "statement": "import os; os.system('id')",
    "expression": "__import__('os').system('id')",
    "lambda": "lambda c, i: {'total': 1.0}",
    "space in a name": "my pkg.rewards:score",
    "trailing newline": "my_pkg.rewards:score\n",
    "two colons": "my_pkg.rewards:score:x",
    "keyword as a name": "my_pkg.class:score",
}


@pytest.fixture
def imports(monkeypatch):
    """Every module name the reward loader asks importlib for; each such import fails."""
    asked: list[str] = []

    def spy(name: str, package: str | None = None):
        asked.append(name)
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", spy)
    return asked


@pytest.mark.parametrize("path", NOT_DOTTED.values(), ids=NOT_DOTTED.keys())
def test_the_reward_loader_refuses_what_is_not_a_dotted_path_before_importing(path, imports):
    with pytest.raises(ValueError, match=r"reward function .*package\.module:function"):
        resolve_reward_fn(path)
    assert imports == []


def test_the_import_spy_sees_the_loaders_imports(imports):
    """The control for the test above: a well-formed path does reach importlib."""
    with pytest.raises(ValueError, match="cannot load reward function"):
        resolve_reward_fn("my_pkg.rewards:score")
    assert imports == ["my_pkg.rewards"]


@pytest.mark.parametrize("path", ["./rewards.py:score", ".rewards:score"])
def test_relative_paths_fail_with_a_value_error_naming_the_path(path):
    with pytest.raises(ValueError, match="reward function"):
        resolve_reward_fn(path)


@pytest.mark.parametrize("path", ["os:getcwd", "json:dumps"])
def test_the_reward_loader_still_resolves_dotted_paths_to_callables(path):
    assert callable(resolve_reward_fn(path))


def test_a_plugin_scores_model_output_as_text():
    worker = RewardWorker(reward_fn=f"{__name__}:plugin_reward")
    assert worker.score([("<answer>A</answer>", ITEM)]) == [{"total": 1.0}]


def test_an_empty_reward_fn_is_refused_not_read_as_the_default():
    with pytest.raises(ValueError, match="reward function"):
        RewardWorker(reward_fn="")


@pytest.mark.parametrize("path", ["builtins:eval", "builtins.exec", "builtins:compile"])
def test_the_reward_loader_refuses_builtins_that_run_code(path):
    with pytest.raises(ValueError, match="reward function"):
        resolve_reward_fn(path)


def test_the_default_reward_never_evaluates_model_output():
    """Text that would do something if evaluated is scored as text (the scan above shows no
    eval/exec anywhere; this is the end-to-end view of the default rule)."""
    hostile = "<think>x</think><answer>__import__('os')._exit(3)</answer>"
    (breakdown,) = RewardWorker().score([(hostile, ITEM)])
    assert breakdown["accuracy"] == 0.0


@pytest.mark.parametrize("path", ["", "rewards.py:score", "import os"])
def test_a_malformed_reward_fn_fails_validation(path):
    cfg = TrainConfig()
    cfg.reward.fn = path
    with pytest.raises(ValueError, match=r"reward\.fn"):
        validate(cfg)


# ------------------------------------------------------------------------------------ remote code


def test_remote_model_code_is_off_unless_asked():
    assert TrainConfig().model.trust_remote_code is False


def test_engine_args_cannot_turn_on_remote_code_behind_the_model_switch():
    cfg = TrainConfig()
    cfg.rollout.backend = Backend.vllm
    cfg.rollout.vllm.engine_args = {"trust_remote_code": True}
    with pytest.raises(ValueError, match="trust_remote_code"):
        validate(cfg)


# ------------------------------------------------------------- checkpoints someone else wrote

UNPICKLED: list[str] = []


def record_unpickling(what: str) -> str:
    UNPICKLED.append(what)
    return what


class Payload:
    """What a hostile checkpoint holds: unpickling it calls a function of the writer's choice."""

    def __reduce__(self):
        return (record_unpickling, ("payload ran",))


def test_deepspeed_checkpoint_loads_unpickle_only_tensors_and_its_own_state(tmp_path):
    """DeepSpeed reads its files with torch.load(weights_only=False); inside the learner's
    resume (`weights_only_torch_loads`) a pickled callable is refused, not called, while the
    classes DeepSpeed's optimizer states hold load."""
    import os
    import pickle

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from gmai_rl.learner.zero import FORCE_WEIGHTS_ONLY, weights_only_torch_loads

    hostile, state = tmp_path / "hostile.pt", tmp_path / "optim_states.pt"
    torch.save({"weights": torch.ones(2), "extra": Payload()}, hostile)
    torch.save(
        {
            "loss_scaler": LossScaler(1),
            "zero_stage": ZeroStageEnum(2),
            "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
            "state": {0: {"exp_avg": torch.zeros(4)}},
        },
        state,
    )
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    with weights_only_torch_loads():
        with pytest.raises(pickle.UnpicklingError, match="record_unpickling"):
            torch.load(hostile, weights_only=False)  # what DeepSpeed passes
        loaded = torch.load(state, weights_only=False)
    assert UNPICKLED == []
    assert loaded["zero_stage"] == ZeroStageEnum(2)
    assert torch.equal(loaded["state"][0]["exp_avg"], torch.zeros(4))
    assert os.environ.get(FORCE_WEIGHTS_ONLY) == before  # the process is left as it was
    assert torch.load(hostile, weights_only=False)["extra"] == "payload ran"  # outside: it runs
    assert UNPICKLED == ["payload ran"]
