"""Instance masks as COCO RLE: encoding, decoding, unions, polygons (GeoPixel's format)."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from schemas import RLE


def encode(mask: np.ndarray) -> RLE:
    """Binary HxW mask -> compressed COCO RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return RLE(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def to_coco(rle: RLE) -> dict:
    """The dict pycocotools takes (counts as bytes)."""
    return {"size": list(rle.size), "counts": rle.counts.encode("ascii")}


def decode(rle: RLE) -> np.ndarray:
    """COCO RLE -> HxW uint8 mask of 0/1."""
    return mask_utils.decode(to_coco(rle))


def area(rle: RLE) -> int:
    return int(mask_utils.area(to_coco(rle)))


def bbox(rle: RLE) -> list[float]:
    """COCO [x, y, w, h] of the mask's pixels."""
    return [float(v) for v in mask_utils.toBbox(to_coco(rle))]


def union(rles: Sequence[RLE]) -> RLE:
    """Pixelwise union of masks of the same size."""
    if not rles:
        raise ValueError("union of no masks")
    merged = mask_utils.merge([to_coco(r) for r in rles], intersect=False)
    return RLE(size=[int(s) for s in merged["size"]], counts=merged["counts"].decode("ascii"))


def iou(a: RLE, b: RLE) -> float:
    return float(mask_utils.iou([to_coco(a)], [to_coco(b)], [0])[0][0])


def to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer contours of a binary mask as GeoPixel polygons: [[[x, y], ...], ...]."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1, 2).tolist() for c in contours if len(c) >= 1]


def from_polygons(polygons: Sequence[Sequence[Sequence[int]]], height: int,
                  width: int) -> np.ndarray:
    """Fill GeoPixel polygons into one mask as its loader does: each polygon filled on its own
    with `cv2.fillPoly`, so overlapping polygons add up instead of cancelling out."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        if len(poly):
            cv2.fillPoly(mask, [np.asarray(poly, dtype=np.int32).reshape(-1, 2)], 1)
    return mask
