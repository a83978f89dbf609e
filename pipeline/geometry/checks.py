"""The one gate between geometry in a user's file and pixels: polygons, boxes, RLE masks,
object ids and category names are checked here, and polygons clipped here, before anything is
handed to pycocotools, OpenCV or shapely.

Why a gate: pycocotools' polygon rasteriser walks every edge at 5x resolution in C `int`s, so a
vertex at 1e9 overflows (a segmentation fault) and one at 1e8 allocates gigabytes; OpenCV casts
to int32; a JSON number may be a bool, an integer of any size or (from "1e400") infinite; and a
value of the wrong type turns into a traceback or, worse, into its Python repr. Every problem is
a `BadAnnotationError` naming the file and the annotation, shown by the CLI as one line.

Rules, the same for every source:
- a coordinate is an int or float (not a bool), finite, of magnitude at most 2**53 (beyond it
  float64 has no integer precision; no pixel or map coordinate comes near it);
- a COCO polygon or GeoJSON ring has at least 3 points (a GeoPixel polygon 1: fillPoly draws
  a dot or a line), an annotation at most MAX_POLYGONS polygons and MAX_POINTS points;
- pixel polygons are clipped (Sutherland-Hodgman: the same region inside the box) to the image
  framed by a margin of one image size on every side. A polygon inside that frame is passed on
  untouched, so every polygon in the image or overhanging it by less than its size rasterises
  exactly as before; one reaching further keeps its region in the image, up to the rasteriser's rounding of the vertices the cut
  adds (pycocotools rounds to 1/5 px, so a pixel or two along a cut edge may flip). After
  clipping, the outline of an annotation (sum of the edges' longer sides: the steps the
  rasteriser walks) is at most MAX_OUTLINE pixels;
- an RLE mask has the image's [height, width] and run lengths that cover it exactly (so
  no run overflows pycocotools' 32-bit counts); a COCO bbox is four finite numbers;
- an object id is an int (not a bool) within int64, the Parquet type ids are stored in;
- a category name is a non-empty string of at most MAX_NAME_CHARS characters.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.core.errors import BadAnnotationError

# |coordinate| above this is refused: float64 stops representing every integer beyond 2**53
COORD_LIMIT = float(2 ** 53)
# points of one annotation (all its polygons): far above any traced contour (a 20000 px iSAID
# scene's largest object has a few thousand), small enough that checking them stays fast
MAX_POINTS = 1_000_000
# polygons of one annotation (an object in many pieces); each costs a pycocotools RLE
MAX_POLYGONS = 10_000
# pixels of outline one annotation may make the rasteriser walk after clipping: pycocotools
# keeps 5 points a pixel at 16 bytes each, so this caps one annotation at ~80 MB; a rectangle
# around a whole 20000 px scene is 80,000 px, a pixel-by-pixel traced contour ~1 px a point
MAX_OUTLINE = 1_000_000
# pycocotools stores run lengths as 32-bit unsigned ints: no frame can have more pixels
MAX_FRAME_PIXELS = 2 ** 32 - 1
# object ids are stored as int64
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
# a category name longer than this is not a name (it ends up in prompts and file names)
MAX_NAME_CHARS = 200

_NUMBER_TYPES = frozenset({int, float})


def kind_of(value: object) -> str:
    """What a JSON value is, in the user's words (never its repr: it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float (not a bool) within COORD_LIMIT."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= COORD_LIMIT
    except OverflowError:  # an int too large for a float
        return False


def frame_size(height: object, width: object, where: str, path: Optional[Path]) -> None:
    """An image size from a user file: positive ints whose product pycocotools can hold."""
    if not (is_int(height) and is_int(width) and height > 0 and width > 0):
        raise BadAnnotationError(f"{where} needs a positive integer height and width", path)
    if height * width > MAX_FRAME_PIXELS:
        raise BadAnnotationError(f"{where} is {width}x{height}, more than the "
                                 f"{MAX_FRAME_PIXELS} pixels a mask can have", path)


