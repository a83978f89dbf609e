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


def run_lengths(counts: str) -> list[int]:
    """Uncompress a COCO RLE counts string into alternating 0/1 run lengths (as pycocotools'
    rleFrString: 5 bits a character, continuation bit 0x20, sign bit 0x10, deltas from the
    run two places back). Raises ValueError on a malformed string, which pycocotools would
    silently decode into garbage."""
    runs: list[int] = []
    pos, end = 0, len(counts)
    while pos < end:
        value, shift, more = 0, 0, True
        while more:
            if pos >= end:
                raise ValueError("RLE counts string ends inside a number")
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[pos]!r} is not in the RLE alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("negative run length")
        runs.append(value)
    return runs


def decode_crop(rle: RLE) -> tuple[np.ndarray, int, int]:
    """Decode only the mask's bounding box: (crop, x0, y0), crop uint8 0/1. Much cheaper than
    `decode` for the small objects aerial tiles are full of; an empty mask gives a 0x0 crop."""
    height = rle.size[0]
    runs = np.asarray(run_lengths(rle.counts), dtype=np.int64)
    ends = np.cumsum(runs)
    starts = ends - runs
    ones_start, ones_len = starts[1::2], runs[1::2]
    keep = ones_len > 0
    ones_start, ones_len = ones_start[keep], ones_len[keep]
    if ones_start.size == 0:
        return np.zeros((0, 0), np.uint8), 0, 0
    # every foreground pixel's column-major index, without a Python loop over pixels
    total = int(ones_len.sum())
    offsets = np.repeat(ones_start - np.concatenate(([0], np.cumsum(ones_len)[:-1])), ones_len)
    index = np.arange(total, dtype=np.int64) + offsets
    xs, ys = np.divmod(index, height)
    x0, y0 = int(xs.min()), int(ys.min())
    crop = np.zeros((int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1), np.uint8)
    crop[ys - y0, xs - x0] = 1
    return crop, x0, y0


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
