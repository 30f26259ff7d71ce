"""The run's progress in Ray's metrics system (`ray.util.metrics`), set from metrics.jsonl records.

The driver's metrics travel like every Ray process's: its core worker reports them periodically
(every few seconds) to the metrics agent of its node, which serves them in Prometheus text format
on the node's metrics export port (`ray start --metrics-export-port`; a local `ray.init` takes
cluster.metrics_export_port or picks a free one; `metrics_endpoint` finds it in `ray.nodes()`),
with Ray's "ray_" prefix and a counter's "_total" suffix: `ray_gmai_rl_step{run="..."}`. A
cluster's Prometheus scrapes those ports (Ray writes a service-discovery file for it) and the Ray
dashboard's metrics view reads from it.

Every series carries a `run` tag (the output folder's name unless configured), so the jobs of a
sweep stay apart. `samples` (pure) says what a record sets; `RayMetrics` sets it.

Like `cluster`, this module may import Ray: it is the only other place that does outside the
actors (tests/unit/test_layering.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GAUGE, COUNTER = "gauge", "counter"


@dataclass(frozen=True)
class MetricSpec:
    kind: str
    """gauge (the latest value) or counter (a running total: Prometheus takes its rate)."""
    description: str
    tags: tuple[str, ...] = ()
    """Tag keys besides `run`."""


METRICS: dict[str, MetricSpec] = {
    "gmai_rl_step": MetricSpec(GAUGE, "RL steps done"),
    "gmai_rl_reward_mean": MetricSpec(GAUGE, "Mean total reward of the step's rollouts"),
    "gmai_rl_accuracy": MetricSpec(GAUGE, "Mean accuracy reward of the step's rollouts"),
    "gmai_rl_format_rate": MetricSpec(GAUGE, "Share of the step's rollouts in the answer format"),
    "gmai_rl_response_length_mean": MetricSpec(GAUGE, "Mean completion length in tokens"),
    "gmai_rl_generate_tokens_per_s": MetricSpec(
        GAUGE, "Tokens generated per second of the step's generate stage"
    ),
    "gmai_rl_generated_tokens": MetricSpec(COUNTER, "Completion tokens generated in RL steps"),
    "gmai_rl_policy_version": MetricSpec(GAUGE, "The rollout workers' policy version"),
    "gmai_rl_policy_version_lag": MetricSpec(
        GAUGE, "Most policy versions the step's batch lagged behind the learner (0: on-policy)"
    ),
    "gmai_rl_stage_seconds": MetricSpec(
        GAUGE,
        "Seconds of the latest step's stage (generate, reward, train, sync; sft; eval; data, startup)",
        ("stage",),
    ),
    "gmai_rl_sft_step": MetricSpec(GAUGE, "SFT steps done"),
    "gmai_rl_sft_loss": MetricSpec(GAUGE, "SFT cross-entropy of the latest step"),
    "gmai_rl_eval_accuracy": MetricSpec(GAUGE, "Held-out accuracy of the latest evaluation"),
}

RL_GAUGES = {
    "gmai_rl_reward_mean": "reward_mean",
    "gmai_rl_accuracy": "accuracy",
    "gmai_rl_format_rate": "format_rate",
    "gmai_rl_response_length_mean": "response_length_mean",
    "gmai_rl_generate_tokens_per_s": "generate_tokens_per_s",
    "gmai_rl_generated_tokens": "generated_tokens",
    "gmai_rl_policy_version": "policy_version",
    "gmai_rl_policy_version_lag": "staleness_max",
}
"""Metric -> the rl record's key it takes."""

Sample = tuple[str, float, dict[str, str]]
"""(metric name, value, tags besides `run`)."""


def samples(record: dict[str, Any]) -> list[Sample]:
    """What one metrics.jsonl record sets: rl steps, SFT steps and evaluations; others nothing."""
    stage = record.get("stage")
    out: list[Sample] = []
    if stage == "rl":
        out.append(("gmai_rl_step", float(record["step"] + 1), {}))
        out += [(name, float(record[key]), {}) for name, key in RL_GAUGES.items() if key in record]
        out += [
            (
                "gmai_rl_stage_seconds",
                float(v),
                {"stage": k.removeprefix("time_").removesuffix("_s")},
            )
            for k, v in record.items()
            if k.startswith("time_") and k.endswith("_s")
        ]
    elif stage == "sft":
        out.append(("gmai_rl_sft_step", float(record["step"] + 1), {}))
        if "sft_loss" in record:
            out.append(("gmai_rl_sft_loss", float(record["sft_loss"]), {}))
        if "seconds" in record:
            out.append(("gmai_rl_stage_seconds", float(record["seconds"]), {"stage": "sft"}))
    elif stage == "setup":
        for key, name in (("data_seconds", "data"), ("startup_seconds", "startup")):
            if key in record:
                out.append(("gmai_rl_stage_seconds", float(record[key]), {"stage": name}))
    elif stage == "eval":
        if "accuracy" in record:
            out.append(("gmai_rl_eval_accuracy", float(record["accuracy"]), {}))
        if "seconds" in record:
            out.append(("gmai_rl_stage_seconds", float(record["seconds"]), {"stage": "eval"}))
    return out


class RayMetrics:
    """The run's gauges and counters in this process's Ray metrics (a dashboard sink)."""

    name = "Ray metrics"

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.run = run
        self.metrics: dict[str, Any] = {
            name: (Gauge if spec.kind == GAUGE else Counter)(
                name, spec.description, tag_keys=("run", *spec.tags)
            )
            for name, spec in METRICS.items()
        }

    def write(self, record: dict[str, Any]) -> None:
        for name, value, tags in samples(record):
            metric, all_tags = self.metrics[name], {"run": self.run, **tags}
            if METRICS[name].kind == GAUGE:
                metric.set(value, tags=all_tags)
            elif value > 0:  # Ray's counters refuse 0
                metric.inc(value, tags=all_tags)

    def close(self, failed: bool = False) -> None:
        """Nothing to release: the series stay at their last values while the driver lives."""


def open_ray_metrics(run: str) -> RayMetrics | None:
    """The run's Ray metrics, or None when this process is not connected to Ray."""
    import ray

    if not ray.is_initialized():
        return None
    log.info("Ray metrics (run=%r): %s", run, metrics_endpoint() or "no metrics endpoint found")
    return RayMetrics(run)


def metrics_endpoint() -> str | None:
    """The Prometheus endpoint of this process's node, where its metrics are served; None when
    the node exports none (a minimal Ray install)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        if node["NodeID"] == node_id and node.get("MetricsExportPort", 0) > 0:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
