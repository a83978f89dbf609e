"""A tiny random-initialised SAM, shaped like segment-anything's own builders.

No weights can be downloaded here, so tests (and `bench/sam_box_prompts.py --small`) build this
model, save its state_dict as a checkpoint file and load it back through
`pipeline.sources.sam_masks.load_sam`, the path a real vit_h checkpoint takes. 256 px input, ViT of
depth 2 and width 64, prompt embedding 32: `SamPredictor` and `SamAutomaticMaskGenerator` run
on an 800x800 tile well under a second on one CPU thread.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

MODEL_TYPE = "tiny"
IMAGE_SIZE = 256
PATCH_SIZE = 16
PROMPT_DIM = 32


def build_tiny_sam(checkpoint: str | None = None) -> Sam:
    """Same signature as `segment_anything.sam_model_registry[...]`."""
    grid = IMAGE_SIZE // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, depth=2, embed_dim=64, num_heads=2,
            mlp_ratio=2.0, out_chans=PROMPT_DIM, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            global_attn_indexes=(1,), window_size=4),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_DIM, image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=PROMPT_DIM, mlp_dim=64,
                                          num_heads=2),
            transformer_dim=PROMPT_DIM, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            sam.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return sam


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Build a tiny SAM with a fixed seed and save its state_dict at `path`."""
    torch.manual_seed(seed)
    torch.save(build_tiny_sam().state_dict(), path)
    return path
