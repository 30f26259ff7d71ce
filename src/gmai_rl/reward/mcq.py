"""The rule-based reward for medical multiple-choice questions: which option an answer commits to,
and whether a completion has the `<think>...</think><answer>...</answer>` shape.

Why so strict: the policy is optimised against this parser, so every loose rule becomes a strategy.
A "contains the letter" check (MM-EUREKA) pays for "A or B" and for any word holding the letter; a
scan for a capital letter reads "Hepatitis B" as option B whichever option that text is. Here an
answer must read, as a whole, as a commitment to one option under a small closed grammar; anything
else scores 0. A correct answer written in an unusual way is a false negative the policy can learn
to avoid; a hedge that scores is a false positive it learns to exploit.

`extract_choice(answer_text, options)`: the rules, in order
---------------------------------------------------------
1. Options. `options` is a mapping letter -> option text (the order is irrelevant here) or an
   iterable of letters (a string such as "ABCD" is one). Letters are single Latin letters in any
   case ("a" means "A"). Without option texts rule 7 cannot apply, so "B. Glioma" is None: pass
   the mapping when you have it.
2. Normalisation, applied alike to the answer and to every option text: Unicode NFKC ("Ｂ" -> "B",
   "（Ｂ）" -> "(B)"); LaTeX wrappers \\boxed, \\fbox, \\text, \\textbf, \\textrm, \\mathrm, \\mathbf,
   \\mbox are replaced by their argument (up to 4 levels of nesting); the characters $ * _ ` # and
   the delimiters \\( \\) \\[ \\] are deleted (markdown bold, inline code, headings, maths); every
   run of whitespace becomes one space; trailing spaces and . ! ; , : are dropped.
3. Length. After normalisation, an answer longer than 256 characters plus twice the longest option
   text is None. No sensible answer needs more; the bound keeps the parser cheap on any input.
4. Lowercase letters count only as the whole answer: an optional lead-in (rule 5) and one dressed
   lowercase letter (rule 6): "b", "(b)", "b.", "[b]", "answer: b", "the answer is b". Anywhere
   else a lowercase letter is part of a word: "based on imaging, b" and "b. Glioma" are None.
5. Otherwise the answer must be a sequence of clauses that all name the same option, with nothing
   left over. Between clauses: an optional space, then at most one of , ; : . - – — =, then an
   optional space ("B. Glioma", "B: Glioma", "B - Glioma", "(B) Glioma", "Glioma, so B"). A clause
   is optionally a connective (so, thus, hence, therefore, that is, i.e.; optionally followed by a
   comma), then optionally a lead-in, then one core (rule 6 or 7). Lead-ins, case-insensitive:
   [the|my] [correct|right|best|final|most likely] answer|option|choice [is] [: or = or -]
   [option|choice], e.g. "Answer:", "The answer is", "The correct answer is", "Final answer:",
   "Option", "option", "The answer is option". Nothing else reads as a lead-in ("It is B",
   "I choose B" and "Based on the MRI, B" are None), and nothing may follow the last clause
   ("B is correct", "B because ..." are None).
6. A letter core is an uppercase letter that is one of the options, bare or dressed as (B), [B], {B}
   or B), and not touching another letter or digit on either side ("ABCD", "B2", "OptionB" hold no
   letter core). A letter that is not an option ("E" for options A-D) is no core, so the answer is
   None.
7. A text core is the complete text of one option, compared case-insensitively after normalisation,
   bare or in ( ) or [ ], optionally after the article a, an or the ("A glioma" is the option
   "Glioma"), and not running into a further letter or digit ("Gliomas" is not "Glioma"). Two
   options with the same text make that text name both. When A is an option, an uppercase "A" is
   also the letter A, so it reads as the article only in an answer of one clause ("A Glioma",
   "The answer is A glioma"): anywhere else it would hide the letter A from rule 8 ("A and B"
   when B's text is "And" would read as "A And" + "B").
8. A reading of the answer is one way to split all of it into clauses that name one letter L (a
   split whose clauses name two letters is no reading). The result is L when every reading names L,
   None when there is no reading or readings name different letters. So repeating the option is
   still one option ("B. B", "(B) Glioma, so B"), and any second option, by letter or by text, makes
   it None ("B or C", "B. Meningioma" when C is Meningioma, "B. no wait, C", "not C, it is B").
   The article reading lets "A Glioma" name B ("A" + "Glioma" names two options, so it is no
   reading) and "A normal brain" name A either way; "A. Glioma" has no article reading and is None.
   "A Glioma, so B" and "B. A Glioma" are None too: in them the A is the letter A (rule 7).

`mcq_reward(completion, answer, options, format_weight)`
--------------------------------------------------------
Tags are the exact ASCII strings <think>, </think>, <answer>, </answer>: case-sensitive, no spaces
or attributes, not NFKC-normalised ("<Answer>", "< answer >" and "＜answer＞" are plain text).
- accuracy is 1.0 iff the completion holds exactly one "<answer>" and exactly one "</answer>", the
  opener first, and extract_choice of the text between them is the gold letter. Nothing outside that
  block counts: a letter in the think block or after the block earns nothing, and an unterminated
  (truncated) answer earns nothing. Accuracy does not require the format, as in the paper and
  MM-EUREKA: "Glioma is likely. <answer>B</answer>" has accuracy 1.0 and format 0.0.
- format is 1.0 iff the completion, stripped of surrounding whitespace, is "<think>", a text that is
  not only whitespace, "</think>", optional whitespace, "<answer>", a text that is not only
  whitespace, "</answer>", and each of the four tags occurs exactly once in the whole completion (no
  second block, no nesting, no tag mentioned inside a block). Format does not require the answer to
  parse. Special tokens (EOS, "<|im_end|>") must be removed before scoring: they count as text after
  the answer.
- total = accuracy + format_weight * format.
"""

