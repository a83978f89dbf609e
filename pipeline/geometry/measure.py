"""Measure a tile once: each object's colour, area and shape, and the ground around them.

`plan` measures every tile while its masks and pixels are decoded anyway and stores the numbers
in the tile's plan (`TilePlan.measurements`); the template backend states nothing else, in all
three annotation passes, without decoding the tile again. The numbers are threshold-free facts
(a median colour, a minimum-area rectangle, pixel counts) except the ground-cover classes below,
which are how ground pixels are counted.

- colour: per-channel median RGB under the mask (robust to marks and highlights);
- shape: `cv2.minAreaRect` of the mask's pixels (of its outer contours: the same convex hull),
  centre = mean pixel position, sides counted in pixels (extent + 1), long-axis angle in degrees
  in [0, 180) in image axes (0 = horizontal, 90 = vertical);
- per cell of a `grid` x `grid` split of the tile (rows then columns, cell bounds
  `i * size // grid`), counted on every COVER_SAMPLE_STEP-th row and column: pixels under any
  object, and ground pixels (outside every object, or the whole tile when objects cover it) of
  each ground-cover class; the mean and standard deviation of the ground's HSV value.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import cv2
import numpy as np

from pipeline.geometry import masks
from pipeline.geometry.priors import InstanceMask
from schemas import ObjectMeasurement, TileMeasurements

# --- ground-cover classes (OpenCV HSV: hue 0..179, saturation and value 0..255) -------------
COVER_CLASSES = ("dark areas", "green vegetation", "water", "bare brown soil",
                 "light sandy ground", "bright pale surfaces", "grey paved surfaces",
                 "reddish surfaces")
COVER_DARK_MAX_VALUE = 45
COVER_GREY_MAX_SATURATION = 40
COVER_BRIGHT_MIN_VALUE = 190
COVER_MIN_SATURATION = 35
# Pixel counts per cell are taken on every COVER_SAMPLE_STEP-th row and column (shares, not
# areas: a quarter of the pixels gives the same proportions to within a fraction of a percent).
COVER_SAMPLE_STEP = 2


def cover_classes(hsv: np.ndarray) -> np.ndarray:
    """Per-pixel ground-cover class index (into COVER_CLASSES) from HSV heuristics."""
    h, s, v = (hsv[..., i].astype(np.int16) for i in range(3))
    out = np.full(h.shape, COVER_CLASSES.index("reddish surfaces"), dtype=np.uint8)
    grey = s < COVER_GREY_MAX_SATURATION
    rules = [  # first match wins: apply in reverse so earlier rules overwrite later ones
        ("dark areas", v < COVER_DARK_MAX_VALUE),
        ("bright pale surfaces", grey & (v >= COVER_BRIGHT_MIN_VALUE)),
        ("grey paved surfaces", grey),
        ("green vegetation", (h >= 34) & (h < 90) & (s >= COVER_MIN_SATURATION)),
        ("water", (h >= 90) & (h < 130) & (s >= COVER_MIN_SATURATION)),
        ("light sandy ground", (h >= 5) & (h < 34) & (v >= COVER_BRIGHT_MIN_VALUE)),
        ("bare brown soil", (h >= 5) & (h < 34)),
    ]
    for name, where in reversed(rules):
        out[where] = COVER_CLASSES.index(name)
    return out


def median_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    """Per-channel median of N x 3 RGB pixels (mean of the two middle values, rounded half to
    even, as `round(np.median(...))`)."""
    n = len(pixels)
    if n == 0:
        raise ValueError("empty mask has no colour")
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(pixels, [lo, hi], axis=0).astype(np.int64)
    r, g, b = ((part[lo] + part[hi]) / 2).tolist()
    return round(r), round(g), round(b)


def mask_shape(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    """(cx, cy, long, short, angle) of a binary mask, in the mask's own pixel coordinates."""
    return _mask_shape(mask.astype(np.uint8, copy=False))[:5]


