"""One GRPO step against TRL's GRPOTrainer: seconds per step, generated tokens per second, and where
the time goes, on the same tiny model, data and settings, on 2 CPU cores.

    .venv-bench/bin/python benchmarks/trl_grpo.py [--steps 5] [--ours]    # make bench-env
    .venv/bin/python benchmarks/trl_grpo.py --ours --no-trl                # our row only

A measurement, not a test. Both sides take their settings from our config (`gmai_rl.train.compose`
with SHARED below): the demo's tiny random Qwen2.5-VL (`model.path`, built offline into the
artifacts cache) without the SFT cold start, so both start from the same weights; the demo's
synthetic train.jsonl with its 56x56 images and prompt (no system prompt, the question and its
options); 16 prompts x 8 samples at temperature 1, top-p 1, at most 48 new tokens (vision special
tokens suppressed on both sides); our MCQ reward (format weight 0.5); AdamW at the RL stage's
constant rate (1e-3), no KL (beta 0: no reference model), clip 0.2 / 0.28, gradient clip 1; two
optimizer steps per batch of 128 (learner.num_minibatches), micro-batches of 32; fp32.

TRL (1.16, GRPOTrainer with transformers' `generate`): per_device_train_batch_size 32,
gradient_accumulation_steps 2, steps_per_generation 4, so one generation of 128 completions feeds
two optimizer steps and TRL computes old log-probs, as our learner does; loss_type "dapo" is our
token-mean; bf16 off (TRL's default is on; ours trains fp32 on CPU); one process, `--threads` (2)
torch threads.
Its row is run twice: with TRL's default gradient checkpointing and without it. An RL step is
TRL's two optimizer steps, timed from the end of the previous one (data loading included);
generate and reward are the time in GRPOTrainer's `_generate` and `_calculate_rewards`, train is
the rest of the step (old log-probs, advantages, forward/backward, optimizer).

Ours (`--ours`): the same job through `gmai_rl.loop.run` (its own Ray session): 1 learner rank
(DeepSpeed ZeRO-2, gloo), 1 rollout worker (HF generate), 1 reward worker. In the synchronous loop
(`--ours-staleness 0`) the stages run one after another, so each actor gets `--threads` torch
threads and at most that many cores work at a time, as in TRL; with staleness >= 1 training and
generation overlap (pass learner.torch_threads=1 rollout.torch_threads=1 for 2 cores; the stage
columns then overlap and "other" means nothing). Columns from metrics.jsonl: time_step_s,
time_generate_s, time_reward_s, time_train_s, time_sync_s; "other" is the rest (driver:
advantages, Ray calls). Our row can run in either environment (the project is installed in
.venv-bench too); run all rows in one invocation, these machines differ run to run.

Each row: the median over RL steps after `--warmup` (default 2) of `--steps` (default 5) steps.
Run it on an otherwise idle machine: with more runnable threads than cores, torch's OpenMP threads
spin at every barrier waiting for each other, and 2 threads made this model's generate 10-20x
slower than 1 thread while other jobs ran (128 x 48 tokens: 10-26 s against 0.9-1.2 s). The script
prints the load average; on a busy machine export OMP_WAIT_POLICY=PASSIVE (every process of both
sides inherits it; it brought 2 threads back to 1.2 s there) or pass `--threads 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = (
    "sft.enabled=false",  # RL from the tiny model as built: the weights TRL loads
    "algo.loss.kl_coef=0",
    "data.eval=null",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.save_final=false",
    "dashboards.report=false",
)
"""Overrides of the demo config that define the compared job (both sides read it)."""

COLUMNS = ("step", "generate", "reward", "train", "sync", "other", "tokens")


def our_config(overrides: list[str]) -> Any:
    from gmai_rl.train import compose

    return compose([*SHARED, *overrides])


# ------------------------------------------------------------------ TRL


def trl_dataset(cfg: Any, count: int) -> tuple[Any, list[Any]]:
    """The first `count` training items as TRL's conversational prompts with an "image" column
    (decoded on access, as our rollout worker reads its images), and the items."""
    from datasets import Dataset, Image

    from gmai_rl.data.prompts import format_question
    from gmai_rl.feed import load_datasets, prepare_artifacts

    prepare_artifacts(cfg)
    items = load_datasets(cfg).train[:count]
    system = (
        [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    )
    rows = [
        {
            "prompt": [*system, {"role": "user", "content": format_question(item)}],
            "image": item.images[0],
            "item": index,
        }
        for index, item in enumerate(items)
    ]
    if any(len(item.images) != 1 for item in items):
        raise ValueError("the synthetic items have one image each")
    return Dataset.from_list(rows).cast_column("image", Image()), items


def trl_row(
    cfg: Any, gradient_checkpointing: bool, steps: int, warmup: int, threads: int
) -> dict[str, float]:
    import torch
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gmai_rl.models.tokens import vision_token_ids
    from gmai_rl.reward.worker import RewardWorker

    torch.set_num_threads(threads)
    prompts, n = cfg.algo.prompts_per_step, cfg.rollout.samples_per_prompt
    micro, minibatches = cfg.learner.micro_batch_size, cfg.learner.num_minibatches
    batch = prompts * n
    rl_steps = warmup + steps
    dataset, items = trl_dataset(cfg, prompts * rl_steps)
    worker = RewardWorker(format_weight=cfg.reward.format_weight)
    processor = AutoProcessor.from_pretrained(cfg.model.path)

    def mcq_reward(completions: list[Any], item: list[int], **_: Any) -> list[float]:
        pairs = [(c[0]["content"], items[i]) for c, i in zip(completions, item, strict=True)]
        return [r["total"] for r in worker.score(pairs)]

    clock = {"generate": 0.0, "reward": 0.0, "tokens": 0.0}
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_tokens: list[int] = []  # per prompt: the images did reach the model

    class Timed(GRPOTrainer):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = super()._generate(*args, **kwargs)
            clock["generate"] += time.perf_counter() - start
            clock["tokens"] += sum(len(ids) for ids in out[1])  # completion_ids_list
            image_tokens.extend(ids.count(image_pad) for ids in out[0])  # prompt_ids_list
            return out

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            clock["reward"] += time.perf_counter() - start
            return out

    records: list[dict[str, float]] = []

    class EveryRLStep(TrainerCallback):
        """Closes a record every `minibatches` optimizer steps (one generation batch)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.mark, self.seen = time.perf_counter(), dict(clock)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step % minibatches:
                return
            now = time.perf_counter()
            record = {k: clock[k] - self.seen[k] for k in clock}
            record["step"] = now - self.mark
            record["train"] = record["step"] - record["generate"] - record["reward"]
            records.append(record)
            self.mark, self.seen = now, dict(clock)

    optim = cfg.rl_optim
    loss = cfg.algo.loss
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=minibatches,
            seed=cfg.trainer.seed,
            max_steps=rl_steps * minibatches,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch // (minibatches * micro),
            steps_per_generation=batch // micro,
            num_generations=n,
            max_completion_length=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            generation_kwargs={"suppress_tokens": vision_token_ids(processor.tokenizer)},
            learning_rate=optim.lr,
            lr_scheduler_type="constant",
            warmup_steps=optim.warmup_steps,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1],
            max_grad_norm=cfg.learner.grad_clip,
            beta=loss.kl_coef,
            epsilon=loss.clip_eps_low,
            epsilon_high=loss.clip_eps_high,
            loss_type="dapo",
            gradient_checkpointing=gradient_checkpointing,
        )
        trainer = Timed(
            model=cfg.model.path,
            reward_funcs=mcq_reward,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
        )
        trainer.add_callback(EveryRLStep())
        trainer.train()
    if not image_tokens or min(image_tokens) == 0:
        raise RuntimeError(f"a TRL prompt had no image tokens: {sorted(set(image_tokens))}")
    return summarize(records[warmup:])


