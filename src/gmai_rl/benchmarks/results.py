"""Benchmark results: scored questions summed up per benchmark, and flattened into metrics.

`summarize(scored)` returns {benchmark name: summary}, the names sorted. Each summary is:

    {
      "n": 451,                      # all questions of the benchmark
      "n_graded": 251,               # MCQ + closed: the questions `accuracy` is over
      "accuracy": 0.62,              # None when n_graded == 0
      "ci95": [0.56, 0.68],          # Wilson 95% interval of accuracy; [0.0, 1.0] when n_graded == 0
      "no_answer_rate": 0.03,        # questions of any kind with no answer read (Score.extracted None)
      "by_kind": {"closed": {"n", "accuracy", "ci95"}, "mcq": {...}},   # the graded kinds present
      "open": None or {
          "n", "exact_match", "f1", "recall",    # the rules' numbers, means over open questions
          "no_answer_rate",
          "scored_by": "rules" or "judge:<path>",
          "accuracy", "ci95",                    # only with a judge: its verdicts
          "comparable_to_judge_scores": False,   # exact_match, f1, recall: never judge-comparable
      },
      "by": {field: {value: {"n", "accuracy", "ci95"}}},   # e.g. by["modality"]["CT"]
      "answer_letters": {"A": 40, "B": 38, ..., "none": 3},  # MCQ only; {} without MCQ
    }

Open questions are reported only in "open". Their rule-based numbers are not right/wrong
grades, so they are not mixed into `accuracy`, `by_kind` or `by`. The "by" tables count the
MCQ and closed questions. A question without a value (missing or "") for a breakdown field is left
out of that field's table. A field that no graded question has is left out of "by", and so is a
value that only open questions have. Every value is counted as written, so "CT" and "ct" are two
rows. Only the fields in `breakdowns` are tabulated; the default is `items.BREAKDOWNS`. A
benchmark's own fields (GMAI-MMBench's department) must be named.

`flat_metrics(summary)` gives the same numbers as {key: float}. Keys are "bench/<name>/..." with
every part lowercased and its spaces and slashes made "_":
    bench/<name>/n, /n_graded, /accuracy, /ci95_low, /ci95_high, /no_answer_rate
    bench/<name>/<kind>/accuracy, /<kind>/n                       (kind: mcq, closed)
    bench/<name>/open/n, /exact_match, /f1, /recall, /no_answer_rate, /accuracy (with a judge)
    bench/<name>/<field>/<value>, bench/<name>/<field>/<value>/n  (accuracy, count)
    bench/<name>/answer_letters/<letter or none>                  (counts)
Missing numbers (no accuracy without graded questions) have no key. Two numbers that would share
a key (a breakdown field named "open", or values "CT" and "ct") raise a ValueError; a metric is
never silently overwritten.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from gmai_rl.benchmarks.items import BREAKDOWNS, BenchItem, Kind
from gmai_rl.benchmarks.scoring import Score, wilson_interval

GRADED = (Kind.MCQ, Kind.CLOSED)
"""The kinds that are right or wrong by the rules, and make up `accuracy`."""


def summarize(
    scored: Sequence[tuple[BenchItem, Score]], *, breakdowns: Sequence[str] = BREAKDOWNS
) -> dict[str, Any]:
    """{benchmark name: summary} (the module docstring shows the shape).

    A question scored twice (the same benchmark and id) raises a ValueError, and so do open
    questions of one benchmark that were scored by different judges.
    """
    by_benchmark: dict[str, list[tuple[BenchItem, Score]]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for item, result in scored:
        if (item.benchmark, item.id) in seen:
            raise ValueError(f"{item.benchmark}/{item.id} is scored twice")
        seen.add((item.benchmark, item.id))
        by_benchmark[item.benchmark].append((item, result))
    return {
        name: _benchmark(name, pairs, breakdowns) for name, pairs in sorted(by_benchmark.items())
    }


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`summarize`'s result as {"bench/<name>/...": number} (keys in the module docstring)."""
    out: dict[str, float] = {}

    def put(key: str, value: float | None) -> None:
        if value is None:
            return
        if key in out:
            raise ValueError(f"two benchmark metrics would both be named {key!r}")
        out[key] = float(value)

    for name, bench in summary.items():
        prefix = f"bench/{_key(name)}"
        for stat in ("n", "n_graded", "accuracy", "no_answer_rate"):
            put(f"{prefix}/{stat}", bench[stat])
        if bench["accuracy"] is not None:
            put(f"{prefix}/ci95_low", bench["ci95"][0])
            put(f"{prefix}/ci95_high", bench["ci95"][1])
        for kind, cell in bench["by_kind"].items():
            put(f"{prefix}/{kind}/accuracy", cell["accuracy"])
            put(f"{prefix}/{kind}/n", cell["n"])
        if bench["open"] is not None:
            for stat in ("n", "exact_match", "f1", "recall", "no_answer_rate", "accuracy"):
                put(f"{prefix}/open/{stat}", bench["open"].get(stat))
        for field, table in bench["by"].items():
            for value, cell in table.items():
                put(f"{prefix}/{_key(field)}/{_key(value)}", cell["accuracy"])
                put(f"{prefix}/{_key(field)}/{_key(value)}/n", cell["n"])
        for letter, count in bench["answer_letters"].items():
            put(f"{prefix}/answer_letters/{_key(letter)}", count)
    return out


