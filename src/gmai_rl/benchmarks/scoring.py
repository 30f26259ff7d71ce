"""Score one completion for a benchmark question. Rule-based, and the rules are written out here.

This scorer reads answers from two kinds of prompt: our own, which asks for
`<think>...</think><answer>...</answer>`, and harness-style prompts ("Answer with the option's
letter"), which ask for no tags. Like the training reward (`gmai_rl.reward.mcq`), it never guesses.
An answer it cannot read as exactly one commitment is wrong. VLMEvalKit instead picks a random
option when its matching fails, and other harnesses ask an LLM which option was meant. Neither
happens here. A judge (an LLM or anything else) can be plugged in for open questions only, and
then the results name it (see "Judge" below).

1. The answer text
------------------
Tags are the exact ASCII strings `<think>`, `</think>`, `<answer>`, `</answer>`, as in the reward.
Special tokens (EOS, "<|im_end|>") must be removed before scoring.
- Thinking. If the completion has a `</think>`, only the text after the last one counts. If it has a
  `<think>` and no `</think>`, the model was still thinking when it stopped: no answer
  (`unclosed_think`).
- Answer blocks. If that text has complete `<answer>...</answer>` blocks, the answer text is their
  content. Blocks that repeat the same content (after trimming spaces) count as one. Blocks with
  different contents are no answer (`several_answer_blocks`). An `<answer>` that is never closed,
  with no complete block, is no answer (`unclosed_answer_block`).
- Otherwise the answer text is all of that text. This is the harness-style reply.
- Statements. Within the answer text, the last explicit statement decides, when there is one:
  `\\boxed{X}`, or "answer is X", "answer would be X", "answer should be X", "answer: X" (any case,
  optionally "the", "final", "correct", "best", "right" before "answer", and markdown stars around
  it, e.g. "**Final Answer:** X"), or "答案是 X" / "答案：X". X runs to the end of its sentence:
  the first line break, "。", "！", "？", or ".", "!", "?" followed by a space or the end. So
  "Answer: B. Glioma" states "B", and "The answer is C" after three paragraphs of reasoning states
  "C". A last statement that cannot be read makes the answer unreadable, even when an earlier one
  could be read: "The answer is A. No, the answer is A or B" is no answer. Prose after the last
  statement is not read: "The answer is B. Maybe C." is B. "answer" without "is" or ":" starts
  no statement ("Answer with the letter", "To answer this, ...").

The answer that a rule reads is the statement's X when there is one, else the whole answer text.
The `Score` holds it as `extracted`, or the option letter for MCQ.

2. Multiple choice (`Kind.MCQ`)
-------------------------------
The letter is `gmai_rl.reward.mcq.extract_choice(answer, options)`, the reward's closed grammar.
Its rules 1-8 are in that module's docstring. In short, the answer must read, as a whole, as one
commitment to one option:
- a standalone letter: "B", "(B)", "B.", "[B]", "**B**", "option B"; lowercase only as the whole
  answer ("b", "(b)");
- a letter with text that agrees: "B. Glioma", "(B) Glioma", "Glioma, so B";
- the complete text of exactly one option: "Glioma", "glioma.", "A glioma" (case, spaces, markdown
  and a final period do not count).
Everything else is no answer:
- several distinct letters, by letter or by text ("A or B", "A and C", "B. Meningioma" when
  Meningioma is C);
- text that two options share;
- an echoed option list ("A. x B. y C. z") with no statement after it;
- a letter that is not an option;
- any other prose ("B is correct", "I think it is B").
The rules about articles and pronouns: an uppercase letter counts only as the whole answer, in a
statement, or in a clause of the grammar. So "A mass is seen in the liver" names no option: "A" is
followed by words that are no option's text. "A mass is seen ..., so the answer is C" names C,
through the statement. "The answer is a benign lesion" names an option only if "Benign lesion" is
an option's text. `reason` says how the letter was read: `letter` (the letter stands alone in the
answer), `option_text` (only an option's text names it), `statement`, `boxed`. Or it says why
there is none: `several_letters` (two or more option letters stand alone in the answer),
`echoed_options`, `empty`, `no_answer`, or one of the failures in section 1.

3. Closed questions (`Kind.CLOSED`)
-----------------------------------
Yes/no: the gold normalised (section 4) is "yes" or "no", or one of the Chinese words below.
- English: "yes" and "no" count only as whole words, in any case: `\\b(yes|no)\\b` on the
  NFKC-normalised answer. So "normal", "not", "none", "nodule", "yesterday" hold neither.
- Chinese (SLAKE's zh questions have golds "是"/"否"): there are no word boundaries, and "是" is in
  almost every sentence ("这是肝脏", "this is the liver"). A Chinese yes/no must therefore be the
  whole answer, after punctuation and spaces are removed. Yes: 是, 是的, 对, 有. No: 否, 不, 不是,
  没有, 无, 不对. "是的，没有骨折" is neither.
- The answer is yes or no when exactly one of the two is found, in either language. "No", "No.",
  "No, there is no fracture" and "否。" are no. "Yes, there is no fracture" holds both and is wrong
  (`yes_and_no`). An answer with neither is wrong (`no_answer`). `extracted` is "yes" or "no", in
  English, whatever the answer's language. `reason`: `yes_no`.
Other closed questions (SLAKE's "Left", "CT", "MRI"): normalised exact match of the answer
against the gold. "The left lung" matches "Left Lung". "Left lung is affected" and "CT scan"
match nothing. `reason`: `exact` or `inexact`.

4. Open questions (`Kind.OPEN`)
-------------------------------
Normalisation (SQuAD's `normalize_answer`, made Unicode-aware), applied in this order: NFKC;
casefold; delete punctuation (ASCII `string.punctuation` and every Unicode P* character, so
"x-ray" == "xray"); delete the words a, an, the; put spaces around each CJK ideograph, so that
Chinese text splits into one token per character as it does in Chinese reading-comprehension
scoring; collapse whitespace. Tokens are the normalised text split on spaces.
- `exact`: normalised answer == normalised gold. Without a judge, `correct` is `exact`.
- `f1`: SQuAD token F1. The overlap is the common tokens counted as a multiset; precision is
  overlap / answer tokens; recall is overlap / gold tokens.
- `recall`: overlap / gold tokens, so a long sentence that contains the gold scores 1.0. LLaVA-Med
  reports this for open questions (its "recall", `calculate_f1score` in
  llava/eval/eval_metrics/evaluate_metrics.py: tp / (tp + fn) over lowercased words). MedEvalKit
  reports precision/recall/F1 over token *sets* next to exact match, BLEU and ROUGE, with an LLM
  judge as an option. Ours uses SQuAD's normalisation, so it can differ slightly from both.
No answer (section 1) scores exact False, f1 0.0, recall 0.0. None of these is comparable to the
judge-scored open-question accuracies that other harnesses publish, and the summaries say so.

5. Judge
--------
`load_judge("package.module:function")`, or "package.module.function", loads a function
`judge(item: BenchItem, answer_text: str) -> bool | float`. The path is checked and resolved by
the same loader as the reward's `reward.fn` (`gmai_rl.reward.plugins.load_plugin`): dotted
identifiers only, never a file path, code or a builtin. No judge is loaded by default. A
judge scores open questions only; MCQ and closed questions are always scored by the rules above.
It is called with the answer that section 1 read. With no answer, it is not called and the question
is wrong. Its verdict becomes `correct`: a bool as it is, a number in [0, 1] as `>= 0.5`. Anything
else, or an exception, stops the scoring with the item's id. `exact`, `f1` and `recall` are still
the rules' values. Every open `Score` a judge saw says `scored_by="judge:<path>"`.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gmai_rl.benchmarks.items import BenchItem, Kind
from gmai_rl.data.options import OptionParseError, split_question_options
from gmai_rl.reward.mcq import extract_choice
from gmai_rl.reward.plugins import load_plugin

RULES = "rules"
"""`Score.scored_by` of everything the rules scored."""

JudgeFn = Callable[[BenchItem, str], object]
"""`judge(item, answer_text) -> bool | float`; the result is checked when it is used."""


@dataclass(frozen=True)
class Score:
    """One completion's score (rules in the module docstring)."""

    correct: bool | None
    """MCQ and closed: right or wrong. Open: exact match, or the judge's verdict. `score` always
    sets it; a summary counts None as wrong."""
    extracted: str | None
    """The option letter, "yes"/"no", or the answer text read from the completion; None: no
    answer."""
    f1: float | None
    """Open only: SQuAD token F1 against the gold."""
    recall: float | None
    """Open only: the share of gold tokens found in the answer."""
    reason: str
    """How the answer was read ("letter", "statement", "yes_no", "exact", ...) or why none was
    ("several_letters", "echoed_options", "no_answer", "several_answer_blocks", ...)."""
    exact: bool | None = None
    """Open only: the rules' exact match, kept apart from `correct` for when a judge scored it."""
    scored_by: str = RULES
    """"rules", or "judge:<path>" for an open question that a judge scored."""


