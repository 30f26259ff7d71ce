"""The plan's activation estimate against what autograd keeps: the saved tensors of transformers'
own Qwen2.5-VL text decoder in bf16, counted by storage, with and without gradient
checkpointing, at two shapes (so a coefficient that is off shows at one of them)."""

from __future__ import annotations

import pytest
import torch

from gmai_rl.plan.memory import DecoderShape, activations, layer_activations

SHAPES = [
    DecoderShape(hidden=256, intermediate=1408, layers=3, heads=4, kv_dim=128, vocab=512),
    DecoderShape(hidden=384, intermediate=768, layers=2, heads=6, kv_dim=384, vocab=512),
]


def saved_bytes(shape: DecoderShape, tokens: int, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward of the text model
    (parameters excluded), at the start of backward."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    head_dim = shape.hidden // shape.heads
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": shape.vocab,
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_dim // head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16],
            },
        },
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 32},
        attn_implementation="sdpa",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, shape.vocab, (2, tokens // 2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["whole", "checkpointed"])
@pytest.mark.parametrize("shape", SHAPES, ids=["gqa-wide-mlp", "mha-narrow-mlp"])
def test_the_estimate_is_within_10_percent_of_what_autograd_keeps(shape, checkpointing):
    tokens = 512
    estimate = activations(shape, tokens, weight_bytes=2, checkpointing=checkpointing)
    if checkpointing:
        # Forward keeps each layer's input; the one layer rebuilt at a time in backward (the
        # whole-model case checks its size) is not saved in forward.
        estimate -= tokens * layer_activations(shape, weight_bytes=2)
    assert estimate == pytest.approx(saved_bytes(shape, tokens, checkpointing), rel=0.10)