def object_id(value: object, where: str, path: Optional[Path], what: str = "id") -> int:
    """An object id: an int (not a bool) within int64."""
    if not is_int(value):
        raise BadAnnotationError(f"{where}: {what} must be an integer, not {kind_of(value)}",
                                 path)
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadAnnotationError(f"{where}: {what} {short_int(value)} is outside the 64-bit "
                                 "range object ids are stored in", path)
    return value


def short_int(value: int) -> str:
    """An integer for a message: its digits, shortened when there are many."""
    text = str(value) if value.bit_length() < 200 else f"of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:20] + "..." + text[-8:]


def category_name(value: object, where: str, path: Optional[Path],
                  what: str = "category", integers: bool = False) -> str:
    """A category name: a non-empty string (at most MAX_NAME_CHARS); with `integers`, an int
    (not a bool) is taken as its decimal text (a class code, e.g. 3 -> "3")."""
    if integers and is_int(value):
        if abs(value) >= 10 ** 18:
            raise BadAnnotationError(f"{where}: {what} is an integer of {len(str(abs(value)))} "
                                     "digits, too long for a class code", path)
        return str(value)
    if not isinstance(value, str):
        allowed = "a string or an integer" if integers else "a string"
        raise BadAnnotationError(f"{where}: {what} must be {allowed}, not {kind_of(value)}",
                                 path)
    if not value.strip():
        raise BadAnnotationError(f"{where}: {what} is empty", path)
    if len(value) > MAX_NAME_CHARS:
        raise BadAnnotationError(f"{where}: {what} is {len(value)} characters long, more "
                                 f"than the {MAX_NAME_CHARS} a name may have", path)
    return value


# ---- coordinates and polygons -----------------------------------------------------------------

def _numbers(values: Sequence[Any], where: str, path: Optional[Path], what: str) -> None:
    """Every value an int or float (not a bool), finite, within COORD_LIMIT. Runs at C speed
    (type set, min, max, sum) on the long lists of real annotation files."""
    types = set(map(type, values))
    if not types <= _NUMBER_TYPES:
        odd = next(v for v in values if type(v) not in _NUMBER_TYPES)
        raise BadAnnotationError(f"{where}: {what} holds {kind_of(odd)} where a number belongs",
                                 path)
    if not values:
        return
    try:
        # NaN fails no comparison, so floats are summed too (NaN or inf make the sum so)
        ok = (-COORD_LIMIT <= min(values) and max(values) <= COORD_LIMIT
              and (float not in types or math.isfinite(sum(values))))
    except OverflowError:  # an int too large to add to a float
        ok = False
    if not ok:
        raise BadAnnotationError(f"{where}: {what} has a coordinate that is not a finite "
                                 f"number within +-2**53", path)


def flat_points(values: object, where: str, path: Optional[Path], what: str = "polygon",
                min_points: int = 3) -> list:
    """A COCO polygon (flat [x1, y1, x2, y2, ...]) checked: numbers, even count, enough
    points. Returns it as given."""
    if not isinstance(values, list):
        raise BadAnnotationError(f"{where}: {what} is {kind_of(values)}, not a list of numbers",
                                 path)
    _numbers(values, where, path, what)
    if len(values) % 2 or len(values) < 2 * min_points:
        raise BadAnnotationError(f"{where}: {what} with {len(values)} coordinates (needs an "
                                 f"even count, at least {min_points} points)", path)
    return values


