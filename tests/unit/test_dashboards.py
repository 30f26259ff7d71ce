"""Metrics fan-out: metrics.jsonl first, then TensorBoard, W&B (offline) and Ray's metrics, each
read back from what it wrote."""

import json
import logging
import struct

import pytest

from gmai_rl import dashboards as dashboards_module
from gmai_rl import ray_metrics
from gmai_rl.dashboards import (
    Dashboards,
    TensorBoard,
    dashboard_step,
    open_dashboards,
    run_name,
    scalars,
)
from gmai_rl.metrics import MetricsLog
from support import train_config

SFT = {"stage": "sft", "step": 0, "sft_loss": 2.5, "grad_norm": 1.0, "lr": 0.003, "seconds": 0.4}
RL = [
    {
        "stage": "rl",
        "step": i,
        "reward_mean": 0.25 * (i + 1),
        "accuracy": 0.2 * (i + 1),
        "generated_tokens": 100,
        "generate_tokens_per_s": 50.0,
        "staleness_max": 0,
        "policy_version": i + 2,
        "time_generate_s": 2.0,
        "time_sync_s": 0.5,
    }
    for i in range(2)
]
EVAL = {
    "stage": "eval",
    "phase": "after_rl",
    "step": 2,
    "accuracy": 0.75,
    "n": 8,
    "accuracy_by_modality": {"CT": 0.5, "MRI": 1.0},
    "answer_letters": {"A": 6, "none": 2},
    "examples": {"CT": {"id": "q1", "completion": "<answer>A</answer>"}},
    "seconds": 1.5,
}


def test_scalars_are_the_records_numbers_under_their_stage():
    assert scalars(SFT) == {
        "sft/sft_loss": 2.5,
        "sft/grad_norm": 1.0,
        "sft/lr": 0.003,
        "sft/seconds": 0.4,
    }
    got = scalars(EVAL)
    assert got["eval/accuracy"] == 0.75 and got["eval/n"] == 8.0
    assert got["eval/accuracy_by_modality/MRI"] == 1.0 and got["eval/answer_letters/none"] == 2.0
    assert not any(k.startswith(("eval/examples", "eval/phase", "eval/step")) for k in got)
    assert scalars({"stage": "rl", "flag": True, "note": "x"}) == {}


def test_rl_steps_and_evaluations_share_the_rl_steps_done_axis():
    assert [dashboard_step(r) for r in RL] == [1, 2]
    assert dashboard_step(EVAL) == 2  # evaluated after step index 1, the second step
    assert dashboard_step({"stage": "eval", "step": 0}) == 0  # before RL
    assert dashboard_step(SFT) == 1
    assert dashboard_step({"stage": "setup", "data_seconds": 1.0}) == 0


def test_run_name_tells_multirun_jobs_apart(tmp_path):
    assert run_name(tmp_path / "outputs" / "2026-01-01" / "10-00-00") == "10-00-00"
    assert run_name(tmp_path / "multirun" / "2026-01-01" / "10-00-00" / "3") == "10-00-00/3"


class FakeSink:
    def __init__(self, name, log, fail_on=None):
        self.name, self.log, self.fail_on = name, log, fail_on

    def write(self, record):
        if record.get("step") == self.fail_on:
            raise OSError("disk full")
        self.log.append((self.name, record["stage"], record["step"]))

    def close(self, failed=False):
        self.log.append((self.name, "closed", failed))


def test_every_record_reaches_jsonl_and_each_sink_and_a_failing_sink_is_dropped(tmp_path, caplog):
    calls = []
    fan = Dashboards(
        MetricsLog(tmp_path / "metrics.jsonl"),
        [FakeSink("a", calls), FakeSink("b", calls, fail_on=1)],
    )
    with caplog.at_level(logging.WARNING, logger="gmai_rl.dashboards"):
        for record in [SFT, *RL]:
            fan.write(record)
    fan.close(failed=True)
    assert calls == [
        ("a", "sft", 0),
        ("b", "sft", 0),
        ("a", "rl", 0),
        ("b", "rl", 0),
        ("a", "rl", 1),
        ("b", "closed", True),  # b failed at rl step 1: closed then, and no more records
        ("a", "closed", True),
    ]
    assert "b failed" in caplog.text and "disk full" in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [SFT, *RL]  # the source of truth has all