def _mask_shape(mask: np.ndarray) -> tuple[float, float, float, float, float, int]:
    """`mask_shape` of a uint8 0/1 mask, and its pixel count."""
    moments = cv2.moments(mask, binaryImage=True)
    if moments["m00"] == 0:
        raise ValueError("empty mask has no shape")
    found = masks.contours(mask)
    points = (found[0] if len(found) == 1 else np.concatenate(found)).astype(np.float32)
    corners = cv2.boxPoints(cv2.minAreaRect(points))
    edges = np.diff(corners[:3], axis=0)  # float32, as boxPoints gives them
    len_a, len_b = np.hypot(edges[:, 0], edges[:, 1]).tolist()
    long_x, long_y = edges[0 if len_a >= len_b else 1].tolist()
    angle = math.degrees(math.atan2(long_y, long_x)) % 180.0
    return (moments["m10"] / moments["m00"], moments["m01"] / moments["m00"],
            max(len_a, len_b) + 1.0, min(len_a, len_b) + 1.0, angle, int(moments["m00"]))


@functools.lru_cache(maxsize=8)
def cell_index(height: int, width: int, grid: int) -> np.ndarray:
    """Grid cell (row * grid + col) of every pixel, with the bounds `i * size // grid`."""
    def band(size: int) -> np.ndarray:
        bounds = np.array([i * size // grid for i in range(1, grid)])
        return np.searchsorted(bounds, np.arange(size), side="right")
    index = (band(height)[:, None] * grid + band(width)[None, :]).astype(np.intp)
    index.flags.writeable = False  # cached: shared by every tile of this size
    return index


def measure_objects(image: np.ndarray, instances: Sequence[InstanceMask]
                    ) -> tuple[list[ObjectMeasurement], np.ndarray]:
    """Each non-empty instance measured on its mask's box, and the union of all masks."""
    union = np.zeros(image.shape[:2], dtype=bool)
    objects = []
    for inst in instances:
        if inst.mask.size == 0:
            continue
        mask = inst.mask.astype(np.uint8, copy=False)
        box = (slice(inst.y0, inst.y0 + mask.shape[0]), slice(inst.x0, inst.x0 + mask.shape[1]))
        cx, cy, long, short, angle, area = _mask_shape(mask)
        mask = mask.view(bool)  # 0/1 bytes read as booleans, no copy
        union[box] |= mask
        objects.append(ObjectMeasurement(
            object_id=inst.object_id, category=inst.category, area=area,
            rgb=list(median_colour(image[box][mask])), cx=cx + inst.x0, cy=cy + inst.y0,
            long=long, short=short, angle=angle))
    return objects, union


def measure_tile(image: np.ndarray, instances: Sequence[InstanceMask], image_sha256: str,
                 grid: int = 3) -> TileMeasurements:
    """Measure a decoded tile (H x W x 3 RGB, whose PNG has `image_sha256`) and its decoded
    instances."""
    height, width = image.shape[:2]
    objects, union = measure_objects(image, instances)
    step = COVER_SAMPLE_STEP
    sample = np.ascontiguousarray(image[::step, ::step])
    union = union[::step, ::step]
    cells = cell_index(height, width, grid)[::step, ::step]
    n_cells, n_classes = grid * grid, len(COVER_CLASSES)
    hsv = cv2.cvtColor(sample, cv2.COLOR_RGB2HSV)
    classes = cover_classes(hsv)
    value = hsv[..., 2]
    # one count of (cell, class) with object pixels as an extra class
    labelled = np.where(union, n_classes, classes) if objects else classes
    counts = np.bincount((cells * (n_classes + 1) + labelled).ravel(),
                         minlength=n_cells * (n_classes + 1)).reshape(n_cells, n_classes + 1)
    object_pixels = counts[:, n_classes]
    if object_pixels.sum() < union.size:
        cover = counts[:, :n_classes]
        ground = value[~union] if objects else value.ravel()
    else:  # objects cover the whole tile: describe what there is
        cover = np.bincount((cells * n_classes + classes).ravel(),
                            minlength=n_cells * n_classes).reshape(n_cells, n_classes)
        ground = value.ravel()
    ground = ground.astype(np.float64)
    return TileMeasurements(
        image_sha256=image_sha256, width=width, height=height, grid=grid, objects=objects,
        object_pixels=object_pixels.tolist(), cover_classes=list(COVER_CLASSES),
        ground_cover=cover.tolist(), ground_value_mean=float(ground.mean()),
        ground_value_std=float(ground.std()))