@dataclass(frozen=True)
class Judge:
    """A judge loaded by `load_judge`, with the path it was loaded from."""

    path: str
    fn: JudgeFn

    def __call__(self, item: BenchItem, answer_text: str) -> object:
        return self.fn(item, answer_text)


def load_judge(path: str | None) -> Judge | None:
    """The judge named by a dotted path ("pkg.module:function" or "pkg.module.function"); None
    for no path. A ValueError, before anything is imported, for a path that is not a dotted path
    of identifiers (a file path, code) or names a builtin; a ValueError after for what is not
    there or not callable."""
    if not path:
        return None
    fn = load_plugin(path, "judge")
    return Judge(path, fn)


def score(item: BenchItem, completion: str, judge: JudgeFn | None = None) -> Score:
    """Score `completion` (the generated text, without special tokens) against `item`."""
    text, failure = _answer_text(completion)
    if item.kind is Kind.MCQ:
        return _score_mcq(item.options, item.answer, text, failure)
    if item.kind is Kind.CLOSED:
        return _score_closed(item.answer, text, failure)
    return _score_open(item, text, failure, judge)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation, Unicode-aware (module docstring, section 4)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if c not in _ASCII_PUNCTUATION and not _is_punctuation(c))
    text = _ARTICLES.sub(" ", text)
    text = _CJK.sub(r" \1 ", text)
    return " ".join(text.split())