def test_tensorboard_event_files_hold_every_scalar_at_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoard(tmp_path / "tb")
    for record in [SFT, *RL, EVAL]:
        sink.write(record)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"sft/sft_loss", "rl/reward_mean", "rl/time_generate_s", "eval/accuracy"} <= tags
    assert "eval/accuracy_by_modality/CT" in tags
    reward = [(e.step, e.value) for e in events.Scalars("rl/reward_mean")]
    assert reward == [(1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(2, 0.75)]


def test_open_dashboards_follows_the_config(tmp_path, monkeypatch):
    opened = []

    def fake_ray_metrics(name):
        opened.append(name)
        return FakeSink("Ray metrics", [])

    monkeypatch.setattr(dashboards_module, "open_ray_metrics", fake_ray_metrics)
    run = tmp_path / "multirun" / "10-00-00" / "4"
    run.mkdir(parents=True)
    fan = open_dashboards(train_config(), run)  # the demo's: TensorBoard and Ray metrics
    assert [s.name for s in fan.sinks] == ["TensorBoard", "Ray metrics"]
    assert opened == ["10-00-00/4"]
    fan.write(SFT)
    fan.close()
    assert (run / "metrics.jsonl").exists() and list((run / "tensorboard").iterdir())
    off = train_config("dashboards.tensorboard=false", "dashboards.ray_metrics=false")
    fan = open_dashboards(off, tmp_path)
    assert fan.sinks == [] and opened == ["10-00-00/4"]
    fan.close()


# ----------------------------------------------------------------------------- W&B offline


def wandb_records(path):
    """The protobuf records of a W&B run file (.wandb): wandb's LevelDB-style log, 32 KiB blocks
    of chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item):
    """A history or config item's key: `key`, or the parts of `nested_key` (wandb uses either)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_writes_a_run_folder_with_the_history(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var, folder in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # dashboards.wandb.mode null: wandb's default
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = train_config(
        "dashboards.wandb.enabled=true",
        "dashboards.tensorboard=false",
        "dashboards.ray_metrics=false",
        "dashboards.run_name=unit",
        "trainer.seed=7",
    )
    fan = open_dashboards(cfg, tmp_path)
    assert [s.name for s in fan.sinks] == ["W&B"]
    for record in [SFT, *RL, EVAL]:
        fan.write(record)
    fan.close()
    # finish() can return before the wandb-core service has flushed the run file (a 7-byte
    # header was seen under load); teardown, which a process's exit runs, waits for it.
    wandb.teardown()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = [
        {_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h.get("sft/sft_loss") for h in history] == [2.5, None, None, None]
    assert [h.get("rl/reward_mean") for h in history] == [None, 0.25, 0.5, None]
    assert [h.get("rl/step") for h in history] == [None, 1, 2, 2]
    assert history[0]["sft/step"] == 1 and history[3]["eval/accuracy_by_modality/MRI"] == 1.0
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "unit" and run.project == "gmai-rl"
    config = {_key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["trainer"]["seed"] == 7


# ------------------------------------------------------------------------------ Ray metrics


def test_ray_metrics_samples_of_each_stage():
    step0 = ray_metrics.samples(RL[0])
    assert ("gmai_rl_step", 1.0, {}) in step0
    assert ("gmai_rl_reward_mean", 0.25, {}) in step0
    assert ("gmai_rl_policy_version_lag", 0.0, {}) in step0
    assert ("gmai_rl_generate_tokens_per_s", 50.0, {}) in step0
    assert ("gmai_rl_stage_seconds", 2.0, {"stage": "generate"}) in step0
    assert ("gmai_rl_stage_seconds", 0.5, {"stage": "sync"}) in step0
    assert ray_metrics.samples(SFT) == [
        ("gmai_rl_sft_step", 1.0, {}),
        ("gmai_rl_sft_loss", 2.5, {}),
        ("gmai_rl_stage_seconds", 0.4, {"stage": "sft"}),
    ]
    assert ray_metrics.samples(EVAL) == [
        ("gmai_rl_eval_accuracy", 0.75, {}),
        ("gmai_rl_stage_seconds", 1.5, {"stage": "eval"}),
    ]
    assert ray_metrics.samples({"stage": "setup", "data_seconds": 2.0, "startup_seconds": 9.0}) == [
        ("gmai_rl_stage_seconds", 2.0, {"stage": "data"}),
        ("gmai_rl_stage_seconds", 9.0, {"stage": "startup"}),
    ]
    assert ray_metrics.samples({"stage": "other", "step": 3}) == []
    for record in [SFT, *RL, EVAL]:  # every sample names a declared metric with its tags
        for name, _, tags in ray_metrics.samples(record):
            assert set(tags) == set(ray_metrics.METRICS[name].tags), name


class FakeMetric:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.calls = name, tag_keys, []

    def set(self, value, tags):
        assert set(tags) == set(self.tag_keys)
        self.calls.append(("set", value, tags))

    def inc(self, value, tags):
        assert value > 0 and set(tags) == set(self.tag_keys)
        self.calls.append(("inc", value, tags))


def test_ray_metrics_set_gauges_and_add_to_counters_tagged_with_the_run(monkeypatch):
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeMetric)
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeMetric)
    sink = ray_metrics.RayMetrics("sweep/1")
    for record in RL:
        sink.write(record)
    sink.write({**RL[0], "generated_tokens": 0})  # nothing generated: a counter cannot add 0
    metrics = sink.metrics
    assert metrics["gmai_rl_step"].calls[:2] == [
        ("set", 1.0, {"run": "sweep/1"}),
        ("set", 2.0, {"run": "sweep/1"}),
    ]
    assert metrics["gmai_rl_generated_tokens"].calls == [("inc", 100.0, {"run": "sweep/1"})] * 2
    assert ("set", 2.0, {"run": "sweep/1", "stage": "generate"}) in metrics[
        "gmai_rl_stage_seconds"
    ].calls


def test_a_local_ray_init_serves_metrics_on_the_configured_port(monkeypatch):
    import ray

    from gmai_rl.cluster.session import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(train_config("cluster.metrics_export_port=9091"))
    init_ray(train_config())
    assert calls[0]["_metrics_export_port"] == 9091
    assert "_metrics_export_port" not in calls[1]  # Ray picks a free port
