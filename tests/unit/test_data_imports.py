"""`gmai_rl.data` stays pure: importing it must not pull in the heavy stack.

Checked in a fresh interpreter, because other tests in the same session import torch or datasets.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "vllm", "deepspeed", "datasets", "transformers")


def test_importing_gmai_rl_data_imports_no_heavy_dependency() -> None:
    code = (
        "import sys, gmai_rl.data, gmai_rl.data.records\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_public_api() -> None:
    import gmai_rl.data as data

    assert set(data.__all__) >= {
        "load_mcq_jsonl",
        "load_mcq_dataset",
        "DataError",
        "LoadReport",
        "split_question_options",
        "build_messages",
        "build_prompt",
        "format_question",
        "sft_target",
        "DEFAULT_SYSTEM_PROMPT",
        "infer_modality",
    }
    assert all(hasattr(data, name) for name in data.__all__)
    assert issubclass(data.DataError, ValueError)
