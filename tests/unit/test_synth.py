"""Rejection sampling keeps only well-formed, correct, distinct traces, and writes SFT records the
loader reads back."""

import json

from PIL import Image

from gmai_rl.data import load_mcq_jsonl
from gmai_rl.synth import SynthStats, rejection_sample, select_traces
from gmai_rl.types import Completion, Group, MCQItem, Prompt, SamplingParams

GOOD = "<think>The mass is bright and round.</think><answer>B</answer>"


def item(tmp_path, i=0) -> MCQItem:
    path = tmp_path / f"img{i}.png"
    Image.new("RGB", (8, 8)).save(path)
    return MCQItem(f"q{i}", "What is it?", {"A": "Cyst", "B": "Mass"}, "B", (str(path),))


def group_of(texts) -> Group:
    return Group(Prompt("p", []), [1], [Completion([1], t) for t in texts], 0)


def test_only_formatted_correct_distinct_traces_are_kept(tmp_path):
    stats = SynthStats()
    texts = [
        GOOD,
        "<think>x</think><answer>A</answer>",  # wrong answer
        "<answer>B</answer>",  # no think block
        GOOD,  # duplicate
        "<think>Round and bright: a mass.</think>\n<answer>B</answer>",
    ]
    kept = select_traces(group_of(texts), item(tmp_path), keep_per_question=5, stats=stats)
    assert kept == [GOOD, "<think>Round and bright: a mass.</think>\n<answer>B</answer>"]
    assert stats.rejected == {"format": 1, "wrong_answer": 1, "duplicate": 1}
    assert select_traces(group_of(texts), item(tmp_path), 1, SynthStats()) == [GOOD]


def test_records_round_trip_through_the_loader(tmp_path):
    items = [item(tmp_path, i) for i in range(3)]
    calls = []

    def generate(prompts, n, sampling):
        calls.append((len(prompts), n, sampling.temperature))
        # The first question gets no correct trace.
        return [
            group_of([GOOD if p.id != "q0" else "<think>x</think><answer>A</answer>"] * n)
            for p in prompts
        ]

    records, stats = rejection_sample(generate, items, 4, SamplingParams(0.7), None, batch_size=2)
    assert calls == [(2, 4, 0.7), (1, 4, 0.7)]
    assert (stats.sampled, stats.kept, stats.questions_with_a_trace) == (12, 2, 2)
    out = tmp_path / "synth.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_mcq_jsonl(out)
    assert [x.id for x in loaded] == ["q1-synth0", "q2-synth0"]
    assert all(x.answer == "B" and x.reasoning == "The mass is bright and round." for x in loaded)
    assert loaded[0].options == items[1].options and loaded[0].images == items[1].images
