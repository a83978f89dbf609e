"""GeoPixel-style pixel-grounding model: a multimodal LM that writes [SEG], and a SAM that masks it.

As GeoPixel (and LISA before it): a `[SEG]` token is added to the tokenizer; the language
model's last hidden state at each [SEG] goes through `Linear(h, h) -> ReLU -> Linear(h, 256)`
and enters segment-anything's mask decoder as a sparse prompt embedding; the decoder's mask is
upsampled to the tile. Trained: LoRA on the language model's attention projections, the
projection, the mask decoder, and the [SEG] rows of the input embedding and the LM head. Frozen:
everything else, the SAM image encoder included (it runs under `no_grad`).

Loss = ce_weight * CE (next-token, answer tokens only)
     + bce_weight * BCE + dice_weight * Dice (per [SEG] mask at tile size, mean over masks),
GeoPixel's 1.0 / 2.0 / 0.5.

The language model is any `AutoModelForImageTextToText` whose forward returns hidden states
(Qwen2.5-VL by default). SAM shapes: the registry's vit_h / vit_l / vit_b, or `custom`, read
from `sam_config.json` beside the weights (`SamShape` fields) for SAM-family variants and tests.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import BadParamsError
from pipeline.core.user_files import read_user_json
from schemas import SEG

SAM_CONFIG_NAME = "sam_config.json"
IGNORE_INDEX = -100
VISION_MODULE_RE = r"(?:visual|vision)"


# ---------------------------------------------------------------------------------------------
# SAM


@dataclass(frozen=True)
class SamShape:
    """The architecture of a segment-anything model (`segment_anything.build_sam` as fields)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8


SAM_SHAPES = {
    "vit_h": SamShape(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamShape(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamShape(768, 12, 12, (2, 5, 8, 11)),
}


def build_sam(shape: SamShape):
    """A randomly initialised `segment_anything.modeling.Sam` of `shape` (as its registry does)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = shape.image_size // shape.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=shape.encoder_depth, embed_dim=shape.encoder_embed_dim,
            img_size=shape.image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=shape.encoder_num_heads,
            patch_size=shape.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(shape.encoder_global_attn_indexes),
            window_size=shape.window_size, out_chans=shape.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=shape.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(shape.image_size, shape.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=shape.decoder_depth,
                                          embedding_dim=shape.prompt_embed_dim,
                                          mlp_dim=shape.decoder_mlp_dim,
                                          num_heads=shape.decoder_num_heads),
            transformer_dim=shape.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def sam_shape(model_type: str, checkpoint_path: str | Path | None) -> SamShape:
    """The shape of a registry model type, or of `custom` (sam_config.json beside the weights)."""
    if model_type in SAM_SHAPES:
        return SAM_SHAPES[model_type]
    if model_type != "custom":
        raise BadParamsError(f"finetune.sam_model_type {model_type!r} is not one of "
                             f"{sorted(SAM_SHAPES) + ['custom']}")
    if not checkpoint_path:
        raise BadParamsError("finetune.sam_model_type custom needs sam_checkpoint_path")
    config = Path(checkpoint_path).parent / SAM_CONFIG_NAME
    try:
        raw = read_user_json(config, SAM_CONFIG_NAME, error=BadParamsError)
        return SamShape(**{**raw, "encoder_global_attn_indexes":
                           tuple(raw["encoder_global_attn_indexes"])})
    except (TypeError, KeyError) as err:
        raise BadParamsError(f"cannot read a SAM shape ({type(err).__name__}: {err})",
                             config) from None


def load_sam(model_type: str, checkpoint_path: str | Path | None):
    """A SAM of `model_type` with the weights at `checkpoint_path` (random if None)."""
    sam = build_sam(sam_shape(model_type, checkpoint_path))
    if checkpoint_path:
        path = Path(checkpoint_path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise BadParamsError(f"cannot read SAM weights ({type(err).__name__})", path) from None
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise BadParamsError(f"SAM weights do not fit sam_model_type {model_type!r}: "
                                 f"{first}", path) from None
    return sam


# ---------------------------------------------------------------------------------------------
# The [SEG] rows: trainable rows over a frozen embedding and LM head


class AddedTokenEmbedding(nn.Module):
    """The LM's input embedding with its own trainable rows for the added tokens ([SEG]).

    The frozen matrix stays as it is; only the added rows train (and are saved), so a 7B
    model's 150k-row embedding gets no gradient and no optimizer state.
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int], rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.token_ids = [int(t) for t in token_ids]
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:  # code that reads `get_input_embeddings().weight`
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)
        for k, token_id in enumerate(self.token_ids):
            embeds = torch.where((input_ids == token_id).unsqueeze(-1),
                                 self.rows[k].to(embeds.dtype), embeds)
        return embeds


