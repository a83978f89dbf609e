"""Segment-anything masks for new imagery (the `[sam]` extra).

- `sam`: SAM's automatic mask generator on each tile (thresholds from `params.sam`), then the
  masks are filtered: too small, too large (background), or mostly under a better mask
  already kept (best predicted IoU first), and cut to the tile's valid (not nodata) pixels.
- `dota DIR`: every box reaching a tile prompts SAM with its axis-aligned box. The tile is
  encoded ONCE (`SamPredictor.set_image`) and its boxes are decoded in batches of
  `sam.box_batch` through `predict_torch`, as segment-anything intends: the image encoder is
  the expensive part, the prompt decoder is cheap (bench/sam_box_prompts.py measures it).
  A mask is cut to its oriented box (`sam.clip_to_box`); a box whose mask comes out empty keeps
  its polygon or is dropped (`sam.empty_box_fallback`), counted either way.

Models are built by the builders of `segment_anything.sam_model_registry` (others can be added
with `register_model`, e.g. a tiny one in tests) and the checkpoint is loaded here, on the CPU
first (`torch.load(..., map_location="cpu", weights_only=True)`), once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pipeline.core.errors import BadParamsError
from pipeline.core.params import DEFAULT_PARAMS, SamParams

SAM_EXTRA = "pip install 'geopixeld[sam]'"

_BUILDERS: dict[str, Callable] = {}
_MODELS: dict[tuple, "LoadedSam"] = {}
_MODELS_LOCK = threading.Lock()

__all__ = ["LoadedSam", "automatic_masks", "box_masks", "boxes_in_tile", "check_checkpoint",
           "filter_masks", "load_sam", "model_types", "register_model", "resolve_device"]


def _segment_anything():
    try:
        import segment_anything
    except ImportError:
        raise BadParamsError(f"SAM masks need segment-anything and torch: {SAM_EXTRA}") from None
    return segment_anything


def register_model(name: str, builder: Callable) -> None:
    """Add a model type: `builder(checkpoint=None)` returns an untrained `Sam`."""
    _BUILDERS[name] = builder


def model_types() -> dict[str, Callable]:
    """Every known model type -> its builder (segment-anything's, then registered ones)."""
    sa = _segment_anything()
    return {**{k: v for k, v in sa.sam_model_registry.items() if k != "default"}, **_BUILDERS}


def resolve_device(device: str, source: str = DEFAULT_PARAMS) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadParamsError(f"sam.device: {device!r} but no CUDA device is available", source)
    return device


def check_checkpoint(params: SamParams) -> Path:
    """The checkpoint path, or one clear BadParamsError naming the missing path."""
    if not params.checkpoint:
        raise BadParamsError("sam.checkpoint: SAM masks need a checkpoint file (e.g. "
                             "sam_vit_h_4b8939.pth from the segment-anything release)",
                             params.where("checkpoint"))
    path = Path(params.checkpoint).expanduser()
    if not path.is_file():
        raise BadParamsError("sam.checkpoint: file not found", path)
    return path


@dataclass
class LoadedSam:
    """A SAM model on its device, and a lock so that threads take turns on it."""

    model: object
    device: str
    lock: threading.Lock


def load_sam(params: SamParams) -> LoadedSam:
    """Build `sam.model_type` and load `sam.checkpoint` into it (once per process)."""
    import torch

    path = check_checkpoint(params)
    builders = model_types()
    if params.model_type not in builders:
        raise BadParamsError(f"sam.model_type: {params.model_type!r} is not one of "
                             f"{sorted(builders)}", params.where("model_type"))
    device = resolve_device(params.device, params.where("device"))
    key = (params.model_type, str(path.resolve()), path.stat().st_mtime_ns, device)
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        model = builders[params.model_type](checkpoint=None)
        try:
            with open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # pickle, zip, key and shape errors all mean: wrong file
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise BadParamsError(f"sam.checkpoint: not a {params.model_type} SAM checkpoint "
                                 f"({text[:300]})", path) from None
        model.to(device).eval()
        loaded = LoadedSam(model=model, device=device, lock=threading.Lock())
        _MODELS[key] = loaded
        return loaded


# ---- automatic masks --------------------------------------------------------------------------

def filter_masks(candidates: Sequence[np.ndarray], scores: Sequence[float],
                 valid: Optional[np.ndarray], params: SamParams) -> tuple[list[int], dict]:
    """Indices of the candidate masks kept, best score first, and the drop counts.

    A mask is cut to the valid pixels, then dropped if smaller than `min_area`, larger than
    `max_area_share` of the tile, or with more than `max_overlap` of its area under the masks
    kept before it; at most `max_objects_per_tile` are kept."""
    dropped = {"small": 0, "large": 0, "overlap": 0, "over_limit": 0}
    if not len(candidates):
        return [], dropped
    height, width = candidates[0].shape
    covered = np.zeros((height, width), bool)
    kept: list[int] = []
    for i in sorted(range(len(candidates)), key=lambda k: (-float(scores[k]), k)):
        mask = candidates[i].astype(bool)
        if valid is not None:
            mask = mask & valid
        area = int(mask.sum())
        if area < max(params.min_area, 1):
            dropped["small"] += 1
            continue
        if area > params.max_area_share * height * width:
            dropped["large"] += 1
            continue
        if np.count_nonzero(mask & covered) > params.max_overlap * area:
            dropped["overlap"] += 1
            continue
        if len(kept) >= params.max_objects_per_tile:
            dropped["over_limit"] += 1
            continue
        kept.append(i)
        covered |= mask
    return kept, dropped


def automatic_masks(sam: LoadedSam, rgb: np.ndarray, valid: Optional[np.ndarray],
                    params: SamParams) -> tuple[list[np.ndarray], dict]:
    """SAM's automatic masks of one tile after `filter_masks`: (masks, counts)."""
    sa = _segment_anything()
    generator = sa.SamAutomaticMaskGenerator(
        sam.model, points_per_side=params.points_per_side,
        points_per_batch=params.points_per_batch, pred_iou_thresh=params.pred_iou_thresh,
        stability_score_thresh=params.stability_score_thresh,
        box_nms_thresh=params.box_nms_thresh, crop_n_layers=params.crop_n_layers,
        min_mask_region_area=params.min_mask_region_area, output_mode="binary_mask")
    with sam.lock:
        found = generator.generate(np.ascontiguousarray(rgb))
    candidates = [f["segmentation"] for f in found]
    kept, dropped = filter_masks(candidates, [f["predicted_iou"] for f in found], valid, params)
    masks = [candidates[i].astype(np.uint8) & (valid if valid is not None else 1) for i in kept]
    return masks, {"candidates": len(found), **{f"dropped_{k}": v for k, v in dropped.items()}}


# ---- box prompts ------------------------------------------------------------------------------

def boxes_in_tile(bounds: Sequence[tuple[float, float, float, float]], x0: int, y0: int,
                  height: int, width: int) -> np.ndarray:
    """Scene-pixel boxes (x0, y0, x1, y1) in a tile's frame, clipped to it: (N, 4) float32."""
    b = np.asarray(bounds, np.float32).reshape(-1, 4) - np.float32([x0, y0, x0, y0])
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    return b


def box_masks(sam: LoadedSam, rgb: np.ndarray, boxes: np.ndarray, batch: int,
              multimask: bool = False) -> np.ndarray:
    """(N, H, W) bool masks for N XYXY boxes (tile pixels): the tile is encoded once and the
    boxes are decoded `batch` at a time."""
    import torch

    sa = _segment_anything()
    height, width = rgb.shape[:2]
    out = np.zeros((len(boxes), height, width), bool)
    if not len(boxes):
        return out
    predictor = sa.SamPredictor(sam.model)
    with sam.lock, torch.inference_mode():
        predictor.set_image(np.ascontiguousarray(rgb))
        for start in range(0, len(boxes), batch):
            chunk = torch.as_tensor(boxes[start:start + batch], dtype=torch.float32,
                                    device=predictor.device)
            prompts = predictor.transform.apply_boxes_torch(chunk, (height, width))
            masks, scores, _ = predictor.predict_torch(None, None, boxes=prompts,
                                                       multimask_output=multimask)
            if multimask:
                best = scores.argmax(dim=1)
                masks = masks[torch.arange(len(best)), best]
            else:
                masks = masks[:, 0]
            out[start:start + len(masks)] = masks.cpu().numpy()
        predictor.reset_image()
    return out