def token_scores(answer: str, gold: str) -> tuple[float, float]:
    """(SQuAD token F1, recall) of `answer` against `gold`, over normalised tokens."""
    answer_tokens = normalize_answer(answer).split()
    gold_tokens = normalize_answer(gold).split()
    if not gold_tokens or not answer_tokens:
        same = float(answer_tokens == gold_tokens)
        return same, same
    overlap = sum((Counter(answer_tokens) & Counter(gold_tokens)).values())
    if not overlap:
        return 0.0, 0.0
    precision = overlap / len(answer_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), recall


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (95% for the default z).

    n == 0 gives (0.0, 1.0): no questions, no information. k == 0 gives a lower bound of exactly
    0.0, and k == n an upper bound of exactly 1.0.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


# ---------------------------------------------------------------------------------------------
# Section 1: reading the answer

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# One level of braces inside: \boxed{\text{B}}. extract_choice unwraps what is inside.
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_STATED = re.compile(
    r"(?i:\b(?:(?:the|my)\s+)?(?:(?:final|correct|best|right)\s+)?answer)\**\s*"
    r"(?:(?i:is|would\s+be|should\s+be)\b\**\s*[:：]?|[:：])\**"
    r"|答案\s*(?:是|为|[:：])\s*[:：]?"
)
_SENTENCE_END = re.compile(r"\n|[。！？]|[.!?](?=\s|$)")


def _answer_text(completion: str) -> tuple[str | None, str]:
    """(the answer text, "") or (None, why there is none): section 1 up to the statements."""
    if "</think>" in completion:
        completion = completion.rpartition("</think>")[2]
    elif "<think>" in completion:
        return None, "unclosed_think"
    blocks = {block.strip() for block in _ANSWER_BLOCK.findall(completion)}
    if len(blocks) > 1:
        return None, "several_answer_blocks"
    if blocks:
        return blocks.pop(), ""
    if "<answer>" in completion:
        return None, "unclosed_answer_block"
    return completion.strip(), ""


def _final_answer(text: str) -> tuple[str, str]:
    """(what the last statement states, "statement" or "boxed"), or (text, "") without one."""
    found = [(m.start(), m[1], "boxed") for m in _BOXED.finditer(text)]
    found += [(m.start(), _sentence(text[m.end() :]), "statement") for m in _STATED.finditer(text)]
    if not found:
        return text, ""
    _, stated, how = max(found)
    return stated.strip(), how


def _sentence(rest: str) -> str:
    rest = rest.lstrip()
    end = _SENTENCE_END.search(rest)
    return rest[: end.start()] if end is not None else rest


# ---------------------------------------------------------------------------------------------
# Section 2: multiple choice


