"""An image deleted or corrupted after the load drops its prompt, not the call: the rollout worker
class on the tiny model (no Ray), then the driver's collection and evaluation over its groups."""

import logging
import shutil
from pathlib import Path

import pytest

from gmai_rl.batches import collect_groups
from gmai_rl.config import AlgoConfig
from gmai_rl.data import build_prompt, load_mcq_jsonl
from gmai_rl.evaluate import summarize
from gmai_rl.feed import ItemSampler
from gmai_rl.models.loading import ModelOptions
from gmai_rl.reward.worker import RewardWorker
from gmai_rl.rollout.worker import RolloutWorker
from gmai_rl.types import SamplingParams

pytestmark = pytest.mark.integration


def test_a_prompt_whose_image_went_after_the_load_is_dropped_and_the_rest_generate(
    tiny_model_dir, synthetic_dir, tmp_path, caplog
):
    data = Path(shutil.copytree(synthetic_dir, tmp_path / "data"))
    items = load_mcq_jsonl(data / "train.jsonl")[:5]  # every image decoded and checked here
    gone, cut = Path(items[1].images[0]), Path(items[3].images[0])
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    worker = RolloutWorker("hf", ModelOptions(tiny_model_dir), device="cpu", max_batch_prompts=3)
    prompts = [build_prompt(item, None) for item in items]
    groups = worker.generate(prompts, 2, SamplingParams(max_new_tokens=4, seed=0))
    assert [g.prompt.id for g in groups] == [item.id for item in items]
    assert [g.dropped is not None for g in groups] == [False, True, False, True, False]
    assert groups[1].dropped == f"missing_image: image not found: {gone}"
    assert groups[3].dropped is not None and str(cut) in groups[3].dropped
    assert all(g.completions == [] and g.prompt_ids == [] for g in (groups[1], groups[3]))
    assert all(len(g.completions) == 2 and g.prompt_ids for g in groups if not g.dropped)

    # The driver's side: scored groups of the readable prompts only, the batch refilled.
    rewards, asked = RewardWorker(), []

    def rollout(batch):
        asked.extend(batch)
        out = worker.generate(
            [build_prompt(i, None) for i in batch], 2, SamplingParams(max_new_tokens=8)
        )
        for group, item in zip(out, batch, strict=True):
            group.rewards = rewards.score([(c.text, item) for c in group.completions])
        return out

    with caplog.at_level(logging.WARNING, logger="gmai_rl.loop"):
        # The first round is one whole epoch of the five items: both lost ones among them.
        batch, stats = collect_groups(rollout, ItemSampler(items, seed=1), 5, AlgoConfig())
    lost = {items[1].id, items[3].id}
    assert stats.dropped_prompts == sum(i.id in lost for i in asked) >= 2
    assert len(batch) == 5 and stats.padded_groups == 0 and stats.rounds == 2
    assert {g.prompt.id for g in batch} == {items[i].id for i in (0, 2, 4)}
    assert all(len(g.rewards) == 2 and g.dropped is None for g in batch)
    assert f"{items[1].id} ({items[1].source}) dropped" in caplog.text and str(gone) in caplog.text

    greedy = worker.generate(prompts, 1, SamplingParams(0.0, max_new_tokens=4, seed=0))
    summary = summarize(greedy, items)
    assert summary["n"] == 3 and summary["dropped"] == 2
