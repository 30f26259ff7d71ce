"""Split a multiple-choice question text into the question and its lettered options.

Option lists in medical VQA data come in many shapes. `split_question_options` accepts:

- one option per line, each line starting with a marker: ``A. x``, ``A) x``, ``(A) x``, ``A: x``
  (full-width ``．）：`` too); blank lines between options are fine;
- inline, on one line or wrapped: ``Options: (A) Benign (B) Malignant`` or ``Options: A. Benign
  B. Malignant``; an ``Options:`` / ``Choices:`` anchor is optional but, when present, the options
  must start right after it.

Rules, and why:

- Letters are upper case, consecutive from A, 2 to 10 options (A..J). Lower-case markers such as
  "(b)" are option *text*, never markers, so "(A) Type (b) lesion (B) Other" has two options.
- All markers of one list share a style; a "(A)" list is not continued by "B." lines.
- One-per-line lists win over inline ones: the line structure is the stronger evidence. When
  several blocks qualify the last one is used, because options follow the question.
- Inline markers are ambiguous ("Vitamin A. Which...?", "A. A. fumigatus"), so an inline list is
  the longest chain of markers A, B, C... in which every option text is non-empty, no option text
  contains a marker of a later letter (letters out of order are rejected, not re-sorted), and the
  first marker does not directly follow another marker; among equally long chains the one that
  starts last wins (the question sentence comes first).
- Trailing instructions are not options. A line after the options that starts like an instruction
  ("Answer with the option's letter...", "Please answer...", "Choose the best answer.", a bare
  "Answer:") is dropped, and so is such a sentence appended to the last option on its line, when
  option text remains before it (with the period that ended the option). Any other text after the options (e.g. "Which of the above is
  correct?") is kept as part of the question, after the text that precedes the options.
- Instructions *before* the options are left in the question: they may carry meaning.

The functions here are pure string functions; the record loaders turn their failures into
`DataError`s naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

OPTION_LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS = 2
MAX_OPTIONS = len(OPTION_LETTERS)


class OptionParseError(ValueError):
    """The text has option-like lines that do not form a valid list (out of order, too many...)."""


@dataclass(frozen=True)
class _MarkerStyle:
    line: re.Pattern[str]
    """Matches a whole line that starts with a marker; groups `letter` and `text`."""
    inline: re.Pattern[str]
    """Finds markers inside running text; group `letter`."""


def _style(marker: str, inline_tail: str) -> _MarkerStyle:
    # Line markers may be followed directly by text ("B.Glioma"): the line start plus a run of
    # consecutive letters is evidence enough. Inline markers must start the text, follow
    # whitespace or a colon, and (for "A." / "A)" / "A:") be followed by whitespace, so that
    # "e.g." or "A.D." are not read as markers.
    line = re.compile(rf"^[ \t]*{marker}[ \t]*(?P<text>.*?)\s*$")
    inline = re.compile(rf"(?<![^\s:：]){marker}{inline_tail}")
    return _MarkerStyle(line, inline)


# Detection covers A-Z on lines so that an 11th option ("K.") is reported, not swallowed.
_STYLES = (
    _style(r"[(（](?P<letter>[A-Z])[)）]", r""),  # (A)
    _style(r"(?P<letter>[A-Z])[.．]", r"(?=\s)"),  # A.
    _style(r"(?P<letter>[A-Z])[)）]", r"(?=\s)"),  # A)
    _style(r"(?P<letter>[A-Z])[:：]", r"(?=\s)"),  # A:
)

_ANCHOR = re.compile(r"(?i)\b(?:answer\s+)?(?:options|choices|candidates)\s*[:：]")
_ANCHOR_LINE = re.compile(r"(?i)^\s*(?:answer\s+)?(?:options|choices|candidates)\s*[:：]?\s*$")

# How instructions to the answerer begin. Matched case-sensitively on the first word so that
# option text such as "please see text" is not taken for one.
_INSTRUCTION_START = (
    r"(?:Answer (?:with|using|the question|directly|only)|"
    r"Please (?:answer|select|choose|respond|reply|provide|output|give|pick)|"
    r"(?:Choose|Select|Pick) (?:the|one|an?|only)\b|"
    r"(?:Respond|Reply) (?:with|only)|Output only|Only output|Return only)"
)
_INSTRUCTION_LINE = re.compile(
    rf"^\s*(?:{_INSTRUCTION_START}|(?i:(?:your\s+)?answer)\s*[:：]?\s*$)"
)
_INSTRUCTION_TAIL = re.compile(rf"\s+{_INSTRUCTION_START}")

_IMAGE_PLACEHOLDER = re.compile(r"<image(?:[ _-]?\d+)?>")


def count_image_placeholders(text: str) -> int:
    """How many `<image>` (or `<image_1>`-style) placeholders the text holds."""
    return len(_IMAGE_PLACEHOLDER.findall(text))


def strip_image_placeholders(text: str) -> str:
    """The text without `<image>` placeholders, and without the blank space they leave."""
    without = _IMAGE_PLACEHOLDER.sub("", text)
    return "\n".join(line.rstrip() for line in without.strip().splitlines()).strip()


def split_question_options(text: str) -> tuple[str, dict[str, str]]:
    """Split `text` into (question, {letter: option text}).

    Returns `(text.strip(), {})` when the text holds no option list at all; raises
    `OptionParseError` when it holds option lines that do not form a valid list. See the module
    docstring for the accepted shapes.
    """
    text = text.strip()
    found, line_problem = _split_line_options(text)
    if found is None:
        found = _split_inline_options(text)
    if found is None:
        if line_problem is not None:
            raise OptionParseError(line_problem)
        return text, {}
    question, options = found
    return _tidy_question(question), options


def strip_trailing_instruction(option_text: str) -> str:
    """Drop an instruction sentence glued to the end of the last option's text.

    Only when option text remains before it: "Please answer" alone is left as it is.
    """
    match = _INSTRUCTION_TAIL.search(option_text)
    if match is None or not option_text[: match.start()].strip():
        return option_text
    # "Glioma. Answer with..." -> "Glioma": the period closed the option before the instruction.
    return option_text[: match.start()].rstrip().removesuffix(".")


def is_instruction_line(line: str) -> bool:
    """Whether a line after the options is an instruction to the answerer, not content."""
    return _INSTRUCTION_LINE.match(line) is not None


def normalize_option_text(text: str) -> str:
    """Option text compared loosely: case, spacing and a trailing period do not count."""
    return " ".join(text.split()).rstrip(".").casefold()


def options_from_value(value: object) -> dict[str, str]:
    """Options given explicitly by a record, as {"A": ..., "B": ...} or a list lettered A.. in order.

    List items that repeat their own marker ("A. Benign", "(B) Malignant") lose it. Raises
    `OptionParseError` for anything that is not a valid option list.
    """
    if isinstance(value, Mapping):
        by_letter: dict[str, object] = {}
        for key, text in value.items():
            letter = str(key).strip().strip("().").upper()
            if len(letter) != 1 or letter not in OPTION_LETTERS:
                raise OptionParseError(f"option key {key!r} is not a letter A-J")
            if letter in by_letter:
                raise OptionParseError(f"option {letter} is given twice")
            by_letter[letter] = text
        letters = sorted(by_letter)
        expected = OPTION_LETTERS[: len(letters)]
        if "".join(letters) != expected:
            raise OptionParseError(
                f"option letters {', '.join(letters)} are not consecutive from A"
            )
        items: list[object] = [by_letter[letter] for letter in letters]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise OptionParseError(f"options must be a dict or a list, not {type(value).__name__}")

    if not MIN_OPTIONS <= len(items) <= MAX_OPTIONS:
        raise OptionParseError(f"{len(items)} options; expected {MIN_OPTIONS} to {MAX_OPTIONS}")
    options: dict[str, str] = {}
    for letter, item in zip(OPTION_LETTERS, items, strict=False):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise OptionParseError(f"option {letter} is a {type(item).__name__}, not text")
        text = _drop_own_marker(str(item).strip(), letter)
        if not text:
            raise OptionParseError(f"option {letter} is empty")
        options[letter] = text
    return options


def _drop_own_marker(text: str, letter: str) -> str:
    for style in _STYLES:
        match = style.line.match(text)
        if match and match["letter"] == letter and match["text"]:
            return str(match["text"])
    return text


# ---------------------------------------------------------------------------------------------
# One option per line

_LineHit = tuple[int, str, str]
"""(line index, letter, option text) of a line that starts with a marker."""


def _split_line_options(
    text: str,
) -> tuple[tuple[str, dict[str, str]] | None, str | None]:
    """The options of the last one-per-line block, or (None, why marker lines did not qualify)."""
    lines = text.split("\n")
    best: tuple[_MarkerStyle, list[_LineHit]] | None = None
    problem = None
    for style in _STYLES:
        hits = [
            (i, m["letter"], m["text"])
            for i, line in enumerate(lines)
            if (m := style.line.match(line)) is not None
        ]
        blocks = _line_blocks(lines, hits)
        if blocks and (best is None or blocks[-1][0][0] > best[1][0][0]):
            best = style, blocks[-1]
        elif not blocks and _looks_like_option_list(hits):
            letters = ", ".join(letter for _, letter, _ in hits)
            problem = f"option lines {letters} do not run consecutively from A"
    if best is None:
        return None, problem

    style, block = best
    start, end = block[0][0], block[-1][0] + 1
    trailing = []
    for line in lines[end:]:
        match = style.line.match(line)
        if match is not None:
            raise OptionParseError(
                f"option {match['letter']} after option {block[-1][1]}: letters must run "
                f"consecutively from A, at most {MAX_OPTIONS} options"
            )
        if line.strip() and not is_instruction_line(line):
            trailing.append(line)
    if trailing and _split_inline_options("\n".join(trailing)) is not None:
        raise OptionParseError("the text holds two option lists, one per line and one inline")
    options = {letter: option_text for _, letter, option_text in block}
    last = block[-1][1]
    options[last] = strip_trailing_instruction(options[last])
    return (_join_question(lines[:start], trailing), options), None


def _line_blocks(lines: list[str], hits: list[_LineHit]) -> list[list[_LineHit]]:
    """Runs of marker lines A, B, C... with non-empty texts (blank lines may separate them)."""
    by_line = {i: (letter, option_text) for i, letter, option_text in hits}
    blocks = []
    for first, letter, _ in hits:
        if letter != "A":
            continue
        block: list[_LineHit] = []
        for j in range(first, len(lines)):
            if not lines[j].strip():
                continue
            hit = by_line.get(j)
            expected = OPTION_LETTERS[len(block)] if len(block) < MAX_OPTIONS else None
            if hit is None or hit[0] != expected or not hit[1]:
                break
            block.append((j, hit[0], hit[1]))
        if len(block) >= MIN_OPTIONS:
            blocks.append(block)
    return blocks


def _looks_like_option_list(hits: list[_LineHit]) -> bool:
    """At least two marker lines close together ("A. x / C. y"): a broken list, not prose."""
    if len(hits) < MIN_OPTIONS:
        return False
    line_numbers = [i for i, _, _ in hits]
    return max(line_numbers) - min(line_numbers) < 2 * len(hits)


def _join_question(before: list[str], after: list[str]) -> str:
    parts = ["\n".join(before).strip(), "\n".join(after).strip()]
    return "\n".join(part for part in parts if part)


# ---------------------------------------------------------------------------------------------
# Inline options


@dataclass(frozen=True)
class _Marker:
    letter: str
    start: int
    end: int


def _split_inline_options(text: str) -> tuple[str, dict[str, str]] | None:
    anchors = list(_ANCHOR.finditer(text))
    if anchors:
        anchor = anchors[-1]
        chain = _best_inline_chain(text, anchor.end(), must_start_first=True)
        # The options must start right after "Options:", else the anchor was prose.
        if chain is not None and not text[anchor.end() : chain[0].start].strip():
            return _inline_result(text, chain, question_end=anchor.start())
    chain = _best_inline_chain(text, 0, must_start_first=False)
    if chain is None:
        return None
    return _inline_result(text, chain, question_end=chain[0].start)


def _inline_result(
    text: str, chain: list[_Marker], question_end: int
) -> tuple[str, dict[str, str]]:
    options = {}
    for marker, following in pairwise(chain):
        options[marker.letter] = " ".join(text[marker.end : following.start].split())
    last = chain[-1]
    last_end = _line_end(text, last.end)
    options[last.letter] = strip_trailing_instruction(" ".join(text[last.end : last_end].split()))
    trailing = [
        line
        for line in text[last_end:].split("\n")
        if line.strip() and not is_instruction_line(line)
    ]
    return _join_question([text[:question_end]], trailing), options


def _line_end(text: str, position: int) -> int:
    newline = text.find("\n", position)
    return len(text) if newline < 0 else newline


def _best_inline_chain(
    text: str, search_from: int, *, must_start_first: bool
) -> list[_Marker] | None:
    """The longest valid chain over all marker styles; ties go to the chain that starts last."""
    best: list[_Marker] | None = None
    for style in _STYLES:
        markers = [
            _Marker(m["letter"], m.start(), m.end())
            for m in style.inline.finditer(text, search_from)
            if m["letter"] in OPTION_LETTERS
        ]
        starts = range(min(1, len(markers))) if must_start_first else range(len(markers))
        for first in starts:
            if markers[first].letter != "A" or _follows_marker(text, markers, first):
                continue
            chain = _longest_chain(text, markers, first)
            if len(chain) < MIN_OPTIONS:
                continue
            if best is None or (len(chain), chain[0].start) > (len(best), best[0].start):
                best = chain
    return best


def _follows_marker(text: str, markers: list[_Marker], index: int) -> bool:
    """Whether only whitespace separates markers[index] from the marker before it."""
    return index > 0 and not text[markers[index - 1].end : markers[index].start].strip()


def _longest_chain(text: str, markers: list[_Marker], first: int) -> list[_Marker]:
    """The longest valid chain A, B, C... that starts at markers[first].

    tail(i) is the longest valid chain from marker i on (memoised, so quadratic in the number of
    markers). Among equally long tails the earliest next marker wins, so that option texts swallow
    as few markers as possible.
    """
    memo: dict[int, list[int]] = {}

    def tail(i: int) -> list[int]:
        if i not in memo:
            letter_index = OPTION_LETTERS.index(markers[i].letter)
            last_end = _line_end(text, markers[i].end)
            best = [i] if _option_text_ok(text, markers, i, last_end, last=True) else []
            if letter_index + 1 < MAX_OPTIONS:
                next_letter = OPTION_LETTERS[letter_index + 1]
                for j in range(i + 1, len(markers)):
                    if markers[j].letter != next_letter:
                        continue
                    if not _option_text_ok(text, markers, i, markers[j].start, last=False):
                        continue
                    rest = tail(j)
                    if rest and len(rest) + 1 > len(best):
                        best = [i, *rest]
            memo[i] = best
        return memo[i]

    return [markers[i] for i in tail(first)]


def _option_text_ok(text: str, markers: list[_Marker], i: int, end: int, *, last: bool) -> bool:
    option_text = text[markers[i].end : end].strip()
    if last:
        option_text = strip_trailing_instruction(" ".join(option_text.split()))
    if not option_text:
        return False
    # A marker of a later letter inside this option's text means the letters are out of order
    # ("A. x C. y B. z"), unless it directly follows another marker ("B. C. albicans").
    letter_index = OPTION_LETTERS.index(markers[i].letter)
    for k in range(i + 1, len(markers)):
        if markers[k].start >= end:
            break
        later = OPTION_LETTERS.index(markers[k].letter) > letter_index
        if later and not _follows_marker(text, markers, k):
            return False
    return True


def _tidy_question(question: str) -> str:
    lines = [line.rstrip() for line in question.strip().split("\n")]
    tidy = "\n".join(line for line in lines if not _ANCHOR_LINE.match(line)).strip()
    # "...benign or malignant? Options:" loses its dangling anchor.
    return _DANGLING_ANCHOR.sub("", tidy)


_DANGLING_ANCHOR = re.compile(r"(?i)\s*\b(?:answer\s+)?(?:options|choices|candidates)\s*[:：]\s*$")