def _score_mcq(options: Mapping[str, str], gold: str, text: str | None, failure: str) -> Score:
    if text is None:
        return Score(False, None, None, None, failure)
    stated, how = _final_answer(text)
    letter = extract_choice(stated, options) if stated else None
    if letter is None:
        return Score(False, None, None, None, _why_no_letter(stated, options))
    if not how:
        alone = re.search(rf"(?<![A-Za-z0-9]){letter}(?![A-Za-z0-9])", stated, re.IGNORECASE)
        how = "letter" if alone else "option_text"
    return Score(letter == gold, letter, None, None, how)


_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def _why_no_letter(text: str, options: Mapping[str, str]) -> str:
    """A diagnostic label only: the score is the same whatever it says."""
    if not text.strip():
        return "empty"
    try:
        _, echoed = split_question_options(text)
    except OptionParseError:
        echoed = {}
    if len(echoed) >= 2:
        return "echoed_options"
    named = {letter for letter in _STANDALONE_LETTER.findall(text) if letter in options}
    return "several_letters" if len(named) > 1 else "no_answer"


# ---------------------------------------------------------------------------------------------
# Section 3: closed questions

_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_ZH_YES_NO = {
    **dict.fromkeys(("是", "是的", "对", "有"), "yes"),
    **dict.fromkeys(("否", "不", "不是", "没有", "无", "不对"), "no"),
}


def _yes_no_words(text: str) -> set[str]:
    found = {word.lower() for word in _YES_NO_WORD.findall(unicodedata.normalize("NFKC", text))}
    chinese = _ZH_YES_NO.get(normalize_answer(text).replace(" ", ""))
    return found | {chinese} if chinese else found


def _gold_yes_no(gold: str) -> str | None:
    normalised = normalize_answer(gold)
    if normalised in ("yes", "no"):
        return normalised
    return _ZH_YES_NO.get(normalised.replace(" ", ""))


def _score_closed(gold: str, text: str | None, failure: str) -> Score:
    if text is None:
        return Score(False, None, None, None, failure)
    stated, _ = _final_answer(text)
    gold_yes_no = _gold_yes_no(gold)
    if gold_yes_no is None:
        answer = stated.strip()
        if not normalize_answer(answer):
            return Score(False, None, None, None, "empty")
        exact = normalize_answer(answer) == normalize_answer(gold)
        return Score(exact, answer, None, None, "exact" if exact else "inexact")
    words = _yes_no_words(stated)
    if len(words) != 1:
        reason = "yes_and_no" if words else ("empty" if not stated.strip() else "no_answer")
        return Score(False, None, None, None, reason)
    said = words.pop()
    return Score(said == gold_yes_no, said, None, None, "yes_no")


# ---------------------------------------------------------------------------------------------
# Section 4 and 5: open questions and the judge

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _score_open(item: BenchItem, text: str | None, failure: str, judge: JudgeFn | None) -> Score:
    scored_by = RULES if judge is None else f"judge:{_judge_name(judge)}"
    answer = _final_answer(text)[0].strip() if text is not None else ""
    if not normalize_answer(answer):
        reason = failure or "empty"
        return Score(False, None, 0.0, 0.0, reason, exact=False, scored_by=scored_by)
    exact = normalize_answer(answer) == normalize_answer(item.answer)
    f1, recall = token_scores(answer, item.answer)
    if judge is None:
        reason = "exact" if exact else "inexact"
        return Score(exact, answer, f1, recall, reason, exact=exact, scored_by=scored_by)
    verdict = _verdict(judge, item, answer, scored_by)
    return Score(verdict, answer, f1, recall, "judge", exact=exact, scored_by=scored_by)


def _judge_name(judge: JudgeFn) -> str:
    if isinstance(judge, Judge):
        return judge.path
    module = getattr(judge, "__module__", None) or "?"
    return f"{module}:{getattr(judge, '__qualname__', type(judge).__name__)}"


def _verdict(judge: JudgeFn, item: BenchItem, answer: str, scored_by: str) -> bool:
    where = f"{scored_by} on {item.benchmark}/{item.id} ({item.source or 'no source'})"
    try:
        result = judge(item, answer)
    except Exception as err:
        raise RuntimeError(f"{where} failed: {err!r}") from err
    if isinstance(result, bool):
        return result
    if isinstance(result, int | float) and math.isfinite(result) and 0 <= result <= 1:
        return result >= 0.5
    raise ValueError(f"{where} returned {result!r}; a judge returns a bool or a number in [0, 1]")
