"""Read the gold answer letter and the reference reasoning out of a dataset's answer fields.

These parse *reference* data (a GMAI-Reasoning10K gpt turn, an MM-EUREKA "answer"), which is
trusted to commit to one option; scoring model completions is `gmai_rl.reward`'s job and is
deliberately stricter.

Accepted answer shapes, for options {"A": ..., "B": "Glioma", ...}:
"B", "B.", "(B)", "B)", "b" (a lone lower-case letter), "B. Glioma" (the text must agree with
option B), "Glioma" (text equal to exactly one option, ignoring case, spacing and a final period),
and any of these wrapped in "$...$", "\\boxed{...}", "\\text{...}", "<answer>...</answer>", "**...**"
or prefixed by "Answer:" / "Option" / "The answer is".

Accepted response shapes (`split_response`):
- "<think>R</think>\\n<answer>B</answer>" or "R <answer>B</answer>": reasoning R, answer B
  (<answer> blocks inside <think> are reasoning; two different ones after it are refused);
- "<think>R</think> B": reasoning R, answer B;
- "R ... The answer is B." / "R ... Answer: B" / "R ... \\boxed{B}": the last such statement is the
  answer and the reasoning is the text before the sentence that holds it;
- anything else is a bare answer with no reasoning ("B", "B. Glioma").
"""

from __future__ import annotations

import re

from gmai_rl.data.options import normalize_option_text


class AnswerError(ValueError):
    """An answer from which no option letter can be read."""


class AnswerNotInOptions(AnswerError):
    """An answer that names an option the question does not have, or contradicts its text."""


_WRAPPERS = (
    re.compile(r"^\$+(.*?)\$+$", re.S),
    re.compile(r"^\\boxed\{(.*)\}$", re.S),
    re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", re.S),
    re.compile(r"^<answer>(.*?)</answer>$", re.S),
    re.compile(r"^\*\*(.*?)\*\*$", re.S),
)
_PREFIX = re.compile(
    r"^(?i:(?:the\s+)?(?:final\s+|correct\s+)?answer\b(?:\s+is\b)?\s*[:：]?|option\b|choice\b)\s*"
)
_LETTER_ONLY = re.compile(r"^[(\[]?([A-Ja-j])[)\]]?[.:：)]?$")
_LETTER_AND_TEXT = re.compile(r"^[(\[]?([A-J])(?:[)\]]\s*|[.:：)]\s*|\s+-\s+)(.+)$", re.S)

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_THINK_TAG = re.compile(r"</?think>")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# "The answer is B", "Final answer: (B)", "Answer: B". The letter must be upper case and stand
# alone, so "the answer is a benign lesion" does not read as option A.
_STATED = re.compile(
    r"(?i:(?:the\s+)?(?:final\s+|correct\s+|best\s+)?answer\s*(?:is|would\s+be|should\s+be)?)"
    r"\s*[:：]?\s*(?i:option\s+|choice\s+)?[(\[]?([A-J])[)\]]?(?=$|[\s.,;:!)])"
)


def resolve_answer_letter(answer: str, options: dict[str, str]) -> str:
    """The option letter `answer` names; raises `AnswerError` if it names none or a missing one."""
    text = _unwrap(answer)
    span = f"{next(iter(options))}-{list(options)[-1]}" if options else "(none)"
    if (match := _LETTER_ONLY.match(text)) is not None:
        letter = match[1].upper()
        if letter not in options:
            raise AnswerNotInOptions(f"answer {answer!r} is not one of the options {span}")
        return letter
    # Whole option text first: an option may itself start like a marker ("C. albicans").
    said = {normalize_option_text(answer), normalize_option_text(text)}
    matching = [
        letter for letter, option in options.items() if normalize_option_text(option) in said
    ]
    if len(matching) == 1:
        return matching[0]
    if len(matching) > 1:
        raise AnswerError(f"answer {answer!r} matches options {', '.join(matching)}")
    if (match := _LETTER_AND_TEXT.match(text)) is not None:
        letter, stated = match[1], match[2]
        if letter not in options:
            raise AnswerNotInOptions(f"answer {answer!r} is not one of the options {span}")
        if normalize_option_text(stated) != normalize_option_text(options[letter]):
            raise AnswerNotInOptions(
                f"answer {answer!r} names option {letter}, whose text is {options[letter]!r}"
            )
        return letter
    raise AnswerError(f"cannot read an option letter from answer {answer!r}")


def split_response(response: str) -> tuple[str | None, str]:
    """Split a reference response into (reasoning or None, answer text). See the module docstring."""
    text = response.strip()
    tags = list(_ANSWER_TAG.finditer(text))
    if tags:
        # Blocks inside the reasoning are thoughts; after it, the response must commit to one.
        think_end = text.rfind("</think>")
        final = {tag[1].strip() for tag in tags if tag.start() > think_end}
        if len(final) > 1:
            raise AnswerError(f"the response gives several answers: {sorted(final)}")
        return _reasoning(text[: tags[-1].start()]), tags[-1][1].strip()
    if "</think>" in text:
        before, _, after = text.rpartition("</think>")
        return _reasoning(before), after.strip()
    statements = [*_BOXED.finditer(text), *_STATED.finditer(text)]
    if statements:
        last = max(statements, key=lambda match: match.start())
        return _reasoning(text[: _sentence_start(text, last.start())]), last[1].strip()
    return None, text


def strip_think_tags(text: str) -> str:
    """Reasoning text without <think> / </think> tags."""
    return _THINK_TAG.sub("", text).strip()


def _reasoning(text: str) -> str | None:
    return strip_think_tags(text) or None


def _sentence_start(text: str, position: int) -> int:
    """Where the sentence holding `position` starts: after the last '.', '!', '?' or newline."""
    boundary = max(text.rfind(mark, 0, position) for mark in (". ", "! ", "? ", "\n"))
    return 0 if boundary < 0 else boundary + 1


def _unwrap(answer: str) -> str:
    text = answer.strip()
    changed = True
    while changed:
        changed = False
        for wrapper in (*_WRAPPERS, _PREFIX):
            match = wrapper.match(text)
            if match is None:
                continue
            inner = (match[1] if match.groups() else text[match.end() :]).strip()
            if inner and inner != text:
                text, changed = inner, True
    return text
