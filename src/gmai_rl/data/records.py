"""Turn one record (a parsed JSON object or a `datasets` row) into an `MCQItem`.

Three record formats are accepted, detected per record by their keys:

1. Conversations, as in GMAI-Reasoning10K (both configs) and LLaVA-style data::

       {"image": "2d/cls/mri/brain_042.png" | [...],
        "conversations": [{"from": "human", "value": "<image>\\nQuestion?\\nA. x\\nB. y"},
                          {"from": "gpt", "value": "B"}]}

   The gpt turn is a bare answer ("B", "B.", "(B)", "B. Glioma") in `reasoning_mcq_rl`, or
   reasoning followed by the answer in `reasoning_mcq_sft` ("<think>R</think>\\n<answer>B</answer>",
   "R <answer>B</answer>", "R ... The answer is B."); see `gmai_rl.data.answers`. Turns may also be
   written {"role": "user"|"assistant", "content": ...} (MM-EUREKA's InternVL release, with
   images under "image_urls"), and `datasets` may hand them over as {"from": [...], "value": [...]}.
   The dataset card declares only `image` and `conversations`; optional keys `id`, `answer`,
   `options`, `modality` and `reasoning` are used when present (an `answer` or `options` key must
   agree with the conversation; a `reasoning` key replaces reasoning read from the gpt turn), and
   any other key is ignored.

2. Chat messages, as in MM-EUREKA's Qwen release::

       {"id": "0", "answer": "B" | "\\\\boxed{B}" | "$B$",
        "message": "[{\\"role\\": \\"user\\", \\"content\\": [{\\"type\\": \\"image\\",
                     \\"image\\": \\"file:///data/x.png\\"}, {\\"type\\": \\"text\\", \\"text\\": \\"...\\"}]}]"}

   `message` (or `messages`) is a JSON string or an already parsed list. System messages are
   ignored (the trainer brings its own system prompt).

3. The project's plain form, for synthetic and users' own data::

       {"id": "q1",                                   # optional; default "<file stem>-<line>"
        "question": "Which lesion is shown?",          # without option lines
        "options": {"A": "Cyst", "B": "Abscess"} | ["Cyst", "Abscess"],
        "answer": "B" | "Abscess",                     # a letter, or the text of exactly one option
        "image": "img/1.png" | ["img/1.png", ...],     # or "images"; optional (text-only MCQ)
        "modality": "ct",                              # optional; else inferred
        "reasoning": "..."}                            # optional reference reasoning (SFT)

   Without `options`, the options are parsed from the question text.

Images: a string or a list; relative paths resolve against `image_root`, absolute paths and
`file://` URIs are honoured, `~` is expanded; remote URLs are rejected (download them first).
Paths are made absolute without resolving symlinks, because a Hugging Face snapshot's files are
symlinks into a blob store whose names carry neither the folder structure nor the extension. A
relative path that climbs out of `image_root` ("../x.png" past its top) is refused.

Every rejection raises `RecordError` with a short machine-readable reason (the constants below)
and a human-readable detail; the loaders add the file and line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from gmai_rl.data.answers import (
    AnswerError,
    AnswerNotInOptions,
    resolve_answer_letter,
    split_response,
    strip_think_tags,
)
from gmai_rl.data.modality import infer_modality
from gmai_rl.data.options import (
    OptionParseError,
    count_image_placeholders,
    normalize_option_text,
    options_from_value,
    split_question_options,
    strip_image_placeholders,
)
from gmai_rl.types import MCQItem

# Reasons a record is rejected; they key the skip counts of a load report.
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FORMAT = "unknown_format"
WRONG_TYPE = "wrong_type"
BAD_CONVERSATION = "bad_conversation"
NO_OPTIONS = "no_options"
BAD_OPTIONS = "bad_options"
EMPTY_QUESTION = "empty_question"
NO_ANSWER = "no_answer"
BAD_ANSWER = "bad_answer"
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
CONFLICTING_FIELDS = "conflicting_fields"
BAD_IMAGE_REFERENCE = "bad_image_reference"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"
DUPLICATE_ID = "duplicate_id"


class RecordError(ValueError):
    """Why one record cannot become an `MCQItem`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[RecordError], tuple[str, str]]:
        return type(self), (self.reason, self.detail)  # picklable across Ray processes


