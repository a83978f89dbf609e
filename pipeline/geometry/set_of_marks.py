"""Set-of-marks: the numbered squares the instance pass sees (black square, yellow number).

Each mark is centred on an anchor inside its instance: the maximum of the instance's distance
transform (the point deepest inside it), among points where the whole square fits in the image.
Marks never overlap or touch (at least `MarkParams.gap` px apart): when the best anchor collides
with a mark already placed, other in-mask anchors are tried in decreasing distance-transform
order, one per `candidate_spacing` px cell so that a retry moves somewhere else; an instance
with no free anchor among `candidates` is left unmarked (unmarkable). Larger instances are placed
first. Every square has the same size, fitted to the widest number drawn in the tile plus
`padding`, so the digits are never cut; digits are solid yellow (anti-aliased text thresholded
at `ink_threshold`), so a mark holds exactly two colours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

from pipeline.core.imaging import encode_png
from pipeline.core.params import MarkParams
from pipeline.geometry.priors import InstanceMask
from schemas import Mark

MARK_COLOUR = (0, 0, 0)
NUMBER_COLOUR = (255, 255, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX

__all__ = ["MARK_COLOUR", "NUMBER_COLOUR", "MarkPlacement", "anchor_candidates", "draw_marks",
           "mark_side", "number_glyph", "place_marks", "render_set_of_marks"]


@lru_cache(maxsize=4096)
def number_glyph(number: int, font_scale: float, thickness: int, ink_threshold: int) -> np.ndarray:
    """The pixels of `number` as drawn by cv2.putText, cropped to them: a boolean ink map.

    Text is drawn anti-aliased, then every pixel covered at least `ink_threshold`/255 becomes
    ink: small digits come out bold and crisp, and a mark holds exactly two colours.
    """
    text = str(number)
    (tw, th), base = cv2.getTextSize(text, FONT, font_scale, thickness)
    margin = 2 * thickness + 2
    canvas = np.zeros((th + base + 2 * margin, tw + 2 * margin), np.uint8)
    cv2.putText(canvas, text, (margin, margin + th), FONT, font_scale, 255, thickness,
                cv2.LINE_AA)
    ink = canvas >= ink_threshold
    ys, xs = np.nonzero(ink)
    glyph = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()
    glyph.setflags(write=False)
    return glyph


def mark_side(count: int, params: MarkParams) -> int:
    """Side (px, odd so the anchor is the exact centre) of squares numbered 1..count."""
    ink = max(max(number_glyph(n, params.font_scale, params.thickness,
                               params.ink_threshold).shape)
              for n in range(1, max(count, 1) + 1))
    side = ink + 2 * params.padding
    return side if side % 2 else side + 1


def anchor_candidates(inst: InstanceMask, half: int, width: int, height: int,
                      params: MarkParams) -> np.ndarray:
    """In-mask anchors (k x 2 array of tile x, y), best first: a square of side 2*half+1 centred
    on each fits in the image. One anchor per `candidate_spacing` cell (its deepest point),
    ordered by distance-transform value (whole px), then nearness to the centroid, then y, x;
    at most `candidates`."""
    if inst.mask.size == 0:
        return np.zeros((0, 2), np.int64)
    depth = cv2.distanceTransform(np.pad(inst.mask, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ys, xs = np.nonzero(inst.mask)
    d = depth[ys + 1, xs + 1]
    gx, gy = xs.astype(np.int64) + inst.x0, ys.astype(np.int64) + inst.y0
    fits = (gx >= half) & (gx < width - half) & (gy >= half) & (gy < height - half)
    gx, gy, d = gx[fits], gy[fits], d[fits]
    if gx.size == 0:
        return np.zeros((0, 2), np.int64)
    # Depth in whole px: along the ridge of an elongated object depths differ by fractions, and
    # the point nearest the centroid (not the ridge's top-left end) should win.
    depth_px = np.floor(d)
    cx, cy = inst.centroid
    near = (gx + 0.5 - cx) ** 2 + (gy + 0.5 - cy) ** 2
    s = params.candidate_spacing
    cell_id = (gy // s) * (width // s + 1) + gx // s
    order = np.lexsort((gx, gy, near, -depth_px, cell_id))
    _, first = np.unique(cell_id[order], return_index=True)
    best = order[first]
    best = best[np.lexsort((gx[best], gy[best], near[best], -depth_px[best]))][:params.candidates]
    return np.stack([gx[best], gy[best]], axis=1)


@dataclass(frozen=True)
class MarkPlacement:
    """Marks placed (numbered in reading order), instances that found no free anchor, and
    instances not tried because the tile's mark limit was reached."""

    marks: list[Mark]
    unmarkable_ids: list[int] = field(default_factory=list)
    over_limit_ids: list[int] = field(default_factory=list)
    side: int = 0


def place_marks(instances: Sequence[InstanceMask], width: int, height: int, limit: int,
                params: MarkParams) -> MarkPlacement:
    """Place up to `limit` marks on `instances` (in priority order), none overlapping.

    Numbers 1..k follow reading order of the anchors: top to bottom, then left to right
    (sorted by y, then x).
    """
    count = min(limit, len(instances))
    if count == 0:
        return MarkPlacement(marks=[], over_limit_ids=[i.object_id for i in instances])
    side = mark_side(count, params)
    half = side // 2
    boxes = np.zeros((0, 4), np.int64)
    placed: list[tuple[int, int, int]] = []
    unmarkable: list[int] = []
    over_limit: list[int] = []
    for inst in instances:
        if len(placed) == limit:
            over_limit.append(inst.object_id)
            continue
        anchors = anchor_candidates(inst, half, width, height, params)
        cand = np.concatenate([anchors - half, anchors + half + 1], axis=1)  # x0, y0, x1, y1
        # a candidate clashes with a placed box unless `gap` px separate them on some axis
        lo, hi = cand[:, None, :2] - params.gap, cand[:, None, 2:] + params.gap
        clash = ((lo < boxes[None, :, 2:]) & (boxes[None, :, :2] < hi)).all(axis=2)
        free = np.flatnonzero(~clash.any(axis=1))
        if free.size == 0:
            unmarkable.append(inst.object_id)
            continue
        x, y = (int(v) for v in anchors[free[0]])
        boxes = np.concatenate([boxes, cand[free[0]:free[0] + 1]])
        placed.append((y, x, inst.object_id))
    marks = [Mark(object_id=oid, number=n, x=x, y=y,
                  box=[x - half, y - half, x + half + 1, y + half + 1])
             for n, (y, x, oid) in enumerate(sorted(placed), start=1)]
    return MarkPlacement(marks=marks, unmarkable_ids=unmarkable, over_limit_ids=over_limit,
                         side=side)


def draw_marks(image: np.ndarray, marks: Sequence[Mark], params: MarkParams) -> np.ndarray:
    """A copy of the RGB image with each mark drawn: black square, yellow number centred."""
    out = image.copy()
    for mark in marks:
        x0, y0, x1, y1 = mark.box
        out[y0:y1, x0:x1] = MARK_COLOUR
        glyph = number_glyph(mark.number, params.font_scale, params.thickness,
                             params.ink_threshold)
        gh, gw = glyph.shape
        oy, ox = y0 + (y1 - y0 - gh) // 2, x0 + (x1 - x0 - gw) // 2
        out[oy:oy + gh, ox:ox + gw][glyph] = NUMBER_COLOUR
    return out


def render_set_of_marks(image: np.ndarray, marks: Sequence[Mark], params: MarkParams) -> bytes:
    """The set-of-marks image the instance requests show, as PNG bytes."""
    return encode_png(draw_marks(image, marks, params), params.png_compression)
