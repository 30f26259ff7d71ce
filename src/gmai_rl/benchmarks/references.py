"""Published numbers to read our results beside: other harnesses' scores of a known model, with
where each was published. They are NOT comparable one to one (other prompts, answer parsing,
often an LLM judge, sometimes another split); the report labels them as such."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    model: str
    accuracy: float
    """Percent, as published."""
    harness: str
    source: str


_LINGSHU = "Lingshu (arXiv 2506.07044), Table: multimodal medical VQA, evaluated with MedEvalKit"
_GMAI_VL = "GMAI-VL's README (github.com/uni-medical/GMAI-VL)"

REFERENCES: dict[str, tuple[Reference, ...]] = {
    "mmmu-med": (
        Reference("Qwen2.5-VL-7B", 50.6, "MedEvalKit", _LINGSHU),
        Reference("GMAI-VL", 51.3, "its authors'", _GMAI_VL),
    ),
    "vqa-rad": (
        Reference("Qwen2.5-VL-7B", 64.5, "MedEvalKit", _LINGSHU),
        Reference("GMAI-VL", 66.3, "its authors'", _GMAI_VL),
    ),
    "slake": (Reference("Qwen2.5-VL-7B", 67.2, "MedEvalKit", _LINGSHU),),
    "path-vqa": (Reference("Qwen2.5-VL-7B", 44.1, "MedEvalKit", _LINGSHU),),
    "pmc-vqa": (Reference("Qwen2.5-VL-7B", 51.9, "MedEvalKit", _LINGSHU),),
    "omnimedvqa": (
        Reference("Qwen2.5-VL-7B", 63.6, "MedEvalKit", _LINGSHU),
        Reference("GMAI-VL", 88.48, "its authors'", _GMAI_VL),
    ),
    "gmai-mmbench": (Reference("GMAI-VL", 62.43, "its authors'", _GMAI_VL),),
}
"""Benchmark -> published scores. Copied from the issue that asked for this table (which cites
the sources named); not re-checked against the papers here."""