from __future__ import annotations

import heapq
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

Options: TypeAlias = Mapping[str, str] | Iterable[str]
"""Option letter -> option text, or just the valid letters."""

_LATEX_WRAPPER = re.compile(
    r"\\(?:boxed|fbox|textbf|textrm|text|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"
)
_LATEX_DEPTH = 4
_MARKUP = re.compile(r"\\[()\[\]]|[$*_`#]")
_SPACES = re.compile(r"\s+")
_TRAILING = " .!;,:"
_SLACK_CHARS = 256

_LEAD_IN_SRC = (
    r"(?:(?:the|my)\s+)?(?:(?:correct|right|best|final|most\s+likely)\s+)?"
    r"(?:answer|option|choice)\b(?:\s+is\b)?\s*[:=\-]?\s*(?:(?:option|choice)\b\s*)?"
)
_LEAD_IN = re.compile(_LEAD_IN_SRC, re.IGNORECASE)
_CONNECTIVE = re.compile(
    r"(?:(?:so|thus|hence|therefore|that\s+is)\b|i\.e\.)\s*,?\s*", re.IGNORECASE
)
_ARTICLE = re.compile(r"(?:a|an|the)\s+", re.IGNORECASE)
_SEPARATOR = re.compile(r"\s?[,;:.\-–—=]?\s?")
_LETTER = re.compile(r"([(\[{]?)([A-Z])([)\]}]?)")
_LOWERCASE_ANSWER = re.compile(rf"(?:(?i:{_LEAD_IN_SRC}))?([(\[{{]?)([a-z])([)\]}}]?)")
_LETTER_DRESSES = {("", ""), ("", ")"), ("(", ")"), ("[", "]"), ("{", "}")}
_TEXT_BRACKETS = {"(": ")", "[": "]"}


@dataclass(frozen=True)
class RewardBreakdown:
    format: float
    """1.0 iff the completion is one think block then one answer block (module docstring)."""
    accuracy: float
    """1.0 iff the one answer block commits to the gold option."""
    total: float
    """accuracy + format_weight * format: the scalar the advantages are computed from."""

    def as_dict(self) -> dict[str, float]:
        return {"format": self.format, "accuracy": self.accuracy, "total": self.total}


def extract_choice(answer_text: str, options: Options) -> str | None:
    """The one option letter (uppercase) that `answer_text` commits to, or None.

    `answer_text` is the content of an answer block. The rules are in the module docstring.
    """
    letters, raw_texts = _parse_options(options)
    texts = {letter: _normalise(text) for letter, text in raw_texts.items()}
    text_patterns = [
        (letter, re.compile(re.escape(t), re.IGNORECASE)) for letter, t in texts.items() if t
    ]
    answer = _normalise(answer_text)
    if not answer or len(answer) > _SLACK_CHARS + 2 * max(map(len, texts.values()), default=0):
        return None

    lowercase = _LOWERCASE_ANSWER.fullmatch(answer)
    if lowercase is not None:
        opening, letter, closing = lowercase.groups()
        letter = letter.upper()
        ok = (opening, closing) in _LETTER_DRESSES and letter in letters
        return letter if ok else None

    named = _readings(answer, letters, text_patterns)
    return named.pop() if len(named) == 1 else None


def mcq_reward(
    completion: str, answer: str, options: Options, format_weight: float = 0.5
) -> RewardBreakdown:
    """Score one completion against the gold letter `answer` (one of `options`' letters).

    Raises ValueError if `answer` is not one of the options: a bad label would otherwise score 0 for
    every completion without a sound.
    """
    letters, _ = _parse_options(options)
    gold = _option_letter(answer)
    if gold not in letters:
        raise ValueError(f"gold answer {answer!r} is not one of the options {sorted(letters)}")
    block = answer_block(completion)
    accuracy = 1.0 if block is not None and extract_choice(block, options) == gold else 0.0
    fmt = 1.0 if _is_well_formed(completion) else 0.0
    return RewardBreakdown(format=fmt, accuracy=accuracy, total=accuracy + format_weight * fmt)