@dataclass(frozen=True)
class _Exchange:
    """The parts every format reduces to before validation."""

    question_text: str
    image_refs: list[str]
    response: str | None
    """The reference (assistant) turn, if the record has one."""


_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model", "bot"}
_IMAGE_KEYS = ("image", "images", "image_urls")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def parse_record(
    record: object, *, default_id: str, source: str | None, image_root: str
) -> MCQItem:
    """The `MCQItem` a record describes; raises `RecordError` saying why not."""
    if not isinstance(record, Mapping):
        raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    # `datasets` fills keys a row lacks with None; treat them as absent.
    fields = {str(key): value for key, value in record.items() if value is not None}

    if "message" in fields or "messages" in fields:
        exchange = _read_chat(fields)
    elif "conversations" in fields:
        exchange = _read_conversations(fields)
    elif "question" in fields:
        exchange = _read_plain(fields)
    else:
        raise RecordError(
            UNKNOWN_FORMAT,
            "expected 'conversations' (GMAI-Reasoning10K), 'message' (MM-EUREKA) or 'question' "
            f"(plain form); found keys {sorted(fields)}",
        )

    placeholders = count_image_placeholders(exchange.question_text)
    if placeholders and placeholders != len(exchange.image_refs):
        raise RecordError(
            CONFLICTING_FIELDS,
            f"the question has {placeholders} <image> placeholders but the record "
            f"{len(exchange.image_refs)} images",
        )
    question, options = _question_and_options(
        strip_image_placeholders(exchange.question_text), fields.get("options")
    )
    letter, reasoning = _answer_and_reasoning(fields, exchange.response, options)
    return MCQItem(
        id=_record_id(fields, default_id),
        question=question,
        options=options,
        answer=letter,
        images=tuple(resolve_image_path(ref, image_root) for ref in exchange.image_refs),
        modality=infer_modality(_optional_text(fields, "modality"), exchange.image_refs, question),
        reasoning=reasoning,
        source=source,
    )


def resolve_image_path(ref: str, image_root: str) -> str:
    """The absolute path an image reference names (see the module docstring)."""
    if ref.startswith("file:"):
        # file:///abs/x.png -> /abs/x.png; file://rel/x.png -> rel/x.png; file:/abs -> /abs
        path = unquote(ref.removeprefix("file:"))
        path = path.removeprefix("//")
    elif _URL_SCHEME.match(ref) or ref.startswith("data:"):
        raise RecordError(
            BAD_IMAGE_REFERENCE,
            f"image {ref[:80]!r} is not a local file; download it and reference the file",
        )
    else:
        path = ref
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    resolved = os.path.normpath(os.path.join(image_root, path))
    # A relative reference stays in the dataset: "../../home/x/.ssh/id_rsa.png" in a downloaded
    # record must not read a file the dataset does not hold. (Checked on the names, before any
    # symlink: a hub snapshot's files are symlinks into its blob store, outside the folder.)
    if os.path.commonpath([resolved, os.path.normpath(image_root)]) != os.path.normpath(image_root):
        raise RecordError(
            BAD_IMAGE_REFERENCE,
            f"image {ref[:80]!r} leaves the image root {image_root}; a relative path must stay "
            "inside it (an absolute path is taken as given)",
        )
    return resolved


# ---------------------------------------------------------------------------------------------
# The three formats


def _read_conversations(fields: dict[str, Any]) -> _Exchange:
    turns = _as_turn_list(fields["conversations"], "conversations")
    text, part_images, response = _single_exchange(turns)
    return _Exchange(text, _merge_images(part_images, _record_images(fields)), response)


