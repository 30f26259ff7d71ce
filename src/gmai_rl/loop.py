"""The driver: GRPO on a Ray cluster, stage by stage, in data-flow order.

    run         prepare data -> pre-flight plan (gmai_rl.plan) -> start the cluster
                -> SFT cold start -> evaluate -> RL -> evaluate -> final checkpoint -> report
    run_rl      trainer.steps RL steps (gmai_rl.pipeline.Pipeline.step: collect a batch, train,
                push the weights), with periodic evaluations and resumable checkpoints

Every remote call goes through the cluster (gmai_rl.cluster), which replaces the workers that
die; every group records the policy version that generated it, so the staleness of what is
trained on is measured and checked against `algo.max_staleness` every step, never assumed.
Every record goes to metrics.jsonl and the configured dashboards (gmai_rl.dashboards); long
phases show their progress (gmai_rl.progress).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmai_rl.algo.staleness import drain_points
from gmai_rl.benchmarks.items import BenchItem
from gmai_rl.benchmarks.results import flat_metrics
from gmai_rl.benchmarks.scoring import load_judge
from gmai_rl.checkpoint import (
    DriverState,
    begin,
    checkpoint_root,
    commit,
    complete_checkpoints,
    prune,
    resolve_resume,
)
from gmai_rl.cluster.cluster import Cluster
from gmai_rl.cluster.environment import check_output_dir
from gmai_rl.cluster.protocol import TrainingCluster
from gmai_rl.cluster.session import ray_session
from gmai_rl.config import TrainConfig
from gmai_rl.config_checks import validate
from gmai_rl.dashboards import Dashboards, open_dashboards, run_name
from gmai_rl.data import build_prompt
from gmai_rl.data.trained_prompt import record_system_prompt
from gmai_rl.evaluate import (
    benchmark_line,
    evaluate_benchmarks,
    generate_on_workers,
    summarize,
)
from gmai_rl.feed import Datasets, ItemSampler, load_datasets, prepare_artifacts, sft_samples
from gmai_rl.metrics import eval_line, progress_line, step_metrics
from gmai_rl.pipeline import Pipeline
from gmai_rl.plan import check, make_plan, render
from gmai_rl.progress import Progress
from gmai_rl.report import write_report
from gmai_rl.types import Group, MCQItem, Prompt, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One run as its stages see it: what it was asked, its data, where it writes, its cluster."""

    cfg: TrainConfig
    data: Datasets
    out: Path
    dashboards: Dashboards
    cluster: TrainingCluster
    resume_from: Path | None = None
    """The checkpoint the run continues (`trainer.resume`), if any..."""
    resumed: DriverState | None = None
    """... and the driver's state in it."""
    round: int = 1
    """The round being run (`trainer.rounds`)."""
    synth: dict[str, Any] = field(default_factory=dict)
    """What the round's rejection sampling kept (rounds after the first)."""

    def write(self, record: dict[str, Any]) -> None:
        """A record to the dashboards, with its round when the run has several."""
        if self.cfg.trainer.rounds > 1:
            record = {**record, "round": self.round}
        self.dashboards.write(record)

    def global_step(self, step: int) -> int:
        """RL steps done over the rounds when `step` are done in this one."""
        return (self.round - 1) * self.cfg.trainer.steps + step


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run the configured job end to end (or continue it from a checkpoint: `trainer.resume`);
    returns what eval.json holds."""
    started = time.perf_counter()
    validate(cfg)
    check_output_dir(cfg.trainer.output_dir)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = resume_point(cfg)
    prepare_artifacts(cfg)
    data = load_datasets(cfg)
    data_s = time.perf_counter() - started
    preflight(cfg, data)
    with ray_session(cfg):
        result = run_on_cluster(cfg, data, out, resume, data_s, started)
    if cfg.dashboards.report and (md := report(cfg, out, result, time.perf_counter() - started)):
        result["report"] = str(md)
    return result


def run_on_cluster(
    cfg: TrainConfig, data: Datasets, out: Path, resume: Path | None, data_s: float, started: float
) -> dict[str, Any]:
    """Start the cluster, then SFT, evaluation, RL, evaluation and the final checkpoint (or the
    rest of a resumed run); the cluster is shut down at the end."""
    state = DriverState.read(resume) if resume else None
    # Before the cluster starts (minutes on a GPU node): a dashboard that cannot open (W&B online
    # without network) fails the run in seconds.
    dashboards = open_dashboards(cfg, out, keep_lines=state.metrics_lines if state else 0)
    cluster: Cluster | None = None
    failed = True
    try:
        cluster = Cluster.start(cfg)
        setup = {"stage": "setup", "data_seconds": data_s}
        setup["startup_seconds"] = time.perf_counter() - started - data_s
        result = train(Run(cfg, data, out, dashboards, cluster, resume, state), setup)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        failed = False
    finally:
        dashboards.close(failed)
        if cluster is not None:
            cluster.shutdown()
    return result


def train(run: Run, setup: dict[str, Any]) -> dict[str, Any]:
    """The rounds on a started cluster; returns what eval.json holds (the first round's
    evaluation before RL, the last round's after, and with several rounds each round's)."""
    cfg, cluster, resume, resumed = run.cfg, run.cluster, run.resume_from, run.resumed
    result: dict[str, Any] = {"output_dir": str(run.out)}
    rounds: list[dict[str, Any]] = []
    if resumed is not None and resume is not None:
        restore_start = time.perf_counter()
        cluster.restore_state(str(resume), resumed.policy_version)
        restore_s = time.perf_counter() - restore_start
        log.info(
            "resumed from %s after RL step %d of round %d (%.1f s)",
            resume,
            resumed.step,
            resumed.round,
            restore_s,
        )
        info = {"resumed_from": str(resume), "resumed_step": resumed.step}
        run.dashboards.write({**setup, **info, "restore_seconds": restore_s})
        rounds, run.round = list(resumed.rounds), resumed.round
        if resumed.step == cfg.trainer.steps and resumed.round < cfg.trainer.rounds:
            # The round ended with its checkpoint; its evaluation after RL was not kept.
            rounds.append(finish_round(run, resumed.before_rl, resumed.during_rl, resumed.synth))
            run.round, run.resumed = resumed.round + 1, None
    else:
        run.dashboards.write(setup)
    while run.round <= cfg.trainer.rounds:
        rounds.append(run_round(run, rounds))
        run.round, run.resumed = run.round + 1, None
    result["before_rl"] = rounds[0]["before_rl"]
    result["during_rl"] = rounds[-1]["during_rl"]
    result["after_rl"] = rounds[-1]["after_rl"]
    if cfg.trainer.rounds > 1:
        result["rounds"] = rounds
    if cfg.trainer.save_final:
        cluster.save(str(run.out / "final"))
        for export in (run.out / "final", run.out / "final" / "merged"):  # merged: LoRA's
            if export.is_dir():
                record_system_prompt(export, cfg.data.system_prompt)
        result["checkpoint"] = str(run.out / "final")
    return result


def run_round(run: Run, rounds_done: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """One round: its SFT (round 1: the cold start on data.sft; later rounds: on the traces the
    policy's rejection sampling kept), the evaluation before RL, RL, the evaluation after; or the
    rest of it from a checkpoint taken inside its RL."""
    cfg, resumed = run.cfg, run.resumed
    if resumed is not None:
        before_rl, run.synth = resumed.before_rl, resumed.synth
    else:
        run.synth = {}
        if run.round > 1:
            run.synth, items = synthesize(run)
            if items:  # else nothing to learn from: the policy goes on to RL as it is
                run_sft(run, items, cfg.synth.sft_steps or cfg.sft.steps)
                run.cluster.sync_weights(cfg.sync.verify)
        elif cfg.sft.enabled:
            run_sft(run, run.data.sft, cfg.sft.steps)
            run.cluster.sync_weights(cfg.sync.verify)
        before_rl = evaluate_and_record(run, "before_rl", run.global_step(0))
    during_rl = run_rl(run, before_rl, rounds_done)
    return finish_round(run, before_rl, during_rl, run.synth)


def finish_round(
    run: Run, before_rl: dict[str, Any], during_rl: list[dict[str, Any]], synth: dict[str, Any]
) -> dict[str, Any]:
    """The round's evaluation after RL, and its record (also in round-<r>/eval.json)."""
    after_rl = evaluate_and_record(run, "after_rl", run.global_step(run.cfg.trainer.steps))
    done = {
        "round": run.round,
        "synth": synth,
        "before_rl": before_rl,
        "during_rl": during_rl,
        "after_rl": after_rl,
    }
    if run.cfg.trainer.rounds > 1:
        folder = run.out / f"round-{run.round}"
        folder.mkdir(exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(done, indent=2))
    return done


def synthesize(run: Run) -> tuple[dict[str, Any], list[MCQItem]]:
    """Rejection sampling by the current policy on the cluster (gmai_rl.rejection) into
    round-<r>/synth.jsonl, resumed if a checkpoint's restart cut it off; (its counts, the kept
    traces as SFT items)."""
    from gmai_rl.data import load_mcq_jsonl
    from gmai_rl.rejection import (
        Filters,
        SynthOutput,
        provenance,
        question_id,
        sample_on_cluster,
    )

    cfg, s = run.cfg, run.cfg.synth
    filters = Filters(s.k, s.keep_per_question, s.min_accuracy, s.max_accuracy)
    sampling = SamplingParams(
        s.temperature, 1.0, s.max_new_tokens or cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )
    out = run.out / f"round-{run.round}" / "synth.jsonl"
    made = provenance(
        cfg.model.path,
        run.cluster.version,
        cfg.data.train,
        sampling,
        filters,
        s.max_items,
        cfg.data.system_prompt,
        round=run.round,
    )
    output = SynthOutput(out, made)
    asked = run.data.train[: s.max_items]
    todo = [item for item in asked if item.id not in output.done]
    start = time.perf_counter()
    stats = sample_on_cluster(
        run.cluster, cfg, todo, sampling, cfg.data.system_prompt, filters, output
    )
    items = load_mcq_jsonl(out) if out.stat().st_size else []
    counts = {
        "questions": len(asked),
        "kept": len(items),
        "questions_with_a_trace": len({question_id(i.id) for i in items}),
        "rejected": dict(stats.rejected),
        "filtered": dict(stats.filtered),
    }
    run.write(
        {
            "stage": "synth",
            "step": run.global_step(0),
            **counts,
            "seconds": time.perf_counter() - start,
        }
    )
    log.info("round %d: %s -> %s", run.round, stats.line(), out)
    if not items:
        log.warning("round %d: rejection sampling kept no trace: no SFT this round", run.round)
    return counts, items


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from; a fresh start may not overwrite another run's."""
    resume = resolve_resume(cfg.trainer.resume, cfg.trainer.output_dir)
    existing = complete_checkpoints(checkpoint_root(cfg.trainer.output_dir))
    if cfg.trainer.resume is None and existing:
        raise ValueError(
            f"trainer.output_dir={cfg.trainer.output_dir} already holds checkpoints of a run "
            f"({existing[-1].name}): set trainer.resume=auto to continue it, or choose another "
            "trainer.output_dir"
        )
    return resume


def report(cfg: TrainConfig, out: Path, result: dict[str, Any], wall_s: float) -> Path | None:
    """report.png and report.md beside metrics.jsonl; the markdown's path. Training is done and
    saved by now, so a failure here is logged, not raised (None)."""
    try:
        png, md = write_report(out, cfg, result, cfg.dashboards.run_name or run_name(out), wall_s)
    except Exception:
        log.exception("could not write the run's report (metrics.jsonl and eval.json are complete)")
        return None
    log.info("report: %s, %s", md, png)
    return md


def preflight(cfg: TrainConfig, data: Datasets) -> None:
    """Log the pre-flight plan (memory per GPU, prompt budget measured on the questions,
    placement); stop, before anything starts, when it cannot fit or the data cannot run."""
    asked = [*data.train, *data.eval, *(item.for_plan() for item in data.benchmarks)]
    plan = make_plan(cfg, items=asked, trained=[*data.train, *data.sft])
    log.info("%s", render(plan))
    problems = check(plan)
    if problems:
        raise ValueError(
            "the configuration cannot fit (gmai-rl plan prints the whole plan):\n  "
            + "\n  ".join(problems)
        )


# -------------------------------------------------------------------------------------- sft


def run_sft(run: Run, items: Sequence[MCQItem], steps: int) -> None:
    """Cross-entropy on reference reasoning traces: the paper's cold start (data.sft), or a
    later round's rejection-sampled traces."""
    from gmai_rl.models.loading import load_processor, tokenizer_of

    cfg = run.cfg
    tokenizer = tokenizer_of(load_processor(cfg.model))
    sampler = ItemSampler(sft_samples(items, tokenizer, cfg.data.system_prompt), cfg.trainer.seed)
    run.cluster.start_stage(cfg.sft.optim.for_stage(steps))
    with Progress.of(cfg.dashboards, "sft", steps, unit="step") as bar:
        for step in range(steps):
            start = time.perf_counter()
            record = {
                "stage": "sft",
                "step": step,
                **run.cluster.train_sft(sampler.take(cfg.sft.batch_size)),
                "seconds": time.perf_counter() - start,
            }
            run.write(record)
            bar.update(loss=record["sft_loss"])
            if step % 10 == 0 or step == steps - 1:
                log.info(
                    "sft %d/%d | loss %.4f | lr %.2e",
                    step + 1,
                    steps,
                    record["sft_loss"],
                    record["lr"],
                )


# --------------------------------------------------------------------------------------- rl


def run_rl(
    run: Run, before_rl: dict[str, Any], rounds_done: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """`trainer.steps` RL steps with periodic evaluation and checkpoints; returns the evaluations.

    From a checkpoint the learners already hold their stage, schedule position and KL
    reference, and the item order continues where it stopped.
    """
    cfg, resumed = run.cfg, run.resumed
    # Each round draws its own order of the train split (round 1's is the seed's).
    sampler = ItemSampler(run.data.train, cfg.trainer.seed + 7919 * (run.round - 1))
    history: list[dict[str, Any]] = []
    if resumed is None:
        # The KL reference (if any) is the policy RL starts from, i.e. after the SFT cold start.
        run.cluster.start_stage(cfg.rl_optim, reset_reference=True)
    else:
        sampler.load_state(resumed.sampler)
        history = list(resumed.during_rl)
    first, steps = (resumed.step if resumed else 0), cfg.trainer.steps
    drains = drain_points(steps, cfg.trainer.eval_every, cfg.trainer.save_every)
    with (
        Progress.of(cfg.dashboards, "rl", steps, unit="step") as bar,
        Pipeline(run.cluster, sampler, cfg, steps, drains) as pipeline,
    ):
        if first:
            bar.advance_to(first)
        for step in range(first, steps):
            record = step_metrics(step, pipeline.step(step))
            run.write({**record, "step": run.global_step(step)})
            log.info(progress_line(record, steps))
            bar.update(reward=record["reward_mean"], acc=record["accuracy"])
            if step == first:
                # Start-up cost is what a user waits for before training shows: a line to find.
                log.info("first RL step done at unix time %.3f", time.time())
            done = step + 1
            evaluates = cfg.trainer.eval_every and done % cfg.trainer.eval_every == 0
            if (
                evaluates
                and done < steps
                and (evaluation := evaluate_and_record(run, "during_rl", run.global_step(done)))
            ):
                history.append({"step": run.global_step(done), **evaluation})
            every = cfg.trainer.save_every
            if every and (done % every == 0 or done == steps):
                state = DriverState(
                    done,
                    record["policy_version"],
                    sampler.state(),
                    run.dashboards.jsonl.lines,
                    before_rl,
                    history,
                    run.round,
                    list(rounds_done),
                    run.synth,
                )
                save_checkpoint(run.cluster, cfg, state, run.global_step(done))
    return history


def save_checkpoint(
    cluster: TrainingCluster, cfg: TrainConfig, state: DriverState, step: int | None = None
) -> Path:
    """Write a resumable checkpoint atomically (gmai_rl.checkpoint), keep the newest ones; it is
    named by `step`, the RL steps done over the rounds (default: the state's)."""
    root = checkpoint_root(cfg.trainer.output_dir)
    partial = begin(root, state.step if step is None else step)
    start = time.perf_counter()
    cluster.save_state(str(partial))
    state.write(partial)
    final = commit(partial)
    prune(root, cfg.trainer.keep_checkpoints)
    log.info("checkpoint %s written in %.1f s", final, time.perf_counter() - start)
    return final


# ------------------------------------------------------------------------------------- eval


EVAL_LOG = {"before_rl": "before RL", "during_rl": "at step {step}", "after_rl": "after RL"}
"""How the log names an evaluation of each phase."""


def evaluate_and_record(run: Run, phase: str, step: int) -> dict[str, Any]:
    """Evaluate after `step` RL steps, log it and record it (stage "eval", with its seconds),
    then the benchmarks (stage "bench": `bench/<name>/...` on the dashboards; in what this
    returns, "benchmarks")."""
    start = time.perf_counter()
    evaluation = evaluate(run.cluster, run.data.eval, run.cfg)
    if evaluation:
        seconds = time.perf_counter() - start
        run.write({"stage": "eval", "phase": phase, "step": step, **evaluation, "seconds": seconds})
    log.info("held-out %s: %s", EVAL_LOG[phase].format(step=step), eval_line(evaluation))
    if run.data.benchmarks:
        start = time.perf_counter()
        benchmarks = evaluate_on_benchmarks(run.cluster, run.data.benchmarks, run.cfg)
        metrics = {k.removeprefix("bench/"): v for k, v in flat_metrics(benchmarks).items()}
        seconds = time.perf_counter() - start
        run.write({"stage": "bench", "phase": phase, "step": step, **metrics, "seconds": seconds})
        for name, bench in benchmarks.items():
            log.info("%s %s", EVAL_LOG[phase].format(step=step), benchmark_line(name, bench))
        evaluation = {**evaluation, "benchmarks": benchmarks}
    return evaluation


def evaluate_on_benchmarks(
    cluster: TrainingCluster, items: Sequence[BenchItem], cfg: TrainConfig
) -> dict[str, Any]:
    """The benchmarks' questions, one answer each, generated on the rollout workers as the
    held-out evaluation is (`generate_on_workers`) and scored by `gmai_rl.benchmarks`."""
    sampling = SamplingParams(
        cfg.rollout.eval_temperature, 1.0, cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )

    def generate(prompts: Sequence[Prompt]) -> list[Group]:
        return generate_on_workers(cluster, prompts, sampling, cfg, "benchmarks")

    judge = load_judge(cfg.eval.judge)
    return evaluate_benchmarks(
        generate, items, cfg.eval.prompt_style, cfg.data.system_prompt, judge
    )


def evaluate(
    cluster: TrainingCluster, items: Sequence[MCQItem], cfg: TrainConfig
) -> dict[str, Any]:
    """Held-out accuracy of one answer per question (greedy by default): see gmai_rl.evaluate."""
    if not items:
        return {}
    sampling = SamplingParams(
        cfg.rollout.eval_temperature, 1.0, cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )
    prompts = [build_prompt(item, cfg.data.system_prompt) for item in items]
    return summarize(generate_on_workers(cluster, prompts, sampling, cfg, "eval"), items)