def answer_block(completion: str) -> str | None:
    """The text inside the completion's only <answer>...</answer> block, else None."""
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None
    start = completion.index("<answer>") + len("<answer>")
    end = completion.index("</answer>")
    return completion[start:end] if start <= end else None


def _is_well_formed(completion: str) -> bool:
    text = completion.strip()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(text.count(tag) != 1 for tag in tags):
        return False
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return False
    think_end = text.index("</think>")
    answer_start = text.index("<answer>")
    if answer_start < think_end:
        return False
    think = text[len("<think>") : think_end]
    between = text[think_end + len("</think>") : answer_start]
    answer = text[answer_start + len("<answer>") : -len("</answer>")]
    return bool(think.strip()) and not between.strip() and bool(answer.strip())


def _parse_options(options: Options) -> tuple[frozenset[str], dict[str, str]]:
    """(valid letters, letter -> option text); texts are empty when only letters are given."""
    pairs = list(options.items()) if isinstance(options, Mapping) else [(k, "") for k in options]
    texts = {_option_letter(key): text for key, text in pairs}
    if not texts:
        raise ValueError("no options given")
    if len(texts) != len(pairs):
        raise ValueError(f"option letters repeat (ignoring case): {[key for key, _ in pairs]}")
    return frozenset(texts), texts


def _option_letter(key: str) -> str:
    letter = unicodedata.normalize("NFKC", key).strip().upper()
    if len(letter) != 1 or not "A" <= letter <= "Z":
        raise ValueError(f"option letter must be one Latin letter, got {key!r}")
    return letter


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    for _ in range(_LATEX_DEPTH):
        text, count = _LATEX_WRAPPER.subn(r"\1", text)
        if not count:
            break
    text = _MARKUP.sub("", text)
    return _SPACES.sub(" ", text).strip().rstrip(_TRAILING)


def _readings(
    s: str, letters: frozenset[str], texts: list[tuple[str, re.Pattern[str]]]
) -> set[str]:
    """The letters L for which all of `s` reads as clause (separator clause)*, each clause naming L.

    A forward search over clause start positions. Every clause and separator step moves forward, so
    positions are processed in increasing order and each at most once: the work is linear in len(s)
    times the number of options.
    """
    # pending[pos]: letters named by the clauses before pos; None marks the start (nothing named).
    pending: dict[int, set[str | None]] = {0: {None}}
    queue = [0]
    named: set[str] = set()
    while queue and len(named) < 2:
        pos = heapq.heappop(queue)
        before = pending.pop(pos)
        for letter, end in _clauses(s, pos, letters, texts):
            if None not in before and letter not in before:
                continue
            if end == len(s):
                named.add(letter)
                continue
            separator = _SEPARATOR.match(s, end)  # always matches: every part is optional
            nxt = separator.end() if separator is not None else end
            if nxt == len(s):
                continue
            if nxt not in pending:
                pending[nxt] = set()
                heapq.heappush(queue, nxt)
            pending[nxt].add(letter)
    return named


def _clauses(
    s: str, pos: int, letters: frozenset[str], texts: list[tuple[str, re.Pattern[str]]]
) -> Iterator[tuple[str, int]]:
    """Every (letter, end) such that s[pos:end] is one clause naming that letter."""
    cores = {pos}
    connective = _CONNECTIVE.match(s, pos)
    if connective is not None:
        cores.add(connective.end())
    for start in list(cores):
        lead_in = _LEAD_IN.match(s, start)
        if lead_in is not None:
            cores.add(lead_in.end())
    for core in cores:
        if core >= len(s) or (core > 0 and s[core].isalnum() and s[core - 1].isalnum()):
            continue
        letter = _LETTER.match(s, core)
        if letter is not None:
            opening, name, closing = letter.groups()
            end = letter.end()
            if (
                (opening, closing) in _LETTER_DRESSES
                and name in letters
                and not (end < len(s) and s[end].isalnum())
            ):
                yield name, end
        yield from _text_cores(s, core, texts)
        article = _ARTICLE.match(s, core)
        if article is not None:
            # An uppercase "A" that may be the letter A is the article only in a one-clause answer.
            whole_answer_only = s[core : core + 2].rstrip() == "A" and "A" in letters
            for name, end in _text_cores(s, article.end(), texts):
                if not whole_answer_only or (pos == 0 and end == len(s)):
                    yield name, end


def _text_cores(
    s: str, core: int, texts: list[tuple[str, re.Pattern[str]]]
) -> Iterator[tuple[str, int]]:
    closing = _TEXT_BRACKETS.get(s[core], "") if core < len(s) else ""
    start = core + 1 if closing else core
    for letter, pattern in texts:
        match = pattern.match(s, start)
        if match is None:
            continue
        end = match.end()
        if closing:
            if s[end : end + 1] != closing:
                continue
            end += 1
        elif end < len(s) and s[end].isalnum() and s[end - 1].isalnum():
            continue
        yield letter, end