def _read_chat(fields: dict[str, Any]) -> _Exchange:
    key = "message" if "message" in fields else "messages"
    messages = fields[key]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise RecordError(INVALID_JSON, f"'{key}' is not valid JSON: {error.msg}") from None
    turns = _as_turn_list(messages, key)
    text, part_images, response = _single_exchange(turns)
    return _Exchange(text, _merge_images(part_images, _record_images(fields)), response)


def _read_plain(fields: dict[str, Any]) -> _Exchange:
    question = fields["question"]
    if not isinstance(question, str):
        raise RecordError(WRONG_TYPE, f"'question' is a {type(question).__name__}, not text")
    return _Exchange(question, _record_images(fields), response=None)


# ---------------------------------------------------------------------------------------------
# Turns and images


def _as_turn_list(value: object, key: str) -> list[Mapping[str, Any]]:
    # `datasets` may store a list of structs column-wise: {"from": [...], "value": [...]}.
    if isinstance(value, Mapping) and all(isinstance(v, list) for v in value.values()):
        columns = list(value.values())
        if len({len(column) for column in columns}) == 1:
            value = [dict(zip(value, row, strict=True)) for row in zip(*columns, strict=True)]
    if not isinstance(value, list) or not all(isinstance(turn, Mapping) for turn in value):
        raise RecordError(WRONG_TYPE, f"'{key}' must be a list of turns (objects)")
    return value


def _single_exchange(turns: list[Mapping[str, Any]]) -> tuple[str, list[str], str | None]:
    """(question text, images in the question turn, reference response or None)."""
    user: list[tuple[str, list[str]]] = []
    assistant: list[str] = []
    for index, turn in enumerate(turns):
        role = turn.get("from", turn.get("role"))
        text, images = _turn_content(turn.get("value", turn.get("content")), index)
        if role in _USER_ROLES:
            if assistant:
                raise RecordError(BAD_CONVERSATION, "multi-turn conversations are not supported")
            user.append((text, images))
        elif role in _ASSISTANT_ROLES:
            if not user:
                raise RecordError(BAD_CONVERSATION, "the answer turn comes before the question")
            assistant.append(text)
        elif role != "system":
            raise RecordError(BAD_CONVERSATION, f"turn {index} has an unknown role {role!r}")
    if not user:
        raise RecordError(BAD_CONVERSATION, "no human/user turn holds the question")
    if len(user) > 1 or len(assistant) > 1:
        raise RecordError(BAD_CONVERSATION, "multi-turn conversations are not supported")
    question_text, images = user[0]
    return question_text, images, assistant[0] if assistant else None


