"""Rejection sampling keeps only complete, well-formed, correct, distinct traces of questions
within the difficulty bounds, writes SFT records the loader reads back, and resumes an output
without writing a question's traces twice."""

import json

import pytest
from PIL import Image

from gmai_rl.data import load_mcq_jsonl
from gmai_rl.rejection import (
    Filters,
    SynthOutput,
    SynthStats,
    mcq_breakdowns,
    rejection_sample,
    select_traces,
)
from gmai_rl.types import Completion, Group, MCQItem, Prompt, SamplingParams

GOOD = "<think>The mass is bright and round.</think><answer>B</answer>"
WRONG = "<think>x</think><answer>A</answer>"


def item(tmp_path, i=0, modality="ct") -> MCQItem:
    path = tmp_path / f"img{i}.png"
    Image.new("RGB", (8, 8)).save(path)
    return MCQItem(f"q{i}", "What is it?", {"A": "Cyst", "B": "Mass"}, "B", (str(path),), modality)


def group_of(texts, finish="stop") -> Group:
    return Group(Prompt("p", []), [1], [Completion([1], t, finish_reason=finish) for t in texts], 0)


def scored(texts, question, finish="stop") -> Group:
    group = group_of(texts, finish)
    mcq_breakdowns([group], [question])
    return group


def test_only_complete_formatted_correct_distinct_traces_are_kept(tmp_path):
    stats, question = SynthStats(), item(tmp_path)
    texts = [
        GOOD,
        WRONG,  # wrong answer
        "<answer>B</answer>",  # no think block
        GOOD,  # duplicate
        "<think>Round and bright: a mass.</think>\n<answer>B</answer>",
    ]
    kept = select_traces(scored(texts, question), question, keep_per_question=5, stats=stats)
    assert kept == [GOOD, "<think>Round and bright: a mass.</think>\n<answer>B</answer>"]
    assert stats.rejected == {"format": 1, "wrong_answer": 1, "duplicate": 1}
    assert stats.by_modality["ct"] == {"format": 1, "wrong_answer": 1, "duplicate": 1}
    assert select_traces(scored(texts, question), question, 1, SynthStats()) == [GOOD]
    cut = SynthStats()
    assert select_traces(scored([GOOD], question, finish="length"), question, 1, cut) == []
    assert cut.rejected == {"too_long": 1}  # cut at max_new_tokens: not a finished trace


def fake_generate(calls):
    def generate(prompts, n, sampling):
        calls.append((len(prompts), n, sampling.temperature))
        # q0 gets no correct trace, q1 one in two, the others all.
        answers = {"q0": [WRONG], "q1": [GOOD, WRONG]}
        return [
            group_of(
                [answers.get(p.id, [GOOD])[i % len(answers.get(p.id, [GOOD]))] for i in range(n)]
            )
            for p in prompts
        ]

    return generate


def test_records_round_trip_through_the_loader(tmp_path):
    items = [item(tmp_path, i) for i in range(3)]
    calls = []
    batches = list(
        rejection_sample(fake_generate(calls), items, SamplingParams(0.7), None, Filters(k=4), 2)
    )
    assert calls == [(2, 4, 0.7), (1, 4, 0.7)]
    stats = batches[-1][3]
    assert (stats.sampled, stats.kept, stats.questions_with_a_trace) == (12, 2, 2)
    records = [r for _, batch_records, _, _ in batches for r in batch_records]
    out = tmp_path / "synth.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_mcq_jsonl(out)
    assert [x.id for x in loaded] == ["q1-synth0", "q2-synth0"]
    assert all(x.answer == "B" and x.reasoning == "The mass is bright and round." for x in loaded)
    assert loaded[0].options == items[1].options and loaded[0].images == items[1].images


def test_the_difficulty_filter_keeps_questions_the_policy_gets_wrong_sometimes(tmp_path):
    items = [item(tmp_path, i) for i in range(3)]
    sometimes = Filters(k=4, max_accuracy=0.99)  # q2 (always right) is too easy
    *_, (_, records, done, stats) = rejection_sample(
        fake_generate([]), items, SamplingParams(), None, sometimes, 3
    )
    assert [r["id"] for r in records] == ["q1-synth0"]
    assert stats.filtered == {"too_easy": 1}
    assert [(d["id"], d["accuracy"], d["kept"]) for d in done] == [
        ("q0", 0.0, 0),
        ("q1", 0.5, 1),
        ("q2", 1.0, 0),
    ]


def test_a_resumed_output_writes_each_questions_traces_once(tmp_path):
    items = [item(tmp_path, i) for i in range(5)]
    out, settings = tmp_path / "synth.jsonl", {"model": "m", "k": 4}
    output = SynthOutput(out, settings)
    run = rejection_sample(fake_generate([]), items, SamplingParams(), None, Filters(k=4), 2)
    _, records, done, _ = next(run)
    output.append(records, done)  # q0, q1 done
    _, records, _, _ = next(run)
    with open(out, "a") as f:  # q2, q3's traces written, then cut off before listed done
        f.write("".join(json.dumps(r) + "\n" for r in records))

    resumed = SynthOutput(out, settings)
    assert resumed.done == {"q0", "q1"}
    todo = [i for i in items if i.id not in resumed.done]
    for _, records, done, _ in rejection_sample(
        fake_generate([]), todo, SamplingParams(), None, Filters(k=4), 2
    ):
        resumed.append(records, done)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["q1-synth0", "q2-synth0", "q3-synth0", "q4-synth0"]  # once each, q0 none
    listed = [json.loads(x)["id"] for x in resumed.done_file.read_text().splitlines()]
    assert sorted(listed) == [f"q{i}" for i in range(5)]

    with pytest.raises(SystemExit, match="k differ"):
        SynthOutput(out, {"model": "m", "k": 8})
