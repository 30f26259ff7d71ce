"""The driver: GRPO on Ray, one readable function per stage, in data-flow order.

    prepare  -> tiny model and synthetic data when the config asks for them and they are absent
    start    -> placement group, learner ranks (DeepSpeed), rollout workers, reward workers, sync
    sft      -> optional cold start: cross-entropy on reasoning traces, then push the weights
    rl step  -> sample prompts -> generate n each -> reward -> filter (refill) -> advantages
                -> train (PPO epochs on the learner ranks) -> push weights -> log
    eval     -> greedy answers to held-out questions: accuracy before and after RL (and every N)

Every group records the policy version that generated it; with one sync per step the rollout is
always on-policy (staleness 0), and the metrics say so rather than assume it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gmai_rl.algo import filter_by_accuracy, group_advantages
from gmai_rl.cluster import Cluster, init_ray, start_cluster
from gmai_rl.config import AlgoConfig, TrainConfig, validate
from gmai_rl.data import build_prompt, load_mcq_jsonl, sft_target
from gmai_rl.evaluate import summarize
from gmai_rl.learner.batching import plan_rank_batches, split_even
from gmai_rl.learner.worker import combine_rank_metrics
from gmai_rl.types import Group, MCQItem, SamplingParams, TrainSample

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- prepare


def prepare_artifacts(cfg: TrainConfig) -> None:
    """Build the offline tiny model and the synthetic dataset when configured and missing."""
    if cfg.model.build_tiny_if_missing and not (Path(cfg.model.path) / "config.json").exists():
        from gmai_rl.models.tiny import make_tiny_model

        log.info("building the tiny offline model at %s", cfg.model.path)
        make_tiny_model(cfg.model.path, seed=cfg.trainer.seed)
    syn = cfg.data.synthetic
    if syn is not None and not (Path(syn.dir) / "train.jsonl").exists():
        from gmai_rl.data.synthetic import write_synthetic_dataset

        log.info("writing the synthetic dataset to %s", syn.dir)
        write_synthetic_dataset(
            syn.dir,
            n_train=syn.n_train,
            n_eval=syn.n_eval,
            seed=syn.seed,
            tasks=syn.tasks,
            image_size=syn.image_size,
            shuffle_options=syn.shuffle_options,
            sft_answers=syn.sft_answers,  # type: ignore[arg-type]
        )


@dataclass
class Datasets:
    train: list[MCQItem]
    eval: list[MCQItem] = field(default_factory=list)
    sft: list[MCQItem] = field(default_factory=list)


def load_datasets(cfg: TrainConfig) -> Datasets:
    d = cfg.data

    def load(path: str) -> list[MCQItem]:
        return load_mcq_jsonl(path, image_root=d.image_root, on_error=d.on_error)

    data = Datasets(train=load(d.train))
    if d.eval:
        data.eval = load(d.eval)[: d.max_eval_items]
    if cfg.sft.enabled and d.sft:
        data.sft = load(d.sft)
        missing = [item.source for item in data.sft if item.reasoning is None]
        if missing:
            raise ValueError(f"SFT records need reasoning; none in {missing[:3]} ...")
    log.info(
        "data: %d train, %d eval, %d sft items", len(data.train), len(data.eval), len(data.sft)
    )
    return data


class ItemSampler:
    """Endless draws without replacement, reshuffled every epoch (seeded)."""

    def __init__(self, items: Sequence[MCQItem], seed: int) -> None:
        if not items:
            raise ValueError("no training items")
        self.items, self.rng, self.order = list(items), random.Random(seed), []  # type: ignore[var-annotated]
        self.epoch = 0

    def take(self, k: int) -> list[MCQItem]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            out.append(self.items[self.order.pop()])
        return out


class StageTimer:
    """Seconds spent per stage within one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


# ------------------------------------------------------------------------- rollout + reward


def generate(
    cluster: Cluster,
    items: Sequence[MCQItem],
    n: int,
    sampling: SamplingParams,
    system_prompt: str | None,
) -> list[Group]:
    """n completions per item, the prompts spread evenly over the rollout workers."""
    import ray

    prompts = [build_prompt(item, system_prompt) for item in items]
    workers = cluster.rollouts
    per_worker = math.ceil(len(prompts) / len(workers))
    refs = [
        worker.generate.remote(prompts[i * per_worker : (i + 1) * per_worker], n, sampling)
        for i, worker in enumerate(workers)
        if prompts[i * per_worker : (i + 1) * per_worker]
    ]
    return [group for groups in ray.get(refs) for group in groups]