def pair_points(values: object, where: str, path: Optional[Path], what: str = "polygon",
                min_points: int = 1, dims: tuple[int, ...] = (2,)) -> list:
    """A polygon as [[x, y], ...] (GeoPixel) or GeoJSON positions ([x, y] or, with
    dims=(2, 3), [x, y, z]) checked. Returns the coordinates flattened [x, y, (z,) ...]."""
    if not isinstance(values, list) or set(map(type, values)) - {list}:
        raise BadAnnotationError(f"{where}: {what} is not a list of [x, y] points", path)
    lengths = set(map(len, values))
    if not lengths <= set(dims):
        raise BadAnnotationError(f"{where}: {what} has a point that is not "
                                 f"{' or '.join('[x, y' + ', z' * (d - 2) + ']' for d in dims)}",
                                 path)
    if len(lengths) > 1:
        raise BadAnnotationError(f"{where}: {what} mixes [x, y] and [x, y, z] points", path)
    if len(values) < min_points:
        raise BadAnnotationError(f"{where}: {what} has {len(values)} points, fewer than "
                                 f"{min_points}", path)
    flat = list(chain.from_iterable(values))
    _numbers(flat, where, path, what)
    return flat


def clip_frame(height: int, width: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) that pixel polygons are clipped to: the image and a margin of one image
    size around it (polygons within it are never changed)."""
    margin = float(max(height, width))
    return -margin, -margin, width + margin, height + margin


def _clip_side(xy: np.ndarray, axis: int, bound: float, keep_above: bool) -> np.ndarray:
    """One Sutherland-Hodgman pass: `xy` (n x 2, a closed ring) cut by x|y = bound."""
    v = xy[:, axis]
    inside = v >= bound if keep_above else v <= bound
    if inside.all():
        return xy
    if not inside.any():
        return xy[:0]
    prev = np.roll(xy, 1, axis=0)
    cross = inside != np.roll(inside, 1)
    dv = v - prev[:, axis]
    t = np.where(cross, (bound - prev[:, axis]) / np.where(cross, dv, 1.0), 0.0)
    crossing = prev + t[:, None] * (xy - prev)
    crossing[:, axis] = bound
    # for each point: the crossing into or out of the side first, then the point if inside
    emitted = np.stack([crossing, xy], axis=1)
    return emitted[np.stack([cross, inside], axis=1)]


def clip_polygon(xy: np.ndarray, frame: tuple[float, float, float, float]) -> np.ndarray:
    """A ring (n x 2) clipped to the box `frame`: the same region inside the box (edges along
    the box's sides where it was cut). Empty when nothing of it is in the box; otherwise at
    least min(n, 3) points."""
    x0, y0, x1, y1 = frame
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True),
                                    (1, y1, False)):
        xy = _clip_side(xy, axis, bound, keep_above)
        if not len(xy):
            break
    return xy


def outline(xy: np.ndarray) -> float:
    """Sum over a ring's edges (the closing one too) of the longer of |dx|, |dy|: the steps a
    rasteriser takes along it."""
    if len(xy) < 2:
        return 0.0
    d = np.abs(np.diff(xy, axis=0, append=xy[:1]))
    return float(d.max(axis=1).sum())


def pixel_polygons(polygons: Sequence[list], height: int, width: int, where: str,
                   path: Optional[Path]) -> list[list]:
    """Flat pixel polygons (each already checked by `flat_points`/`pair_points`) clipped to
    `clip_frame`, counts and outline bounded. A polygon inside the frame is returned as the
    very list it was; a clipped one as a new flat list of floats; one wholly outside (or cut to
    nothing) is left out."""
    if len(polygons) > MAX_POLYGONS:
        raise BadAnnotationError(f"{where}: {len(polygons)} polygons, more than the "
                                 f"{MAX_POLYGONS} one annotation may have", path)
    points = sum(len(p) for p in polygons) // 2
    if points > MAX_POINTS:
        raise BadAnnotationError(f"{where}: {points} polygon points, more than the "
                                 f"{MAX_POINTS} one annotation may have", path)
    frame = clip_frame(height, width)
    fx0, fy0, fx1, fy1 = frame
    # inside the frame no edge walks more than the frame's wider side: a bound that spares
    # measuring the outline of ordinary polygons
    longest = max(fx1 - fx0, fy1 - fy0)
    kept, bound = [], 0.0
    for poly in polygons:
        xs, ys = poly[0::2], poly[1::2]
        if fx0 <= min(xs) and max(xs) <= fx1 and fy0 <= min(ys) and max(ys) <= fy1:
            kept.append(poly)
            bound += (len(poly) // 2) * longest
            continue
        clipped = clip_polygon(np.asarray(poly, np.float64).reshape(-1, 2), frame)
        if len(clipped):
            kept.append(clipped.ravel().tolist())
            bound += outline(clipped)
    if bound > MAX_OUTLINE:
        walked = sum(outline(np.asarray(p, np.float64).reshape(-1, 2)) for p in kept)
        if walked > MAX_OUTLINE:
            raise BadAnnotationError(
                f"{where}: polygons with an outline of {walked:.0f} px inside the image's "
                f"frame, more than the {MAX_OUTLINE} px one annotation may have", path)
    return kept


# ---- COCO segmentations -----------------------------------------------------------------------

def check_rle(value: object, height: Optional[int], width: Optional[int], where: str,
              path: Optional[Path]) -> dict:
    """A COCO RLE {size, counts} checked: size [height, width] (the image's when given),
    counts a compressed string or a list of non-negative ints, covering the frame exactly.
    Returns {"size": [h, w], "counts": str | list[int]} as given."""
    if not isinstance(value, dict) or "size" not in value or "counts" not in value:
        raise BadAnnotationError(f"{where}: an RLE mask must be an object {{size, counts}}",
                                 path)
    size, counts = value["size"], value["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        raise BadAnnotationError(f"{where}: RLE without a [height, width] size", path)
    if height is not None and size != [height, width]:
        raise BadAnnotationError(
            f"{where}: RLE size {size} differs from its image's [{height}, {width}]", path)
    if size[0] <= 0 or size[1] <= 0 or size[0] * size[1] > MAX_FRAME_PIXELS:
        raise BadAnnotationError(f"{where}: RLE size {size} is not a mask size", path)
    pixels = size[0] * size[1]
    # a mask has at most pixels + 1 runs (the first may be empty), each at most 7 characters
    # in the compressed string (a 32-bit run in 5-bit groups): longer is not a mask of this
    # size, and decoding cost stays bounded by the image
    per_run = 7 if isinstance(counts, str) else 1
    if isinstance(counts, (str, list)) and len(counts) > per_run * (pixels + 1):
        raise BadAnnotationError(f"{where}: RLE counts hold more runs than a {size[0]}x{size[1]} "
                                 "mask has pixels", path)
    if isinstance(counts, str):
        from pipeline.geometry.masks import run_lengths

        try:
            runs = run_lengths(counts)
        except ValueError as exc:
            raise BadAnnotationError(f"{where}: RLE counts string is malformed ({exc})",
                                     path) from None
        # runs within a frame of < 2**32 pixels: no step of pycocotools' decoder overflows
        if runs.size and int(runs.max()) > pixels:
            raise BadAnnotationError(f"{where}: RLE counts hold a run longer than the "
                                     f"{pixels} pixels of height x width", path)
        if int(runs.sum()) != pixels:
            raise BadAnnotationError(f"{where}: RLE counts cover {int(runs.sum())} pixels, "
                                     f"not height x width = {pixels}", path)
    elif isinstance(counts, list):
        if set(map(type, counts)) - {int} or (counts and min(counts) < 0):
            raise BadAnnotationError(f"{where}: RLE counts are neither a string nor a list of "
                                     f"non-negative integers", path)
        if sum(counts) != pixels:
            covered = sum(counts)
            shown = covered if covered < 10 ** 30 else "more than 10**30"
            raise BadAnnotationError(f"{where}: RLE counts cover {shown} pixels, not height x "
                                     f"width = {pixels}", path)
    else:
        raise BadAnnotationError(f"{where}: RLE counts are neither a string nor a list of "
                                 f"non-negative integers", path)
    return {"size": list(size), "counts": counts}


def coco_segmentation(seg: object, height: int, width: int, where: str,
                      path: Optional[Path]) -> list | dict:
    """A COCO `segmentation` checked and made safe to rasterise: polygons clipped (a list,
    maybe empty when every polygon lies far outside the image), or an RLE of the image's size."""
    if isinstance(seg, list):
        if not seg:
            raise BadAnnotationError(f"{where}: empty segmentation", path)
        polygons = [flat_points(p, where, path) for p in seg]
        return pixel_polygons(polygons, height, width, where, path)
    if isinstance(seg, dict):
        return check_rle(seg, height, width, where, path)
    raise BadAnnotationError(f"{where}: segmentation is {kind_of(seg)}, neither polygons nor "
                             "RLE", path)


def coco_rle(seg: list | dict, height: int, width: int) -> dict:
    """The pycocotools (compressed, counts as bytes) RLE of a segmentation returned by
    `coco_segmentation`, rasterised as COCO does."""
    if isinstance(seg, list):
        if not seg:
            return mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]},
                                          height, width)
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}


