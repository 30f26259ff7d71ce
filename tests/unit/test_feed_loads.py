"""A run's data: a configured source of which nothing loads stops the run before it starts (with
data.on_error=skip every record may be skipped), naming the file and what was skipped."""

import pytest

from benchmark_fixtures import write_vlmeval_mcq
from gmai_rl.feed import load_datasets
from support import train_config


def test_a_training_file_with_nothing_loadable_is_named(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "q1"\n{not json\n')
    cfg = train_config(f"data.train={train}", "data.on_error=skip", "sft.enabled=false")
    with pytest.raises(ValueError, match=r"no question loaded: .*train\.jsonl: loaded 0 of 2"):
        load_datasets(cfg)


def test_a_benchmark_with_nothing_loadable_is_named(tmp_path, synthetic_dir):
    fixture = write_vlmeval_mcq(tmp_path / "mcq")
    rows = fixture.path.read_text().splitlines()
    fixture.path.write_text("\n".join([rows[0], *rows[-sum(fixture.bad.values()) :]]) + "\n")
    cfg = train_config(
        f"data.train={synthetic_dir / 'train.jsonl'}",
        f"data.eval={synthetic_dir / 'eval.jsonl'}",
        "data.on_error=skip",
        "sft.enabled=false",
        f"eval.benchmarks=[{{name:vlmeval-mcq,path:'{fixture.path}'}}]",
    )
    with pytest.raises(ValueError, match=r"no question loaded: vlmeval-mcq: .*loaded 0 of 2"):
        load_datasets(cfg)
