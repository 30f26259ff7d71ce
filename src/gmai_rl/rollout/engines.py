"""The registry of rollout engines: `rollout.backend` -> the engine's spec (rollout/spec.py).

    spec = engine_spec(cfg.rollout.backend)

A new engine is a spec module beside hf_spec.py and vllm_spec.py (its `make` importing the
engine lazily) registered here by name, as vLLM and veRL register their backends; the config
selects it once `Backend` has its name. Importing this module imports no engine.
"""

from __future__ import annotations

from gmai_rl.rollout.hf_spec import HF
from gmai_rl.rollout.spec import EngineSpec
from gmai_rl.rollout.vllm_spec import VLLM

ENGINES: dict[str, EngineSpec] = {}
"""Every registered engine by name (`Backend` members are str, so either key works)."""


def register(spec: EngineSpec) -> EngineSpec:
    """Add `spec` under its name; a name already taken is refused (one spec per engine)."""
    name = str(spec.name)
    if name in ENGINES:
        raise ValueError(f"rollout engine {name!r} is registered already")
    ENGINES[name] = spec
    return spec


def engine_spec(backend: str) -> EngineSpec:
    """The spec of the engine named `backend` (a `Backend` member or its value)."""
    try:
        return ENGINES[str(backend)]
    except KeyError:
        raise ValueError(
            f"unknown rollout backend {str(backend)!r}; registered: {', '.join(ENGINES)}"
        ) from None


register(HF)
register(VLLM)
