"""Special-token helpers shared by the rollout engines and the learner.

Both sides must agree on them: a completion ends at the same stop tokens, and the vision special
tokens that generation never samples are outside the support of the policy the learner scores.
"""

from __future__ import annotations

from typing import Any

VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Never sampled: a generated <|image_pad|> would break the next forward pass on the sequence
("image features and image tokens do not match")."""


def _token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    return None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn and end-of-text ids: a completion ends at whichever comes first."""
    ids = {tokenizer.eos_token_id}
    ids.update(_token_id(tokenizer, token) for token in ("<|im_end|>", "<|endoftext|>"))
    return sorted(i for i in ids if i is not None)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn: <|im_end|>, else the first stop token."""
    token_id = _token_id(tokenizer, "<|im_end|>")
    return token_id if token_id is not None else stop_token_ids(tokenizer)[0]


def vision_tokens(tokenizer: Any) -> list[str]:
    """The vision special tokens this tokenizer has."""
    vocab = tokenizer.get_vocab()
    return [t for t in VISION_SPECIAL_TOKENS if t in vocab]


def vision_token_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in vision_tokens(tokenizer)]