def check_bbox(value: object, where: str, path: Optional[Path]) -> None:
    """A COCO bbox [x, y, w, h]: four finite numbers, w and h not negative."""
    if not (isinstance(value, list) and len(value) == 4):
        raise BadAnnotationError(f"{where}: bbox must be a list [x, y, width, height]", path)
    _numbers(value, where, path, "bbox")
    if value[2] < 0 or value[3] < 0:
        raise BadAnnotationError(f"{where}: bbox has a negative width or height", path)


# ---- GeoPixel polygons (OpenCV) ---------------------------------------------------------------

def fill_polygon(points: object, height: int, width: int, where: str,
                 path: Optional[Path]) -> np.ndarray:
    """A GeoPixel polygon ([[x, y], ...], one point or more) checked, clipped and filled as
    GeoPixel's loader does (`cv2.fillPoly` of its int32 points) into an HxW uint8 mask."""
    from pipeline.geometry.masks import from_polygons

    flat = pair_points(points, where, path)
    kept = pixel_polygons([flat], height, width, where, path)
    if not kept:  # wholly outside the frame: nothing of it is in the image
        return np.zeros((height, width), np.uint8)
    if kept[0] is flat:
        return from_polygons([points], height, width)
    return from_polygons([np.asarray(kept[0], np.float64).reshape(-1, 2)], height, width)


# ---- map polygons (GeoJSON) -------------------------------------------------------------------

def map_geometry(geometry: dict, where: str, path: Optional[Path]) -> int:
    """A GeoJSON Polygon or MultiPolygon's coordinates checked (rings of >= 3 positions
    [x, y] or [x, y, z], finite numbers within 2**53, bounded counts); returns its point count.
    shapely's `shape` can then build it without raising."""
    kind = geometry["type"]
    coords = geometry.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords
    if not isinstance(polygons, list) or not polygons or not all(
            isinstance(p, list) and p for p in polygons):
        shape = "polygons, each a list of rings" if kind == "MultiPolygon" else "rings"
        raise BadAnnotationError(f"{where}: {kind} coordinates must be a list of {shape} of "
                                 "[x, y] positions", path)
    rings, points = 0, 0
    for polygon in polygons:
        for ring in polygon:
            rings += 1
            if rings > MAX_POLYGONS:
                raise BadAnnotationError(f"{where}: more than {MAX_POLYGONS} rings", path)
            pair_points(ring, where, path, what="ring", min_points=3, dims=(2, 3))
            points += len(ring)
            if points > MAX_POINTS:
                raise BadAnnotationError(f"{where}: more than {MAX_POINTS} points", path)
    return points