def score(cluster: Cluster, groups: Sequence[Group], items: Sequence[MCQItem]) -> None:
    """Fill each group's per-completion reward breakdowns (in place)."""
    import ray

    pairs = [(c.text, item) for g, item in zip(groups, items, strict=True) for c in g.completions]
    workers = cluster.rewards
    per_worker = math.ceil(len(pairs) / len(workers))
    refs = [
        worker.score.remote(pairs[i * per_worker : (i + 1) * per_worker])
        for i, worker in enumerate(workers)
        if pairs[i * per_worker : (i + 1) * per_worker]
    ]
    breakdowns = iter(b for chunk in ray.get(refs) for b in chunk)
    for g in groups:
        g.rewards = [next(breakdowns) for _ in g.completions]


def group_accuracy(group: Group) -> float:
    if any("accuracy" not in r for r in group.rewards):
        raise ValueError(
            "algo.accuracy_filter needs an 'accuracy' in every reward breakdown; the configured "
            "reward returns none (disable the filter or add it)"
        )
    return sum(r["accuracy"] for r in group.rewards) / len(group.rewards)


@dataclass
class CollectStats:
    generated_groups: int = 0
    dropped_too_easy: int = 0
    dropped_too_hard: int = 0
    padded_groups: int = 0
    """Filtered-out groups put back because refilling ran out of rounds."""
    rounds: int = 0
    all_groups: list[Group] = field(default_factory=list)


RolloutFn = Callable[[list[MCQItem]], list[Group]]
"""Generate n completions for each item and score them: one scored Group per item, in order."""


def rollout_fn(cluster: Cluster, cfg: TrainConfig, timer: StageTimer) -> RolloutFn:
    sampling = SamplingParams(
        cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens
    )

    def rollout(items: list[MCQItem]) -> list[Group]:
        with timer("generate"):
            groups = generate(
                cluster, items, cfg.rollout.samples_per_prompt, sampling, cfg.data.system_prompt
            )
        with timer("reward"):
            score(cluster, groups, items)
        return groups

    return rollout


def collect_groups(
    rollout: RolloutFn, sampler: ItemSampler, want: int, algo: AlgoConfig
) -> tuple[list[Group], CollectStats]:
    """Roll out prompts until `want` groups pass the online accuracy filter.

    Each refill round oversamples by the drop rate seen so far. When the rounds run out, the batch
    is topped up with filtered-out groups (counted as padded) so every step trains on a full batch.
    """
    kept: list[Group] = []
    dropped: list[Group] = []
    stats = CollectStats()
    for _ in range(1 + (algo.max_refill_rounds if algo.accuracy_filter else 0)):
        missing = want - len(kept)
        if missing <= 0:
            break
        keep_rate = len(kept) / stats.generated_groups if stats.generated_groups else 1.0
        groups = rollout(sampler.take(math.ceil(missing / max(keep_rate, 0.25))))
        stats.rounds += 1
        stats.generated_groups += len(groups)
        stats.all_groups += groups
        if not algo.accuracy_filter:
            kept += groups
            continue
        result = filter_by_accuracy(
            [group_accuracy(g) for g in groups], algo.filter_low, algo.filter_high
        )
        stats.dropped_too_easy += result.dropped_too_easy
        stats.dropped_too_hard += result.dropped_too_hard
        keep = set(result.keep)
        kept += [g for i, g in enumerate(groups) if i in keep]
        dropped += [g for i, g in enumerate(groups) if i not in keep]
    if len(kept) < want:
        stats.padded_groups = want - len(kept)
        kept += dropped[: stats.padded_groups]
    return kept[:want], stats


def make_train_samples(groups: Sequence[Group], estimator: str) -> list[TrainSample]:
    """Group-relative advantages of the total reward, one TrainSample per completion."""
    rewards = torch.tensor([[r["total"] for r in g.rewards] for g in groups])  # [G, n]
    advantages = group_advantages(rewards, estimator)  # [G, n]
    return [
        TrainSample(g.prompt, g.prompt_ids, c.token_ids, float(a), c.logprobs, g.policy_version)
        for g, row in zip(groups, advantages.tolist(), strict=True)
        for c, a in zip(g.completions, row, strict=True)
    ]


# ------------------------------------------------------------------------------ train + sync


def train(
    cluster: Cluster, samples: Sequence[TrainSample], num_minibatches: int
) -> dict[str, float]:
    import ray

    plans = plan_rank_batches(samples, len(cluster.learners), num_minibatches)
    sums = ray.get(
        [
            learner.train_rl.remote(plan)
            for learner, plan in zip(cluster.learners, plans, strict=True)
        ]
    )
    return combine_rank_metrics(sums)


