"""Tiny random-initialised Qwen2.5-VL models and processors, saved to a folder, for tests.

No hub download: the tokenizer is a byte-level BPE trained here on the pipeline's own prompt
texts with Qwen's special tokens, the image processor keeps images small (224 x 224 pixels at
most) and the model is built from a config with random weights. `save_tiny_qwen25_vl(folder)`
writes a model folder that `from_pretrained` (and so the transformers backend) loads like a real
one. Needs torch and torchvision (Qwen's processor needs a video processor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import prompts
from pipeline.geometry.categories import ISAID_PALETTE, plural, readable

# Qwen2.5-VL's special tokens, in Qwen's order (ids follow from it here, not Qwen's values).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template (the default system turn, images before text).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right"]

# The tiny shape of models-without-weights.md: text hidden 64, 2 layers, 4 heads (head_dim 16,
# mrope sections summing to 8), vision depth 2, hidden 32.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                   out_hidden_size=64, fullatt_block_indexes=[1], window_size=112, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
TINY_MAX_PIXELS = 224 * 224


def prompt_texts() -> list[str]:
    """Every v1 prompt the plan stage can write (all categories, positions, marks), plus the
    chat template's own words: the tokenizer's training text."""
    texts = ["You are a helpful assistant.", "system user assistant",
             prompts.render("holistic", "v1")]
    for category in ISAID_PALETTE:
        for pos in POSITIONS:
            texts.append(prompts.render("instance", "v1", category_name=readable(category),
                                        pos=pos, mark_number=len(texts) % 10 + 1))
            texts.append(prompts.render("cluster", "v1", cluster_info="several",
                                        category_name=plural(category), pos=pos))
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE (`PreTrainedTokenizerFast`) trained on `texts`, with Qwen's special
    tokens; any string stays encodable (the 256 byte symbols are in the alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=
                                   [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>",
                                                                           "<|endoftext|>")])


def qwen25_vl_processor(tokenizer, max_pixels: int = TINY_MAX_PIXELS):
    """Qwen2.5-VL's processor around `tokenizer`, images at most `max_pixels`."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(max_pixels=max_pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=CHAT_TEMPLATE)


def qwen25_vl_config(tokenizer, text: dict | None = None, vision: dict | None = None,
                     vocab_size: int | None = None):
    """A Qwen2.5-VL config of the given text and vision shapes (tiny by default) whose special
    token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(TINY_TEXT if text is None else text,
                       vocab_size=vocab_size or len(tokenizer),
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=text_config,
                            vision_config=dict(TINY_VISION if vision is None else vision),
                            image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=False)


def random_qwen25_vl(config, seed: int = 0, dtype=None, device: str = "cpu",
                     end_token_like: int | None = None):
    """A Qwen2.5-VL model with random weights (seeded), in eval mode, with the generation
    config's end and pad tokens set from the config. With `end_token_like` (a token id) the
    end token's output row becomes 1.25 times that token's, so that random answers end where
    they would have said it: at varied lengths instead of (almost) never."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)  # built in its dtype: no float32 copy of a 7B
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    text = config.text_config
    if end_token_like is not None:
        with torch.no_grad():
            model.lm_head.weight[text.eos_token_id] = 1.25 * model.lm_head.weight[end_token_like]
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = text.bos_token_id
    return model.eval()


def answer_always(model, tokenizer, answer: str, after: str = "\n") -> None:
    """Rewire `model` (in place) into a bigram machine that answers every prompt ending in
    `after` with `answer`, then the end token: every layer's output projections are zeroed
    (the last hidden state is the last token's embedding) and each answer token's output row
    is made to point at the embedding of the token before it. The answer's tokens must be
    distinct, so that each has one successor."""
    import torch

    chain = ([tokenizer.convert_tokens_to_ids(tokenizer.tokenize(after)[-1])]
             + tokenizer(answer, add_special_tokens=False)["input_ids"]
             + [model.config.text_config.eos_token_id])
    if len(set(chain)) != len(chain):
        raise ValueError(f"answer {answer!r} repeats a token; a bigram cannot say it")
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = text.embed_tokens.weight
        for before, token in zip(chain, chain[1:]):
            model.lm_head.weight[token] = 10.0 * embed[before] / embed[before].norm()


def save_tiny_qwen25_vl(folder: str | Path, seed: int = 0, max_pixels: int = TINY_MAX_PIXELS,
                        end_token_like: str | None = None, answer: str | None = None) -> Path:
    """Write a tiny random Qwen2.5-VL model and its processor to `folder`; returns it.
    `end_token_like` (a token of the tokenizer) makes answers end where they would say it;
    `answer` makes the model answer every prompt with that text (`answer_always`)."""
    folder = Path(folder)
    tokenizer = train_tokenizer(prompt_texts())
    processor = qwen25_vl_processor(tokenizer, max_pixels)
    like = None if end_token_like is None else tokenizer.convert_tokens_to_ids(end_token_like)
    model = random_qwen25_vl(qwen25_vl_config(tokenizer), seed, end_token_like=like)
    if answer is not None:
        answer_always(model, tokenizer, answer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