# ------------------------------------------------------------------ ours


def ours_row(
    steps: int, warmup: int, threads: int, staleness: int, extra: list[str]
) -> dict[str, float]:
    from gmai_rl.loop import run

    with tempfile.TemporaryDirectory() as out:
        cfg = our_config(
            [
                "cluster.learner_ranks=1",
                "cluster.rollout_workers=1",
                f"learner.torch_threads={threads}",
                f"rollout.torch_threads={threads}",
                f"algo.max_staleness={staleness}",
                f"trainer.steps={warmup + steps}",
                f"trainer.output_dir={out}",
                *extra,
            ]
        )
        run(cfg)
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    import ray

    ray.shutdown()
    steady = [r for r in map(json.loads, lines) if r["stage"] == "rl"][warmup:]
    records = []
    for r in steady:
        stages = ("generate", "reward", "train", "sync")
        record = {k: r.get(f"time_{k}_s", 0.0) for k in ("step", *stages)}
        record["other"] = record["step"] - sum(record[k] for k in stages)
        record["tokens"] = r["generated_tokens"]
        records.append(record)
    return summarize(records)


# ------------------------------------------------------------------ table


def summarize(records: list[dict[str, float]]) -> dict[str, float]:
    if not records:
        raise ValueError("no RL step after the warm-up: raise --steps")
    row = {k: statistics.median(r.get(k, 0.0) for r in records) for k in COLUMNS}
    row["steps"] = len(records)
    row["tok_per_s"] = statistics.median(r["tokens"] / r["step"] for r in records)
    row["gen_tok_per_s"] = statistics.median(r["tokens"] / r["generate"] for r in records)
    return row


