"""gmai_rl.algo is pure torch: it must not pull in Ray, vLLM, DeepSpeed or transformers.

Checked on the source (every import statement of the package and of gmai_rl/__init__.py, which
importing it runs) rather than on sys.modules: other tests in the same process import those
frameworks, and a fresh interpreter costs seconds of torch import.
"""

import ast
from pathlib import Path

import gmai_rl
import gmai_rl.algo

ALLOWED = {"__future__", "collections", "dataclasses", "math", "typing", "torch", "gmai_rl"}
HEAVY = {"ray", "vllm", "deepspeed", "transformers"}


def imported_top_level_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_algo_imports_only_torch_and_the_standard_library():
    files = sorted(Path(gmai_rl.algo.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        unexpected = imported_top_level_modules(path) - ALLOWED
        assert not unexpected, f"{path.name} imports {sorted(unexpected)}"


def test_package_init_imports_no_heavy_framework():
    imported = imported_top_level_modules(Path(gmai_rl.__file__))
    assert not imported & HEAVY, f"gmai_rl/__init__.py imports {sorted(imported & HEAVY)}"
