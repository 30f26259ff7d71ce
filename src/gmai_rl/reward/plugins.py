"""Plug-ins named by a dotted path in the config: the reward function (`reward.fn`) and the
benchmark judge (`eval.judge`). One loader, so both refuse the same things the same way."""

from __future__ import annotations

import importlib
import keyword
from collections.abc import Callable
from typing import Any


def plugin_path_parts(path: str, what: str) -> tuple[str, str]:
    """(module, attribute) of `module:attr` or `module.attr`; `what` names the plug-in in errors
    ("reward function").

    ValueError, before anything is imported, for what is not a dotted path of identifiers (a
    file path, code, an empty string) or names a builtin: a plug-in is only ever a function an
    installed module defines, never text that would run.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    names = [*module_name.split("."), attr]
    a_file = path.endswith(".py") or module_name.endswith(".py")  # "rewards.py" is no module
    if a_file or not all(name.isidentifier() and not keyword.iskeyword(name) for name in names):
        raise ValueError(
            f"{what} {path!r} must look like 'package.module:function': a dotted path to a "
            "function in an importable module, not a file path or code"
        )
    if names[0] == "builtins":
        raise ValueError(f"{what} {path!r}: builtins are not plug-ins")
    return module_name, attr


def load_plugin(path: str, what: str) -> Callable[..., Any]:
    """Import `module:attr` or `module.attr` and return the callable it names."""
    module_name, attr = plugin_path_parts(path, what)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {what} {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"{what} {path!r} is not callable")
    return fn  # type: ignore[no-any-return]
