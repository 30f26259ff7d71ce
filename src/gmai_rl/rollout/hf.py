"""The HF transformers rollout engine: batched `generate` for CPU runs and small GPU jobs.

All prompts of a call go through one `generate` with `num_return_sequences=n`. Log-probs are those
of the sampling distribution (logits after temperature and top-p), taken from the processed scores
with `compute_transition_scores`. Generation stops at the end-of-turn token; vision special tokens
are suppressed (gmai_rl.models.tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from gmai_rl.models.inputs import encode_prompts
from gmai_rl.models.loading import ModelOptions, load_model, load_processor, tokenizer_of
from gmai_rl.models.tokens import stop_token_ids, vision_token_ids
from gmai_rl.types import Completion, Group, Prompt, SamplingParams


def split_completion(token_ids: list[int], stop_ids: Sequence[int]) -> tuple[list[int], str]:
    """Cut a generated row at its first stop token (kept) and say why it ended."""
    for i, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: i + 1], "stop"
    return token_ids, "length"


class HFEngine:
    """A policy in HF transformers, generating on one device."""

    def __init__(self, options: ModelOptions, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.processor = load_processor(options)
        self.tokenizer = tokenizer_of(self.processor)
        self.model = load_model(options).to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.suppressed = vision_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_ids[0]
        self.policy_version = 0

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams) -> list[Group]:
        if not prompts:
            return []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        enc = encode_prompts(self.processor, prompts, padding_side="left").to(self.device)
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            **enc,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.suppressed or None,
            return_dict_in_generate=True,
            output_scores=True,
        )
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:].tolist()
        # Log-probs of the sampled tokens under the processed (temperature, top-p) distribution.
        logprobs = self.model.compute_transition_scores(
            out.sequences, out.scores, normalize_logits=True
        ).tolist()

        groups = []
        for i, prompt in enumerate(prompts):
            prompt_ids = _unpad_left(enc["input_ids"][i], enc["attention_mask"][i])
            completions = []
            for row in range(i * n, (i + 1) * n):
                ids, reason = split_completion(new_tokens[row], self.stop_ids)
                completions.append(
                    Completion(
                        token_ids=ids,
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        logprobs=logprobs[row][: len(ids)],
                        finish_reason=reason,
                    )
                )
            groups.append(Group(prompt, prompt_ids, completions, self.policy_version))
        return groups

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        params = dict(self.model.named_parameters())
        loaded = 0
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"weight {name!r} is not a parameter of {type(self.model).__name__}")
            params[name].copy_(tensor)
            loaded += 1
        return loaded

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        return ((name, p.detach()) for name, p in self.model.named_parameters())


def _unpad_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    return input_ids[attention_mask.bool()].tolist()