def _turn_content(content: object, index: int) -> tuple[str, list[str]]:
    """A turn's text and the images its content parts carry (chat-style content lists)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RecordError(WRONG_TYPE, f"turn {index} has no text content")
    texts, images = [], []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise RecordError(WRONG_TYPE, f"turn {index} has a content part that is not an object")
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            images.append(_image_part_ref(part, index))
        else:
            raise RecordError(WRONG_TYPE, f"turn {index} has a content part of type {kind!r}")
    return "\n".join(texts), images


def _image_part_ref(part: Mapping[str, Any], index: int) -> str:
    ref = part.get("image", part.get("image_url", part.get("url")))
    if isinstance(ref, Mapping):  # OpenAI style {"image_url": {"url": ...}}
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref.strip():
        raise RecordError(BAD_IMAGE_REFERENCE, f"turn {index} has an image part without a path")
    return ref.strip()


def _record_images(fields: dict[str, Any]) -> list[str]:
    present = [key for key in _IMAGE_KEYS if key in fields]
    if len(present) > 1:
        raise RecordError(CONFLICTING_FIELDS, f"images are given twice: {', '.join(present)}")
    if not present:
        return []
    value = fields[present[0]]
    refs = value if isinstance(value, list) else [value]
    return [_image_ref(ref, present[0]) for ref in refs]


def _image_ref(ref: object, key: str) -> str:
    # `datasets` hands image columns over as {"path": ..., "bytes": ...} once decoding is off.
    if isinstance(ref, Mapping):
        path = ref.get("path")
        if not path:
            raise RecordError(
                BAD_IMAGE_REFERENCE,
                f"'{key}' holds embedded image bytes without a file path; not supported",
            )
        ref = path
    if not isinstance(ref, str):
        raise RecordError(WRONG_TYPE, f"'{key}' must be a path or a list of paths")
    if not ref.strip():
        raise RecordError(BAD_IMAGE_REFERENCE, f"'{key}' holds an empty path")
    return ref.strip()


def _merge_images(in_turns: list[str], in_record: list[str]) -> list[str]:
    if in_turns and in_record:
        raise RecordError(CONFLICTING_FIELDS, "images are given both in the turns and the record")
    return in_turns or in_record


# ---------------------------------------------------------------------------------------------
# Question, options, answer


def _question_and_options(text: str, explicit: object) -> tuple[str, dict[str, str]]:
    try:
        question, parsed = split_question_options(text)
        options = options_from_value(explicit) if explicit is not None else parsed
    except OptionParseError as error:
        raise RecordError(BAD_OPTIONS, str(error)) from None
    if not options:
        raise RecordError(NO_OPTIONS, "no lettered option list (A., B., ...) in the question")
    if explicit is not None and parsed and _loose(parsed) != _loose(options):
        raise RecordError(
            CONFLICTING_FIELDS, "the 'options' field disagrees with the options in the question"
        )
    first_with_text: dict[str, str] = {}
    for letter, loose_text in _loose(options).items():
        if loose_text in first_with_text:
            raise RecordError(
                BAD_OPTIONS,
                f"options {first_with_text[loose_text]} and {letter} are both {options[letter]!r}",
            )
        first_with_text[loose_text] = letter
    if not question.strip():
        raise RecordError(EMPTY_QUESTION, "the question text is empty")
    return question, options


def _answer_and_reasoning(
    fields: dict[str, Any], response: str | None, options: dict[str, str]
) -> tuple[str, str | None]:
    reasoning = None
    from_response = None
    if response is not None:
        try:
            reasoning, answer_text = split_response(response)
        except AnswerError as error:
            raise RecordError(BAD_ANSWER, f"the answer turn: {error}") from None
        if not answer_text:
            raise RecordError(NO_ANSWER, "the answer turn holds reasoning but no answer")
        from_response = _resolve(answer_text, options, "the answer turn")

    explicit = fields.get("answer")
    if explicit is None:
        if from_response is None:
            raise RecordError(NO_ANSWER, "no 'answer' field and no answer turn")
        letter = from_response
    else:
        if not isinstance(explicit, str):
            raise RecordError(WRONG_TYPE, f"'answer' is a {type(explicit).__name__}, not text")
        letter = _resolve(explicit, options, "'answer'")
        if from_response is not None and from_response != letter:
            raise RecordError(
                CONFLICTING_FIELDS,
                f"'answer' says {letter} but the answer turn says {from_response}",
            )

    if "reasoning" in fields:
        explicit_reasoning = fields["reasoning"]
        if not isinstance(explicit_reasoning, str):
            raise RecordError(WRONG_TYPE, "'reasoning' must be text")
        reasoning = strip_think_tags(explicit_reasoning) or None
    return letter, reasoning


def _resolve(answer: str, options: dict[str, str], where: str) -> str:
    try:
        return resolve_answer_letter(answer, options)
    except AnswerNotInOptions as error:
        raise RecordError(ANSWER_NOT_IN_OPTIONS, f"{where}: {error}") from None
    except AnswerError as error:
        raise RecordError(BAD_ANSWER, f"{where}: {error}") from None


def _record_id(fields: dict[str, Any], default_id: str) -> str:
    if "id" not in fields:
        return default_id
    value = fields["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise RecordError(WRONG_TYPE, f"'id' must be a non-empty string or an integer: {value!r}")
    return str(value).strip()


def _optional_text(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(WRONG_TYPE, f"'{key}' must be text")
    return value


def _loose(options: dict[str, str]) -> dict[str, str]:
    return {letter: normalize_option_text(text) for letter, text in options.items()}