def sync_weights(cluster: Cluster, verify: bool) -> int:
    """Push the learner's weights to every rollout worker; returns the new policy version.

    All sends and receives are launched before any is awaited: each blocks on the others.
    With `verify`, every tensor's checksum on every worker must equal what rank 0 sent.
    """
    import ray

    pushes = [
        learner.push_weights.remote(cluster.sync_plan, verify) for learner in cluster.learners
    ]
    receipts = [r.receive_weights.remote(cluster.sync_plan, verify) for r in cluster.rollouts]
    sent = ray.get(pushes)[0]
    received = ray.get(receipts)
    versions = {r["version"] for r in received}
    if len(versions) != 1:
        raise RuntimeError(f"rollout workers disagree on the policy version: {sorted(versions)}")
    if verify:
        for i, r in enumerate(received):
            bad = [
                name for name, digest in (sent or {}).items() if r["checksums"].get(name) != digest
            ]
            if bad or len(r["checksums"]) != len(sent or {}):
                raise RuntimeError(
                    f"rollout worker {i}: weights differ from the learner's: {bad[:5]}"
                )
    return versions.pop()


# ------------------------------------------------------------------------------------- sft


def sft_samples(
    items: Sequence[MCQItem], tokenizer: Any, system_prompt: str | None
) -> list[TrainSample]:
    """Prompt + reference "<think>..</think><answer>X</answer><|im_end|>" as a learner sample."""
    from gmai_rl.rollout.hf import stop_token_ids

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        end_of_turn = stop_token_ids(tokenizer)[0]
    return [
        TrainSample(
            build_prompt(item, system_prompt),
            [],
            [*tokenizer.encode(sft_target(item), add_special_tokens=False), end_of_turn],
        )
        for item in items
    ]


