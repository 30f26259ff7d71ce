"""Seconds per RL step, synchronous against the asynchronous pipeline, in one invocation:
`python benchmarks/async_pipeline.py`.

A measurement, not a test. The demo's job (tiny Qwen2.5-VL, synthetic data, SFT cold start) on a
layout where generation and training each have a core: 1 rollout worker and 1 learner rank, one
torch thread each. For each `--staleness` value the whole run goes through `gmai_rl.loop.run`
(its own Ray session) for `--steps` RL steps without evaluation during RL or checkpoints; the table
gives the median over the steps after the first two (start-up and warm-up) of the step's wall
time, its training and generation seconds, the learners' and rollout workers' idle ratios, and
each row's step time relative to the first row's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from gmai_rl.loop import run
from gmai_rl.train import compose

LAYOUT = (
    "cluster.learner_ranks=1",
    "cluster.rollout_workers=1",
    "learner.torch_threads=1",
    "rollout.torch_threads=1",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.save_final=false",
    "data.max_eval_items=16",
    "data.image_check_cache=null",
)

COLUMNS = ("time_step_s", "time_train_s", "time_generate_s", "idle_ratio_learner",
           "idle_ratio_rollout")  # fmt: skip


def rl_records(out: Path) -> list[dict[str, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == "rl"]


def measure(staleness: int, steps: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(
            [
                *LAYOUT,
                f"trainer.steps={steps}",
                f"algo.max_staleness={staleness}",
                f"trainer.output_dir={out}",
                *extra,
            ]
        )
        run(cfg)
        steady = rl_records(Path(out))[2:]
    import ray

    ray.shutdown()
    return {key: statistics.median(r.get(key, 0.0) for r in steady) for key in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("overrides", nargs="*", help="more config overrides, key=value")
    args = parser.parse_args()
    rows = {s: measure(s, args.steps, args.overrides) for s in args.staleness}
    base = rows[args.staleness[0]]["time_step_s"]
    print("| max_staleness | step s | train s | generate s | learner idle | rollout idle | "
          "step vs first row |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for s, row in rows.items():
        print(
            f"| {s} | {row['time_step_s']:.3f} | {row['time_train_s']:.3f} | "
            f"{row['time_generate_s']:.3f} | {row['idle_ratio_learner']:.2f} | "
            f"{row['idle_ratio_rollout']:.2f} | {row['time_step_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
