"""Medical multiple-choice questions: loading, validation and prompts.

    items = load_mcq_jsonl("reasoning_mcq_rl.jsonl")            # list[MCQItem], DataError if bad
    items, report = load_mcq_jsonl_with_report(path, on_error="skip")
    prompt = build_prompt(items[0])                              # Qwen-VL chat messages

Module map (data flows top to bottom):
    options.py   question text -> (question, {letter: option text})
    answers.py   gold answer / reference response -> (letter, reasoning)
    modality.py  record value, image paths, question -> modality label
    records.py   one record (three formats) -> MCQItem, or RecordError with a reason
    loader.py    JSONL files and `datasets` -> validated MCQItems, DataError, LoadReport
    prompts.py   MCQItem -> chat messages / Prompt / SFT target

Pure Python: importing this package imports neither torch, Ray, vLLM, DeepSpeed nor `datasets`
(`load_mcq_dataset` imports `datasets` when called). Synthetic data lives in
`gmai_rl.data.synthetic`, imported on its own.
"""

from gmai_rl.data.admission import DataError, LoadReport
from gmai_rl.data.loader import (
    load_mcq_dataset,
    load_mcq_dataset_with_report,
    load_mcq_jsonl,
    load_mcq_jsonl_with_report,
)
from gmai_rl.data.modality import infer_modality
from gmai_rl.data.options import split_question_options
from gmai_rl.data.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    build_prompt,
    format_question,
    sft_target,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DataError",
    "LoadReport",
    "build_messages",
    "build_prompt",
    "format_question",
    "infer_modality",
    "load_mcq_dataset",
    "load_mcq_dataset_with_report",
    "load_mcq_jsonl",
    "load_mcq_jsonl_with_report",
    "sft_target",
    "split_question_options",
]