def print_table(rows: dict[str, dict[str, float]], reference: str | None) -> None:
    print(
        "| run | s / step | generate s | reward s | train s | sync s | other s | tokens / step "
        "| tok/s (step) | tok/s (generate) | step vs TRL (GC on) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = rows[reference]["step"] if reference in rows else None
    for name, r in rows.items():
        ratio = f"{r['step'] / base:.2f}x" if base else "-"
        print(
            f"| {name} | {r['step']:.3f} | {r['generate']:.3f} | {r['reward']:.4f} | "
            f"{r['train']:.3f} | {r['sync']:.3f} | {r['other']:.3f} | {r['tokens']:.0f} | "
            f"{r['tok_per_s']:.0f} | {r['gen_tok_per_s']:.0f} | {ratio} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed RL steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="RL steps before timing")
    parser.add_argument("--ours", action="store_true", help="add our trainer's row")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads: TRL's process, each of our actors"
    )
    parser.add_argument("--ours-staleness", type=int, default=0, help="our algo.max_staleness")
    parser.add_argument("overrides", nargs="*", help="more overrides for our row, key=value")
    args = parser.parse_args()
    if args.no_trl and not args.ours:
        parser.error("nothing to run: --no-trl without --ours")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = our_config([])
    load = os.getloadavg()[0]
    print(f"model {cfg.model.path}; load average {load:.1f} on {os.cpu_count()} cores", flush=True)
    if load > 1.0:
        print(
            "warning: other work is running; with more runnable threads than cores, torch's OpenMP "
            "threads spin-wait for each other and a step slows many-fold (2 threads: 10-20x "
            "measured): export OMP_WAIT_POLICY=PASSIVE or pass --threads 1",
            file=sys.stderr,
        )

    rows: dict[str, dict[str, float]] = {}
    trl_on, trl_off = (
        "TRL GRPOTrainer, gradient checkpointing on (default)",
        "TRL, checkpointing off",
    )
    if not args.no_trl:
        try:
            import trl
        except ImportError as err:
            print(f"TRL is not installed here ({err}): make bench-env, then run this with "
                  ".venv-bench/bin/python, or pass --ours --no-trl", file=sys.stderr)  # fmt: skip
            return 1
        print(f"TRL {trl.__version__}", flush=True)
        rows[trl_on] = trl_row(cfg, True, args.steps, args.warmup, args.threads)
        rows[trl_off] = trl_row(cfg, False, args.steps, args.warmup, args.threads)
    if args.ours:
        name = (
            f"ours, 1 learner + 1 rollout worker, {args.threads} threads each, "
            f"max_staleness {args.ours_staleness}"
        )
        rows[name] = ours_row(
            args.steps, args.warmup, args.threads, args.ours_staleness, args.overrides
        )
    print(
        f"\n{cfg.algo.prompts_per_step} prompts x {cfg.rollout.samples_per_prompt}, <= "
        f"{cfg.rollout.max_new_tokens} new tokens, {args.threads} torch threads; medians over "
        f"{args.steps} RL steps after {args.warmup}; load average {os.getloadavg()[0]:.1f} at the end; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print_table(rows, trl_on)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
