"""The records that cross process boundaries: data items, prompts, generated groups, training samples.

Plain dataclasses of Python scalars and lists, so Ray pickles them cheaply and every stage can be
tested without the others. Tensors are built at the edges (the learner), never stored here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class StrChoice(StrEnum):
    """Base of the configuration's choice fields: one of a fixed set of strings.

    Hydra/OmegaConf take such a field by member name and reject anything else at start-up,
    listing the allowed names. Members are str instances equal to their value, so the pure
    functions that take plain strings accept them; str() and f-strings give the value.
    """


# A chat message as HF chat templates take it: {"role": ..., "content": str | list of parts}.
Message = dict[str, Any]


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question about zero or more images."""

    id: str
    question: str
    """The question text without its option lines and without `<image>` placeholders."""
    options: dict[str, str]
    """Option letter -> option text, in the order the question presents them."""
    answer: str
    """The gold option letter; always a key of `options`."""
    images: tuple[str, ...] = ()
    """Absolute image paths, in the order the question refers to them."""
    modality: str | None = None
    """x_ray, ct, mri, oct, ultrasound, fundus, dermoscopy, endoscopy, pathology... when known."""
    reasoning: str | None = None
    """The reference reasoning of an SFT record (without the answer block), else None."""
    source: str | None = None
    """Where the record came from, e.g. "file.jsonl:12" or a dataset name."""

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(self.options)


@dataclass(frozen=True)
class Prompt:
    """What a rollout engine is asked to continue: chat messages plus the images they refer to."""

    id: str
    messages: list[Message]
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    """Log-probability of each sampled token under the sampling policy (same length as token_ids)."""
    finish_reason: str = "stop"
    """"stop" (end-of-turn or EOS sampled) or "length" (max_new_tokens reached)."""


@dataclass
class Group:
    """The n completions of one prompt, and the policy version that produced them."""

    prompt: Prompt
    prompt_ids: list[int]
    completions: list[Completion]
    policy_version: int
    rewards: list[dict[str, float]] = field(default_factory=list)
    """One breakdown per completion, each with at least "total"; filled by the reward stage."""
    dropped: str | None = None
    """Set, with no completions, when the prompt's images could not be read at generation time
    (deleted or corrupted after the load): why, naming the image. The driver counts such groups
    (`prompts_dropped`) and leaves them out of the batch and the evaluation."""


REWARD_FAILED = "reward_failed"
"""The key (1.0) of the breakdown a completion gets when the reward function raised on it,
returned something unusable or did not answer in time: `failed_reward()`, counted in the step's
`reward_failures`."""


REWARD_TIMED_OUT = "reward_timed_out"
"""Also set (1.0) when the completion's batch was cut by reward.timeout_s: a fault of the worker
or of one input, not proof that the function is broken."""


def failed_reward(timed_out: bool = False) -> dict[str, float]:
    """The breakdown of a completion that could not be scored: no reward, marked as failed."""
    return {"total": 0.0, REWARD_FAILED: 1.0, **({REWARD_TIMED_OUT: 1.0} if timed_out else {})}


@dataclass
class TrainSample:
    """One completion as the learner sees it: a policy-gradient (or SFT) target."""

    prompt: Prompt
    prompt_ids: list[int]
    """The ids the rollout generated from; empty (SFT) means "encode the prompt on the learner"."""
    completion_ids: list[int]
    advantage: float = 0.0
    rollout_logprobs: list[float] | None = None
    policy_version: int = 0