def _benchmark(
    name: str, pairs: list[tuple[BenchItem, Score]], breakdowns: Sequence[str]
) -> dict[str, Any]:
    graded = [(item, result) for item, result in pairs if item.kind in GRADED]
    opens = [result for item, result in pairs if item.kind is Kind.OPEN]
    mcq = [result for item, result in pairs if item.kind is Kind.MCQ]
    overall = _accuracy([result for _, result in graded])
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for field in breakdowns:
        groups: dict[str, list[Score]] = defaultdict(list)
        for item, result in graded:
            if value := item.fields.get(field):
                groups[value].append(result)
        if groups:
            by[field] = {value: _accuracy(groups[value]) for value in sorted(groups)}
    letters = Counter(result.extracted or "none" for result in mcq)
    return {
        "n": len(pairs),
        "n_graded": overall["n"],
        "accuracy": overall["accuracy"],
        "ci95": overall["ci95"],
        "no_answer_rate": _no_answer_rate([result for _, result in pairs]),
        "by_kind": {
            kind.value: _accuracy([r for item, r in graded if item.kind is kind])
            for kind in GRADED
            if any(item.kind is kind for item, _ in graded)
        },
        "open": _open(name, opens) if opens else None,
        "by": by,
        "answer_letters": dict(sorted(letters.items())),
    }


def _accuracy(results: list[Score]) -> dict[str, Any]:
    n = len(results)
    right = sum(result.correct is True for result in results)
    return {
        "n": n,
        "accuracy": right / n if n else None,
        "ci95": list(wilson_interval(right, n)),
    }


def _open(name: str, results: list[Score]) -> dict[str, Any]:
    scorers = {result.scored_by for result in results}
    if len(scorers) != 1:
        raise ValueError(f"{name}: open questions scored by several scorers {sorted(scorers)}")
    scored_by = scorers.pop()
    n = len(results)
    out: dict[str, Any] = {
        "n": n,
        "exact_match": sum(_number(r.exact, "exact", name) for r in results) / n,
        "f1": sum(_number(r.f1, "f1", name) for r in results) / n,
        "recall": sum(_number(r.recall, "recall", name) for r in results) / n,
        "no_answer_rate": _no_answer_rate(results),
        "scored_by": scored_by,
        "comparable_to_judge_scores": False,
    }
    if scored_by.startswith("judge:"):
        out.update({key: _accuracy(results)[key] for key in ("accuracy", "ci95")})
    return out


def _number(value: float | None, what: str, name: str) -> float:
    if value is None:
        raise ValueError(f"{name}: an open question's Score has no {what} (not made by score())")
    return float(value)


def _no_answer_rate(results: list[Score]) -> float:
    return sum(result.extracted is None for result in results) / len(results)


def _key(part: str) -> str:
    return "_".join(part.lower().replace("/", " ").split())