def run_sft(
    cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig, metrics: MetricsLog
) -> None:
    import ray

    from gmai_rl.models.loading import load_processor, tokenizer_of

    samples = sft_samples(items, tokenizer_of(load_processor(cfg.model)), cfg.data.system_prompt)
    rng = random.Random(cfg.trainer.seed)
    ray.get([learner.start_stage.remote(cfg.sft.optim) for learner in cluster.learners])
    order: list[int] = []
    for step in range(cfg.sft.steps):
        start = time.perf_counter()
        batch = []
        while len(batch) < cfg.sft.batch_size:
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            batch.append(samples[order.pop()])
        num_tokens = sum(len(s.completion_ids) for s in batch)
        shards = split_even(batch, len(cluster.learners))
        ranks = ray.get(
            [
                learner.train_sft.remote(shard, num_tokens)
                for learner, shard in zip(cluster.learners, shards, strict=True)
            ]
        )
        record = {
            "stage": "sft",
            "step": step,
            "sft_loss": sum(r["sft_loss"] for r in ranks),
            "grad_norm": ranks[0]["grad_norm"],
            "lr": ranks[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        metrics.write(record)
        if step % 10 == 0 or step == cfg.sft.steps - 1:
            log.info(
                "sft %d/%d | loss %.4f | lr %.2e",
                step + 1,
                cfg.sft.steps,
                record["sft_loss"],
                record["lr"],
            )


# ------------------------------------------------------------------------------------ eval


def evaluate(cluster: Cluster, items: Sequence[MCQItem], cfg: TrainConfig) -> dict[str, Any]:
    """Held-out accuracy of one answer per question (greedy by default): see gmai_rl.evaluate."""
    if not items:
        return {}
    sampling = SamplingParams(
        cfg.rollout.eval_temperature, 1.0, cfg.rollout.max_new_tokens, seed=cfg.trainer.seed
    )
    return summarize(generate(cluster, items, 1, sampling, cfg.data.system_prompt), items)


# ------------------------------------------------------------------------------------ logging


class MetricsLog:
    """metrics.jsonl: one JSON object per step, flushed as written."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def step_record(
    step: int,
    groups: Sequence[Group],
    stats: CollectStats,
    train_metrics: dict[str, float],
    version: int,
    timer: StageTimer,
) -> dict[str, Any]:
    all_rewards = [r for g in stats.all_groups for r in g.rewards]
    totals = torch.tensor([r["total"] for r in all_rewards])
    lengths = [len(c.token_ids) for g in stats.all_groups for c in g.completions]
    generated = sum(lengths)
    return {
        "stage": "rl",
        "step": step,
        "reward_mean": float(totals.mean()),
        "reward_std": float(totals.std()) if len(totals) > 1 else 0.0,
        "accuracy": sum(r.get("accuracy", 0.0) for r in all_rewards) / len(all_rewards),
        "format_rate": sum(r.get("format", 0.0) for r in all_rewards) / len(all_rewards),
        "groups_generated": stats.generated_groups,
        "groups_trained": len(groups),
        "groups_filtered_too_easy": stats.dropped_too_easy,
        "groups_filtered_too_hard": stats.dropped_too_hard,
        "groups_padded": stats.padded_groups,
        "response_length_mean": generated / len(lengths),
        "response_length_max": max(lengths),
        "truncated_rate": sum(
            c.finish_reason == "length" for g in stats.all_groups for c in g.completions
        )
        / len(lengths),
        "staleness_max": max(version - 1 - g.policy_version for g in groups),
        **{k: v for k, v in train_metrics.items()},
        "policy_version": version,
        **{f"time_{k}_s": v for k, v in timer.seconds.items()},
        "generate_tokens_per_s": generated / max(timer.seconds.get("generate", 0.0), 1e-9),
    }


def progress_line(r: dict[str, Any], steps: int) -> str:
    return (
        f"step {r['step'] + 1}/{steps} | reward {r['reward_mean']:.3f} acc {r['accuracy']:.3f} "
        f"fmt {r['format_rate']:.3f} | kept {r['groups_trained']}/{r['groups_generated']} | "
        f"len {r['response_length_mean']:.1f} | ent {r.get('entropy', float('nan')):.2f} "
        f"clip {r.get('clip_frac', float('nan')):.3f} | gen {r.get('time_generate_s', 0):.2f}s "
        f"train {r.get('time_train_s', 0):.2f}s sync {r.get('time_sync_s', 0):.2f}s"
    )


# ------------------------------------------------------------------------------------- main


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run the configured job end to end; returns what eval.json holds."""
    validate(cfg)
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_artifacts(cfg)
    data = load_datasets(cfg)
    init_ray(cfg)
    cluster = start_cluster(cfg)
    metrics = MetricsLog(out / "metrics.jsonl")
    result: dict[str, Any] = {"output_dir": str(out)}
    try:
        if cfg.sft.enabled:
            run_sft(cluster, data.sft, cfg, metrics)
            sync_weights(cluster, cfg.sync.verify)
        result["before_rl"] = evaluate(cluster, data.eval, cfg)
        log.info("held-out before RL: %s", _summary(result["before_rl"]))
        result["during_rl"] = run_rl(cluster, data, cfg, metrics, out)
        result["after_rl"] = evaluate(cluster, data.eval, cfg)
        log.info("held-out after RL: %s", _summary(result["after_rl"]))
        if cfg.trainer.save_final:
            save_checkpoint(cluster, out / "final")
            result["checkpoint"] = str(out / "final")
        (out / "eval.json").write_text(json.dumps(result, indent=2))
    finally:
        metrics.close()
        cluster.shutdown()
    return result


def run_rl(
    cluster: Cluster, data: Datasets, cfg: TrainConfig, metrics: MetricsLog, out: Path
) -> list[dict[str, Any]]:
    import ray

    # The KL reference (if any) is the policy RL starts from, i.e. after the SFT cold start.
    ray.get([learner.start_stage.remote(cfg.optim, True) for learner in cluster.learners])
    sampler = ItemSampler(data.train, cfg.trainer.seed)
    version = ray.get(cluster.rollouts[0].get_policy_version.remote())
    history = []
    for step in range(cfg.trainer.steps):
        timer = StageTimer()
        groups, stats = collect_groups(
            rollout_fn(cluster, cfg, timer), sampler, cfg.algo.prompts_per_step, cfg.algo
        )
        samples = make_train_samples(groups, cfg.algo.estimator)
        with timer("train"):
            train_metrics = train(cluster, samples, cfg.learner.num_minibatches)
        with timer("sync"):
            version = sync_weights(cluster, cfg.sync.verify)
        record = step_record(step, groups, stats, train_metrics, version, timer)
        metrics.write(record)
        log.info(progress_line(record, cfg.trainer.steps))
        if (
            cfg.trainer.eval_every
            and (step + 1) % cfg.trainer.eval_every == 0
            and step + 1 < cfg.trainer.steps
        ):
            evaluation = {"step": step + 1, **evaluate(cluster, data.eval, cfg)}
            history.append(evaluation)
            metrics.write({"stage": "eval", **evaluation})
            log.info("held-out at step %d: %s", step + 1, _summary(evaluation))
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
            save_checkpoint(cluster, out / "checkpoints" / f"step_{step + 1}")
    return history


def save_checkpoint(cluster: Cluster, path: Path) -> None:
    import ray

    ray.get([learner.save_pretrained.remote(str(path)) for learner in cluster.learners])
    log.info("saved checkpoint to %s", path)


def _summary(evaluation: dict[str, Any]) -> str:
    if not evaluation:
        return "no eval data"
    return (
        f"accuracy {evaluation['accuracy']:.3f}, format {evaluation['format_rate']:.3f}, "
        f"truncated {evaluation.get('truncated_rate', 0.0):.3f} (n={evaluation['n']})"
    )