class AddedTokenHead(nn.Module):
    """The LM head with its own trainable output rows for the added tokens ([SEG])."""

    def __init__(self, base: nn.Linear, token_ids: Sequence[int], rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.token_ids = [int(t) for t in token_ids]
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        added = hidden @ self.rows.to(hidden.dtype).T
        if self.base.bias is not None:
            added = added + self.base.bias[self.token_ids].to(added.dtype)
        index = torch.tensor(self.token_ids, device=logits.device)
        return logits.index_copy(-1, index, added.to(logits.dtype))


def add_seg_token(model: nn.Module, tokenizer: Any, seg_token: str) -> int:
    """Add `seg_token` to the tokenizer and give the model trainable rows for it; its id.

    The embedding is resized only when the tokenizer outgrows it (Qwen's has spare rows).
    New rows start at the mean of the existing ones, as `resize_token_embeddings` does.
    """
    tokenizer.add_tokens([seg_token], special_tokens=True)
    seg_id = tokenizer.convert_tokens_to_ids(seg_token)
    embedding = model.get_input_embeddings()
    if seg_id >= embedding.num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    with torch.no_grad():
        in_rows = nn.Parameter(embedding.weight.mean(0, keepdim=True, dtype=torch.float32))
        out_rows = (in_rows if tied or head is None else
                    nn.Parameter(head.weight.mean(0, keepdim=True, dtype=torch.float32)))
    model.set_input_embeddings(AddedTokenEmbedding(embedding, [seg_id], in_rows))
    if head is not None:
        model.set_output_embeddings(AddedTokenHead(head, [seg_id], out_rows))
    return seg_id


def lora_target_regex(modules: Sequence[str]) -> str:
    """A peft `target_modules` regex: the named projections, outside any vision tower."""
    names = "|".join(re.escape(m) for m in modules)
    return rf"^(?!.*{VISION_MODULE_RE}).*\.(?:{names})$"


# ---------------------------------------------------------------------------------------------
# Losses (LISA's `sigmoid_ce_loss` and `dice_loss`, per mask, then averaged over masks)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean binary cross-entropy of mask logits (n, H, W) against 0/1 targets."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)


def mask_dice(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0,
              eps: float = 1e-6) -> torch.Tensor:
    """Per-mask Dice loss, LISA's form (`scale` keeps the sums of large masks small)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0
             ) -> torch.Tensor:
    """Per-mask IoU of `logits > threshold` with the targets (an empty union counts as 1)."""
    pred = (logits > threshold).flatten(1)
    gt = targets.flatten(1) > 0.5
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class LossWeights(NamedTuple):
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


class StepOutput(NamedTuple):
    """A forward pass: weighted total, its unweighted parts, and the masks it predicted."""

    total: torch.Tensor
    ce: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    mask_iou: torch.Tensor
    masks: int
    mask_logits: list[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelSpec:
    """What it takes to rebuild a GeoPixel model before loading its trained weights."""

    base_model_path: str
    sam_model_type: str
    sam_checkpoint_path: str
    seg_token: str = SEG
    question: str = ""
    max_answer_tokens: int = 1536
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj",
                                                                     "v_proj", "o_proj"])

    def to_json(self) -> dict:
        return asdict(self)


class GeoPixelModel(nn.Module):
    """LM with LoRA + [SEG] projection + SAM. `forward(batch)` gives the training loss."""

    def __init__(self, lm: nn.Module, sam: nn.Module, seg_token_id: int, hidden_size: int,
                 weights: LossWeights = LossWeights()):
        super().__init__()
        self.lm = lm
        self.sam = sam
        self.seg_token_id = seg_token_id
        self.weights = weights
        prompt_dim = sam.prompt_encoder.embed_dim
        self.seg_projection = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                            nn.Linear(hidden_size, prompt_dim))
        for p in self.sam.parameters():
            p.requires_grad_(False)
        for p in self.sam.mask_decoder.parameters():
            p.requires_grad_(True)

    # -- SAM side -------------------------------------------------------------------------

    @property
    def sam_image_size(self) -> int:
        return self.sam.image_encoder.img_size

    def encode_images(self, sam_images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Frozen SAM image embeddings of resized tiles (each 3 x h x w, 0..255, long side =
        SAM's img_size); normalised and padded as SAM does."""
        with torch.no_grad():
            batch = torch.cat([self.sam.preprocess(img.unsqueeze(0).float())
                               for img in sam_images])
            dtype = self.sam.image_encoder.patch_embed.proj.weight.dtype
            return self.sam.image_encoder(batch.to(dtype)).float()

    def decode_masks(self, image_embedding: torch.Tensor, prompts: torch.Tensor,
                     resized_size: tuple[int, int], tile_size: tuple[int, int]) -> torch.Tensor:
        """Mask logits (n, H, W) at tile size for n prompt embeddings (n, 256) on one image."""
        n = prompts.shape[0]
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse.expand(n, -1, -1), prompts.unsqueeze(1).to(sparse.dtype)],
                           dim=1)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embedding.unsqueeze(0),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.expand(n, -1, -1, -1),
            multimask_output=False)
        masks = self.sam.postprocess_masks(low_res.float(), tuple(resized_size),
                                           tuple(tile_size))
        return masks[:, 0]

    # -- LM side --------------------------------------------------------------------------

    def lm_outputs(self, vlm_inputs: dict[str, torch.Tensor]) -> Any:
        return self.lm(**vlm_inputs, output_hidden_states=True, use_cache=False)

    def seg_masks(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                  image_embeddings: torch.Tensor, resized_sizes: Sequence[tuple[int, int]],
                  tile_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Mask logits per sample, one per [SEG] of its `input_ids`, in [SEG] order."""
        found = input_ids == self.seg_token_id
        prompts = self.seg_projection(hidden[found].float())
        counts = found.sum(1).tolist()
        out, start = [], 0
        for i, count in enumerate(counts):
            h, w = tile_sizes[i]
            if count == 0:
                out.append(torch.zeros((0, h, w), device=hidden.device))
                continue
            out.append(self.decode_masks(image_embeddings[i], prompts[start:start + count],
                                         resized_sizes[i], (h, w)))
            start += count
        return out

    def forward(self, batch: dict[str, Any]) -> StepOutput:
        """Loss of one collated batch (`finetune.data.Collator`)."""
        vlm_inputs = batch["vlm_inputs"]
        outputs = self.lm_outputs(vlm_inputs)
        labels = batch["labels"][:, 1:]
        answer = labels != IGNORE_INDEX  # float32 logits of the answer tokens only
        ce = F.cross_entropy(outputs.logits[:, :-1][answer].float(), labels[answer])
        image_embeddings = self.encode_images(batch["sam_images"])
        mask_logits = self.seg_masks(vlm_inputs["input_ids"], outputs.hidden_states[-1],
                                     image_embeddings, batch["resized_sizes"],
                                     batch["tile_sizes"])
        bce_parts, dice_parts, iou_parts = [], [], []
        for pred, target in zip(mask_logits, batch["masks"]):
            if target.shape[0] != pred.shape[0]:
                raise ValueError(f"{pred.shape[0]} [SEG] tokens but {target.shape[0]} masks")
            if pred.shape[0]:
                target = target.to(pred.device, torch.float32)
                bce_parts.append(mask_bce(pred, target))
                dice_parts.append(mask_dice(pred, target))
                with torch.no_grad():
                    iou_parts.append(mask_iou(pred, target))
        zero = ce.new_zeros(())
        masks = sum(int(p.shape[0]) for p in bce_parts)
        bce = torch.cat(bce_parts).mean() if masks else zero
        dice = torch.cat(dice_parts).mean() if masks else zero
        iou = torch.cat(iou_parts).mean() if masks else zero
        w = self.weights
        total = w.ce * ce + w.bce * bce + w.dice * dice
        return StepOutput(total, ce.detach(), bce.detach(), dice.detach(), iou, masks,
                          [m.detach() for m in mask_logits])

    # -- what trains, what is saved -------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name: LoRA, [SEG] rows, projection, mask decoder."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], where: Path | None = None
                             ) -> None:
        """Load `trainable_state()` output; every trained tensor must be present and fit."""
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - set(own))
        if missing or unknown:
            raise BadParamsError(f"checkpoint does not fit the model: missing {missing[:3]}, "
                                 f"unknown {unknown[:3]}", where)
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise BadParamsError(f"checkpoint tensor {name} is {tuple(tensor.shape)}, "
                                         f"the model's is {tuple(own[name].shape)}", where)
                own[name].copy_(tensor.to(own[name].dtype))


def resolve_device(device: str) -> torch.device:
    """`auto` = the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadParamsError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_language_model(path: str, dtype: torch.dtype):
    """`AutoModelForImageTextToText` and `AutoProcessor` from `path` (a folder or a hub id)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
        lm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadParamsError(f"cannot load a multimodal LM: {first}", path) from None
    return lm, processor


def build_geopixel_model(spec: ModelSpec, lm: nn.Module, processor: Any, sam: nn.Module,
                         weights: LossWeights = LossWeights(),
                         gradient_checkpointing: bool = False) -> GeoPixelModel:
    """Wrap a loaded LM (+ processor) and SAM: [SEG] token, LoRA, projection, frozen parts."""
    from peft import LoraConfig, get_peft_model

    tokenizer = processor.tokenizer
    seg_id = add_seg_token(lm, tokenizer, spec.seg_token)
    hidden_size = lm.config.get_text_config().hidden_size
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=lora_target_regex(spec.lora_target_modules), bias="none")
    peft_lm = get_peft_model(lm, lora)
    for module in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        if isinstance(module, (AddedTokenEmbedding, AddedTokenHead)):
            module.rows.requires_grad_(True)
    return GeoPixelModel(peft_lm, sam, seg_id, hidden_size, weights)


def spec_from_params(finetune: Any) -> ModelSpec:
    """The `ModelSpec` of a `FinetuneParams` section."""
    return ModelSpec(base_model_path=finetune.base_model_path,
                     sam_model_type=finetune.sam_model_type,
                     sam_checkpoint_path=finetune.sam_checkpoint_path,
                     seg_token=finetune.seg_token, question=finetune.question,
                     max_answer_tokens=finetune.max_answer_tokens, lora_r=finetune.lora_r,
                     lora_alpha=finetune.lora_alpha, lora_dropout=finetune.lora_dropout,
                     lora_target_modules=list(finetune.lora_target_modules))


def load_geopixel_model(spec: ModelSpec, device: torch.device, bf16: bool,
                        weights: LossWeights = LossWeights(),
                        gradient_checkpointing: bool = False,
                        processor_path: str | Path | None = None) -> tuple[GeoPixelModel, Any]:
    """Load the LM and SAM named by `spec` and build the model on `device`; (model, processor).

    bf16 (CUDA only): the frozen weights are bfloat16; trained tensors stay float32.
    `processor_path`: a saved processor (a checkpoint's, [SEG] included) instead of the base's.
    """
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    lm, processor = load_language_model(spec.base_model_path, dtype)
    if processor_path is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(processor_path))
    sam = load_sam(spec.sam_model_type, spec.sam_checkpoint_path or None)
    model = build_geopixel_model(spec, lm, processor, sam, weights,
                                 gradient_checkpointing and device.type == "cuda")
    model.sam.image_encoder.to(dtype)
    model.to(device)
    return model, processor
