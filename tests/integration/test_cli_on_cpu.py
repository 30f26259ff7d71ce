"""The `gmai-rl` subcommands on the tiny offline model and synthetic data, in process."""

import json

import pytest

from gmai_rl.cli import main

pytestmark = pytest.mark.integration


def test_make_data_writes_the_splits(tmp_path, capsys):
    assert (
        main(
            [
                "make-data",
                str(tmp_path),
                "--n-train",
                "8",
                "--n-eval",
                "8",
                "--tasks",
                "lesion_side",
            ]
        )
        == 0
    )
    assert {"train", "eval", "sft"} <= {
        line.split(":")[0] for line in capsys.readouterr().out.splitlines()
    }
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 8


def test_make_tiny_model_writes_a_loadable_model_and_processor(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    assert main(["make-tiny-model", str(tmp_path / "m"), "--hidden-size", "32"]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "m").text_config.hidden_size == 32
    assert AutoProcessor.from_pretrained(tmp_path / "m").tokenizer.chat_template


def test_eval_reports_accuracy_and_the_letters_answered(tiny_model_dir, synthetic_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", tiny_model_dir, "--data", str(synthetic_dir / "eval.jsonl")]
    assert main([*args, "--max-items", "4", "--max-new-tokens", "8", "--output", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1
    assert sum(summary["answer_letters"].values()) == 4


@pytest.mark.parametrize("style", ["trained", "harness"])
def test_eval_scores_two_benchmarks_in_their_published_formats(tiny_model_dir, tmp_path, style):
    from benchmark_fixtures import write_gmai_mmbench, write_vqa_rad

    mcq = write_gmai_mmbench(tmp_path / "mmbench", bad_rows=False)
    vqa = write_vqa_rad(tmp_path / "vqa_rad", bad_rows=False)
    out = tmp_path / "bench.json"
    args = ["eval", "--model", tiny_model_dir, "--max-new-tokens", "8", "--output", str(out)]
    args += ["--benchmark", "gmai-mmbench", "--data", str(mcq.path)]
    args += ["--benchmark", "vqa-rad", "--data", str(vqa.path), "--prompt-style", style]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    assert set(summary) == {"gmai-mmbench", "vqa-rad"}
    assert summary["gmai-mmbench"]["n"] == mcq.good and summary["vqa-rad"]["n"] == vqa.good
    bench = summary["gmai-mmbench"]
    lo, hi = bench["ci95"]
    assert 0 <= lo <= bench["accuracy"] <= hi <= 1 and bench["prompt_style"] == style
    assert sum(bench["answer_letters"].values()) == bench["n"]
    # Closed (yes/no) questions make the accuracy; open ones are reported apart.
    vqa_rad = summary["vqa-rad"]
    assert vqa_rad["open"]["n"] > 0 and vqa_rad["open"]["comparable_to_judge_scores"] is False
    assert vqa_rad["by"]["answer_type"]["closed"]["n"] == vqa_rad["n_graded"] > 0


def test_eval_on_ray_generates_on_the_rollout_workers_of_a_generation_cluster(
    tiny_model_dir, tmp_path
):
    import ray

    from benchmark_fixtures import write_gmai_mmbench, write_slake

    mcq = write_gmai_mmbench(tmp_path / "mmbench", bad_rows=False)
    closed = write_slake(tmp_path / "slake", bad_rows=False)
    out = tmp_path / "bench.json"
    args = ["eval", "--model", tiny_model_dir, "--max-new-tokens", "8", "--output", str(out)]
    args += ["--benchmark", "gmai-mmbench", "--data", str(mcq.path)]
    args += ["--benchmark", "slake", "--data", str(closed.path)]
    # Two workers, one prompt per batch each: every chunk is split over both.
    args += ["--ray", "cluster.rollout_workers=2", "rollout.max_batch_prompts=1"]
    assert main(args) == 0
    assert not ray.is_initialized()  # the session it started is gone
    summary = json.loads(out.read_text())
    assert summary["gmai-mmbench"]["n"] == mcq.good and summary["slake"]["n"] == closed.good
    assert sum(summary["gmai-mmbench"]["answer_letters"].values()) == mcq.good


def test_eval_refuses_benchmarks_and_data_that_do_not_pair(tiny_model_dir, tmp_path):
    args = ["eval", "--model", tiny_model_dir, "--benchmark", "slake", "--benchmark", "vqa-rad"]
    with pytest.raises(SystemExit, match="2 --benchmark but 1 --data"):
        main([*args, "--data", str(tmp_path)])


def test_eval_stops_at_a_bad_row_naming_it_or_skips_and_counts_it(
    tiny_model_dir, tmp_path, capsys, caplog
):
    from benchmark_fixtures import write_vqa_rad

    fixture = write_vqa_rad(tmp_path / "vqa_rad")  # with one unreadable image
    out = tmp_path / "bench.json"
    args = ["eval", "--model", tiny_model_dir, "--max-new-tokens", "4", "--output", str(out)]
    args += ["--benchmark", "vqa-rad", "--data", str(fixture.path)]
    assert main(args) == 2 and not out.exists()
    error = capsys.readouterr().err
    assert "gmai-rl eval: " in error and ".parquet row 3: unreadable_image: " in error
    assert "--on-error skip" in error and "Traceback" not in error

    assert main([*args, "--on-error", "skip"]) == 0
    summary = json.loads(out.read_text())["vqa-rad"]
    assert summary["n"] == fixture.good and summary["skipped"] == fixture.bad
    assert ".parquet row 3: PIL cannot decode" in caplog.text  # the skipped row, named


def test_eval_of_questions_jsonl_counts_what_it_skipped(tiny_model_dir, synthetic_dir, tmp_path):
    records = [json.loads(line) for line in (synthetic_dir / "eval.jsonl").open()][:3]
    for record in records:
        record["image"] = str(synthetic_dir / record["image"])
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    out = tmp_path / "eval.json"
    args = ["eval", "--model", tiny_model_dir, "--data", str(data), "--max-new-tokens", "4"]
    assert main([*args, "--output", str(out)]) == 2
    assert main([*args, "--output", str(out), "--on-error", "skip"]) == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 3 and summary["skipped"] == {"invalid_json": 1}
    data.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"no question loaded from .*eval\.jsonl"):
        main([*args, "--on-error", "skip"])
    with pytest.raises(SystemExit, match="2 --data without --benchmark"):
        main([*args, "--data", str(data)])  # the second file would be left out


def test_synth_writes_what_it_kept(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    args = ["synth", "--model", tiny_model_dir, "--data", str(synthetic_dir / "train.jsonl")]
    assert (
        main([*args, "--out", str(out), "--max-items", "2", "--k", "2", "--max-new-tokens", "8"])
        == 0
    )
    assert "from 4 samples" in capsys.readouterr().out
    assert out.exists()  # a random model rarely answers in format; the file may be empty


def test_synth_stops_at_a_bad_record_or_skips_and_counts_it(
    tiny_model_dir, synthetic_dir, tmp_path, capsys, caplog
):
    records = [json.loads(line) for line in (synthetic_dir / "train.jsonl").open()][:2]
    for record in records:
        record["image"] = str(synthetic_dir / record["image"])
    lines = [json.dumps(r) for r in records]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    args = ["synth", "--model", tiny_model_dir, "--data", str(data), "--k", "2"]
    args += ["--out", str(tmp_path / "synth.jsonl"), "--max-new-tokens", "4"]
    assert main(args) == 2
    assert f"{data}:2: invalid_json" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == 0
    assert "from 4 samples" in capsys.readouterr().out
    assert "skipped 1" in caplog.text and f"{data}:2" in caplog.text  # the loader's warning


def test_synth_on_ray_samples_what_one_process_samples(tiny_model_dir, synthetic_dir, tmp_path):
    """The HF engine seeds each generate call: with the same batches (--batch-size = the workers'
    rollout.max_batch_prompts) the cluster's samples are the one process's, question for
    question."""
    args = ["synth", "--model", tiny_model_dir, "--data", str(synthetic_dir / "train.jsonl")]
    args += ["--max-items", "8", "--k", "2", "--max-new-tokens", "8", "--seed", "3"]
    one, ray = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    assert main([*args, "--out", str(one), "--batch-size", "2"]) == 0
    workers = ["cluster.rollout_workers=2", "rollout.max_batch_prompts=2"]
    assert main([*args, "--out", str(ray), "--ray", *workers]) == 0
    done = [p.with_name(p.name + ".done.jsonl").read_text() for p in (one, ray)]
    assert done[0] == done[1] and len(done[0].splitlines()) == 8
    assert one.read_text() == ray.read_text()
