"""Instance masks as COCO RLE: encoding, decoding, unions, polygons (GeoPixel's format)."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import orjson
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


def run_lengths(counts: str) -> np.ndarray:
    """Uncompress a COCO RLE counts string into alternating 0/1 run lengths (int64), as
    pycocotools' rleFrString does (5 bits a character, continuation bit 0x20, sign bit 0x10 on a
    number's last character, deltas from the run two places back), without a loop over
    characters. Raises ValueError on a malformed string, which pycocotools would silently
    decode into garbage."""
    if not counts.isascii():
        bad = next(c for c in counts if not c.isascii())
        raise ValueError(f"character {bad!r} is not in the RLE alphabet")
    raw = np.frombuffer(counts.encode("ascii"), dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.int64)
    chars = raw.astype(np.int64) - 48
    bad = np.flatnonzero((chars < 0) | (chars >= 64))
    if bad.size:
        raise ValueError(f"character {counts[int(bad[0])]!r} is not in the RLE alphabet")
    last = (chars & 0x20) == 0  # a number's last character has no continuation bit
    if not last[-1]:
        raise ValueError("RLE counts string ends inside a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    number = np.repeat(np.arange(ends.size), ends - starts + 1)
    position = np.arange(chars.size) - starts[number]  # character index within its number
    if position.max() > 11:  # 12 characters carry 60 bits: no run is longer
        raise ValueError("RLE counts string holds a number too long for a run length")
    values = np.zeros(ends.size, np.int64)
    np.add.at(values, number, (chars & 0x1F) << (5 * position))
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
    # runs[i] = values[i] + runs[i - 2] for i > 2: running sums of each parity from index 1 / 2
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        raise ValueError("negative run length")
    return runs


def counts_string(runs: np.ndarray) -> str:
    """Compress alternating 0/1 run lengths into a COCO RLE counts string (the inverse of
    `run_lengths`), by pycocotools' own encoder."""
    runs = np.asarray(runs, dtype=np.int64)
    if runs.size == 0:
        return ""
    total = int(runs.sum())
    rle = mask_utils.frPyObjects({"counts": runs.tolist(), "size": [1, total]}, 1, total)
    return rle["counts"].decode("ascii")


def is_canonical(rle: RLE) -> tuple[bool, bool]:
    """(valid, empty) of an RLE: valid when its counts string is exactly what pycocotools'
    encode gives for the mask it describes (well-formed, runs after the first positive,
    covering the frame exactly), empty when no pixel is set. Same verdict as decoding and
    re-encoding the full mask, without decoding it."""
    try:
        runs = run_lengths(rle.counts)
    except ValueError:
        return False, False
    height, width = rle.size
    valid = (runs.size > 0 and int(runs.sum()) == height * width and bool((runs[1:] > 0).all())
             and counts_string(runs) == rle.counts)
    return valid, bool(valid and runs.size < 2)


# masks covering over 1/BIG_MASK_SHARE of their frame are decoded whole, then cropped
BIG_MASK_SHARE = 32


def decode_crop(rle: RLE) -> tuple[np.ndarray, int, int]:
    """Decode only the mask's bounding box: (crop, x0, y0), crop uint8 0/1. Much cheaper than
    `decode` for the small objects aerial tiles are full of; an empty mask gives a 0x0 crop."""
    height = rle.size[0]
    runs = run_lengths(rle.counts)
    ends = np.cumsum(runs)
    starts = ends - runs
    ones_start, ones_len = starts[1::2], runs[1::2]
    keep = ones_len > 0
    ones_start, ones_len = ones_start[keep], ones_len[keep]
    if ones_start.size == 0:
        return np.zeros((0, 0), np.uint8), 0, 0
    total = int(ones_len.sum())
    if total * BIG_MASK_SHARE > int(ends[-1]):
        # a large mask: pycocotools' full decode (a C loop) beats indexing every pixel
        full = decode(rle)
        x, y, w, h = (int(v) for v in mask_utils.toBbox(to_coco(rle)))
        return np.ascontiguousarray(full[y:y + h, x:x + w]), x, y
    # every foreground pixel's column-major index, without a Python loop over pixels
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


def member_masks(mask: RLE, members: Sequence[RLE | None]) -> list[RLE]:
    """The masks a grounded phrase's polygons are traced from: its member instances' masks
    (`members`, in the phrase's object-id order) when every one is known (not None) and their
    union is exactly `mask`, so that filling them all gives back the phrase's mask; else
    `[mask]` alone (a phrase of unknown or mismatched members keeps its union's outline).
    Touching instances stay apart this way, where the union's outline would merge them."""
    if not members or any(m is None or list(m.size) != list(mask.size) for m in members):
        return [mask]
    merged = members[0] if len(members) == 1 else union(members)
    return list(members) if merged.counts == mask.counts else [mask]


def iou(a: RLE, b: RLE) -> float:
    return float(mask_utils.iou([to_coco(a)], [to_coco(b)], [0])[0][0])


def contours(mask: np.ndarray, x0: int = 0, y0: int = 0) -> list[np.ndarray]:
    """Outer contours of a binary mask, every boundary pixel, as N x 2 int32 [x, y] arrays;
    (x0, y0) is added to each point (the mask's offset in a larger frame)."""
    # padded so that pixels on the mask's edge are traced as they would be inside a larger frame
    padded = cv2.copyMakeBorder(mask.astype(np.uint8, copy=False), 1, 1, 1, 1,
                                cv2.BORDER_CONSTANT, value=0)
    found, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                offset=(x0 - 1, y0 - 1))
    return [c.reshape(-1, 2) for c in found if len(c) >= 1]


def to_polygons(mask: np.ndarray, x0: int = 0, y0: int = 0) -> list[list[list[int]]]:
    """Outer contours of a binary mask as GeoPixel polygons: [[[x, y], ...], ...], every
    boundary pixel (as the release); (x0, y0) is added to each point."""
    return [c.tolist() for c in contours(mask, x0, y0)]


def rle_contours(rle: RLE) -> list[np.ndarray]:
    """`contours` of an RLE mask, traced on its box only."""
    crop, x0, y0 = decode_crop(rle)
    return contours(crop, x0, y0) if crop.size else []


def polygons_json(polygons: Sequence[Sequence[np.ndarray]]) -> str:
    """JSON text of per-phrase polygon lists, exactly as `json.dumps` writes the nested lists
    (", " between items), straight from the point arrays."""
    compact = orjson.dumps([list(p) for p in polygons], option=orjson.OPT_SERIALIZE_NUMPY)
    return compact.replace(b",", b", ").decode("ascii")  # numbers only: every comma separates


def from_polygons(polygons: Sequence[Sequence[Sequence[int]]], height: int,
                  width: int) -> np.ndarray:
    """Fill GeoPixel polygons into one mask as its loader does: each polygon filled on its own
    with `cv2.fillPoly`, so overlapping polygons add up instead of cancelling out."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        if len(poly):
            cv2.fillPoly(mask, [np.asarray(poly, dtype=np.int32).reshape(-1, 2)], 1)
    return mask
