"""Tiny random-initialised models for the fine-tuning tests: no download, built from configs.

- `save_tiny_qwen25_vl(folder, corpus)`: a Qwen2.5-VL-shaped model (text hidden 64, 2 layers;
  vision depth 2, hidden 32) with its processor, saved so that `AutoModelForImageTextToText`
  and `AutoProcessor.from_pretrained(folder)` load it as they load the real one. The tokenizer
  is a byte-level BPE trained on `corpus` (so captions take few tokens) plus Qwen's special
  tokens and a Qwen-style chat template.
- `save_tiny_sam(path)`: a segment-anything `Sam` with a 2-block ViT image encoder at
  `img_size` 256, saved as `path` (state dict) with `sam_config.json` beside it, the layout
  `finetune.model.load_sam` reads for `sam_model_type: custom`.

The shapes follow /work/shared/docs/models-without-weights.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's template, reduced to what the tests use: text and image parts, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY_SAM_SHAPE = {"encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
                  "encoder_global_attn_indexes": [], "image_size": 256, "patch_size": 8,
                  "window_size": 8, "prompt_embed_dim": 64, "decoder_depth": 2,
                  "decoder_mlp_dim": 128, "decoder_num_heads": 4}


def tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE fast tokenizer with Qwen's special tokens, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen25_vl_config(tokenizer, hidden: int = 64, layers: int = 2):
    """A Qwen2.5-VL config small enough for a CPU test, with the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = 16
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                num_key_value_heads=max(1, hidden // head_dim // 2),
                initializer_range=hidden ** -0.5,  # 0.02 caps a frozen head's logits near 0
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=hidden, fullatt_block_indexes=[1], window_size=112,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=False)


def save_tiny_qwen25_vl(folder: Path, corpus: Iterable[str], seed: int = 0,
                        max_pixels: int = 112 * 112) -> Path:
    """Build, randomly initialise and save a tiny Qwen2.5-VL with its processor in `folder`."""
    import torch
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    tokenizer = tiny_tokenizer(corpus)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen25_vl_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_sam(shape: dict | None = None, seed: int = 0):
    """A randomly initialised tiny segment-anything `Sam` (see `TINY_SAM_SHAPE`)."""
    import torch

    from finetune.model import SamShape, build_sam

    torch.manual_seed(seed)
    return build_sam(SamShape(**(shape or TINY_SAM_SHAPE)))


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    """Save a tiny SAM's weights at `path` and its shape as `sam_config.json` beside it."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_tiny_sam(seed=seed).state_dict(), path)
    (path.parent / "sam_config.json").write_text(json.dumps(TINY_SAM_SHAPE, indent=2))
    return path
