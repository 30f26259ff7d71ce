"""`trainer.rounds`: the paper's iterative recipe as one run on a local Ray cluster. Round 1 is
the SFT cold start and RL; round 2 rejection-samples traces from the policy on the cluster, fine-
tunes on the kept ones and runs RL again; one output folder, records with their round, a report
row per round. A run stopped inside round 2's rejection sampling, or inside its RL, continues
from its last checkpoint with `trainer.resume=auto` and ends as the rounds say."""

import json

import pytest

import gmai_rl.loop as loop
from gmai_rl.loop import run

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")

ROUNDS = (
    "trainer.rounds=2",
    "trainer.steps=2",
    "trainer.save_every=1",
    "trainer.eval_every=0",
    "data.max_eval_items=4",
    "synth.k=2",
    "synth.max_items=6",
    "synth.sft_steps=2",
    "rollout.max_batch_prompts=2",
)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_two_rounds(out, result):
    lines = records(out)
    rl = [(r["round"], r["step"]) for r in lines if r["stage"] == "rl"]
    assert rl == [(1, 0), (1, 1), (2, 2), (2, 3)]  # RL steps numbered over the rounds
    (synth,) = [r for r in lines if r["stage"] == "synth"]
    assert synth["round"] == 2 and synth["questions"] == 6
    evals = [(r["round"], r["phase"], r["step"]) for r in lines if r["stage"] == "eval"]
    assert evals == [
        (1, "before_rl", 0),
        (1, "after_rl", 2),
        (2, "before_rl", 2),
        (2, "after_rl", 4),
    ]
    done = (out / "round-2" / "synth.jsonl.done.jsonl").read_text().splitlines()
    assert len(done) == len({json.loads(d)["id"] for d in done}) == 6  # each question once
    kept = (out / "round-2" / "synth.jsonl").read_text().splitlines()
    assert len(kept) == len({json.loads(k)["id"] for k in kept})  # no trace written twice
    sft = [r for r in lines if r["stage"] == "sft"]
    assert [r["round"] for r in sft] == [1, 1] + ([2, 2] if kept else [])
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["rounds"][1]["synth"]["questions"] == 6
    assert json.loads((out / "round-2" / "eval.json").read_text())["round"] == 2
    report = (out / "report.md").read_text()
    assert "## Rounds" in report and "| 1 | the cold start (data.sft) |" in report
    assert "| 2 | " in report and "of 6 questions" in report
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == "step_4"


def test_two_rounds_run_as_one(small_config, tmp_path):
    out = tmp_path / "run"
    result = run(small_config(out, *ROUNDS))
    check_two_rounds(out, result)


@pytest.mark.faults
@pytest.mark.parametrize("where", ["synth", "rl"])
def test_a_run_stopped_in_round_2_continues_from_its_checkpoint(
    small_config, tmp_path, monkeypatch, where
):
    """Stopped after round 2's first batch of rejection sampling (the last checkpoint: the end
    of round 1; the sampling continues where it stopped), or in round 2's second RL step (the
    last checkpoint: after its first, step 3)."""
    out = tmp_path / "run"
    crash = RuntimeError("stopped here")
    if where == "synth":
        from gmai_rl import rejection

        append = rejection.SynthOutput.append

        def stop_after_one_batch(self, records, done):
            append(self, records, done)
            raise crash

        monkeypatch.setattr(rejection.SynthOutput, "append", stop_after_one_batch)
    else:
        step = loop.Pipeline.step

        def stop_in_round_2(self, i):
            record = step(self, i)
            # Round 1's steps leave version 3 (SFT's push, then one per step): past 4 is round 2.
            if i == 1 and self.cluster.version > 4:
                raise crash
            return record

        monkeypatch.setattr(loop.Pipeline, "step", stop_in_round_2)
    with pytest.raises(RuntimeError, match="stopped here"):
        run(small_config(out, *ROUNDS))
    monkeypatch.undo()
    result = run(small_config(out, *ROUNDS, "trainer.resume=auto"))
    check_two_rounds(out, result)
    resumed = [r for r in records(out) if "resumed_from" in r]
    assert [r["resumed_step"] for r in resumed] == [2 if where == "synth" else 1]
