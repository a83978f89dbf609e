"""iSAID source adapter: the devkit's tiling and per-tile instance extraction, reproduced exactly.

The devkit (CAPTAIN-WHU/iSAID_Devkit, `split.py` then `preprocess.py`) cuts every scene larger
than the tile size both ways into overlapping windows, then reads instances from the CROPPED id
and colour tiles: id = R + 256 G + 65536 B (ids below 1000 are background), category = the
smallest colour value under the instance, outer contours only, instances with a contour of at
most two points dropped. This module gives the same tiles and instances without writing the
intermediate tile files: the id and colour maps are computed once per scene, and each instance
is handled on its own pixels (a bounding-box crop for contours, run lengths for the RLE) rather
than as a full tile-sized mask.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from pipeline.core.errors import BadImageError, BadMaskError
from pipeline.core.imaging import (
    PNG_SIGNATURE,
    decode_image,
    encode_png,
    png_is_complete,
    png_size,
    sha256,
)
from pipeline.core.params import PrepareParams
from pipeline.geometry.categories import ISAID_CATEGORY_IDS, ISAID_COLOUR_TO_CATEGORY
from pipeline.geometry.masks import counts_string
from schemas import RLE, ObjectInstance, Tile, Window

SOURCE = "isaid"
MIN_INSTANCE_ID = 1000  # devkit: ids below this are background / stuff, never instances
UNLABELED = 0  # colour value of 'unlabeled' in the devkit's label table: never an instance
ID_SUFFIX = "_instance_id_RGB"
COLOUR_SUFFIX = "_instance_color_RGB"

# Reasons an instance is dropped from a tile (keys of the report's `dropped` counts).
DROP_UNLABELED = "unlabeled"
DROP_UNKNOWN_COLOUR = "unknown_colour"
DROP_NO_CONTOUR = "no_contour"
DROP_SMALL_CONTOUR = "small_contour"
DROP_SMALL_AREA = "small_area"


# ---- scene files and tile layout -----------------------------------------------------------

def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value (P2 before P10), as the devkit's natsorted."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


def is_scene_file(path: Path) -> bool:
    """A scene image: a .png whose stem has no '_' (masks and devkit tiles all have one)."""
    return path.suffix.lower() == ".png" and "_" not in path.stem


def mask_paths(image: Path) -> tuple[Path, Path]:
    """The id and colour masks the devkit expects beside `image`."""
    return (image.with_name(f"{image.stem}{ID_SUFFIX}.png"),
            image.with_name(f"{image.stem}{COLOUR_SUFFIX}.png"))


def tile_windows(height: int, width: int, tile_size: int, stride: int) -> list[Window]:
    """Devkit windows: x outer, y inner, shifted back at the edges, duplicates collapsed.

    A scene is tiled only when it is larger than `tile_size` in both directions; otherwise the
    whole scene is one window.
    """
    if not (height > tile_size and width > tile_size):
        return [Window(y0=0, y1=height, x0=0, x1=width)]
    windows: dict[tuple[int, int, int, int], Window] = {}
    for x in range(0, width, stride):
        for y in range(0, height, stride):
            x0, x1 = x, x + tile_size
            if x1 > width:
                x0, x1 = x0 - (x1 - width), width
            y0, y1 = y, y + tile_size
            if y1 > height:
                y0, y1 = y0 - (y1 - height), height
            windows.setdefault((y0, y1, x0, x1), Window(y0=y0, y1=y1, x0=x0, x1=x1))
    return list(windows.values())


def tile_layout(stem: str, height: int, width: int, tile_size: int,
                stride: int) -> list[tuple[str, Window]]:
    """(tile id, window) of every tile of a scene: `{stem}_{y0}_{y1}_{x0}_{x1}`, or `{stem}`
    when the scene is kept whole (the devkit copies such a file under its own name)."""
    windows = tile_windows(height, width, tile_size, stride)
    if not (height > tile_size and width > tile_size):
        return [(stem, windows[0])]
    return [(f"{stem}_{w.y0}_{w.y1}_{w.x0}_{w.x1}", w) for w in windows]


def header_size(path: Path) -> Optional[tuple[int, int]]:
    """(height, width) from a PNG header, or None when the header is unreadable (the error is
    reported when the scene is decoded)."""
    try:
        with open(path, "rb") as f:
            return png_size(f.read(33), path)
    except (OSError, BadImageError):
        return None


# ---- decoding ------------------------------------------------------------------------------

def colour_values(bgr: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 as cv2 decodes it (B, G, R) -> HxW int32 of R + 256 G + 65536 B."""
    value = bgr[..., 0].astype(np.int32)
    value <<= 8
    value |= bgr[..., 1]
    value <<= 8
    value |= bgr[..., 2]
    return value


def read_mask(path: Path, role: str, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Read an 8-bit RGB(A) PNG mask as an int32 value map, checking its size from the header
    before decoding it. Greyscale or 16-bit masks are refused: their colours are not the
    devkit's."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadMaskError(f"missing {role} mask for {Path(image_path).name}", path) from None
    if data[:8] != PNG_SIGNATURE:
        raise BadMaskError(f"{role} mask is not a PNG file", path)
    try:
        height, width = png_size(data, path)
    except BadImageError as exc:
        raise BadMaskError(f"{role} mask: {exc.message}", path) from None
    if (height, width) != tuple(image_hw):
        raise BadMaskError(
            f"{role} mask is {width}x{height} but its image {image_path} is "
            f"{image_hw[1]}x{image_hw[0]} (width x height)", path)
    if not png_is_complete(data):
        raise BadMaskError(f"truncated {role} mask (no IEND chunk or bad chunk CRC)", path)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadMaskError(f"cannot decode {role} mask (corrupt PNG)", path)
    if img.dtype != np.uint8:
        raise BadMaskError(f"{role} mask has {img.dtype} pixels; expected 8-bit RGB", path)
    if img.ndim == 2 or img.shape[2] < 3:
        raise BadMaskError(f"{role} mask is greyscale; expected 8-bit RGB", path)
    return colour_values(img[:, :, :3])


@dataclass(frozen=True)
class IsaidScene:
    """A decoded scene: RGB image and, for labelled splits, its id and colour value maps."""

    name: str
    split: str
    image: np.ndarray
    ids: Optional[np.ndarray]
    colours: Optional[np.ndarray]
    colour_file: str


def load_scene(name: str, split: str, image_path: Path, id_mask: Optional[Path],
               colour_mask: Optional[Path], max_pixels: int) -> IsaidScene:
    """Decode and check a whole scene before any tile is cut (so a bad scene yields nothing).

    Masks are None for image-only splits (iSAID test)."""
    try:
        data = Path(image_path).read_bytes()
    except FileNotFoundError:
        raise BadImageError("file not found", image_path) from None
    image = decode_image(data, image_path, max_pixels)
    hw = image.shape[:2]
    ids = colours = None
    if id_mask is not None or colour_mask is not None:
        if id_mask is None or colour_mask is None:
            missing = mask_paths(Path(image_path))[0 if id_mask is None else 1]
            raise BadMaskError(f"missing mask for {Path(image_path).name}", missing)
        ids = read_mask(id_mask, "instance id", image_path, hw)
        colours = read_mask(colour_mask, "instance colour", image_path, hw)
    return IsaidScene(name=name, split=split, image=image, ids=ids, colours=colours,
                      colour_file=str(colour_mask) if colour_mask is not None else "")


# ---- instances -------------------------------------------------------------------------------

def colour_name(value: int) -> str:
    """'R,G,B' of a colour value (how unknown colours are reported)."""
    return f"{value & 255},{(value >> 8) & 255},{value >> 16}"


def unknown_colours(scene: IsaidScene) -> dict[str, int]:
    """Colours under instance pixels that are neither in the palette nor 'unlabeled', with
    their pixel counts over the whole scene (reported per colour file, never silently)."""
    if scene.ids is None:
        return {}
    under = scene.colours[scene.ids >= MIN_INSTANCE_ID]
    allowed = np.array(sorted({UNLABELED, *ISAID_COLOUR_TO_CATEGORY}), dtype=np.int32)
    stray = under[~np.isin(under, allowed, kind="table")]  # one pass, no sort: usually empty
    values, counts = np.unique(stray, return_counts=True)
    return {colour_name(int(v)): int(c) for v, c in zip(values, counts)}


def run_length_rle(lin: np.ndarray, height: int, width: int) -> RLE:
    """COCO RLE of the pixels at sorted column-major indices `lin` in a height x width frame
    (the same string pycocotools' encode gives for the full mask)."""
    total = height * width
    breaks = np.flatnonzero(np.diff(lin) != 1)
    starts = np.concatenate(([lin[0]], lin[breaks + 1]))
    ends = np.concatenate((lin[breaks], [lin[-1]])) + 1
    counts = np.empty(2 * len(starts), dtype=np.int64)
    counts[0::2] = starts - np.concatenate(([0], ends[:-1]))
    counts[1::2] = ends - starts
    if ends[-1] < total:
        counts = np.append(counts, total - ends[-1])
    return RLE(size=[height, width], counts=counts_string(counts))


def tile_instances(ids: np.ndarray, colours: np.ndarray, params: PrepareParams,
                   colour_file: str, dropped: Counter) -> list[ObjectInstance]:
    """Instances of one tile from its cropped id and colour maps, by the devkit's rules.

    Instances come out sorted by id. Dropped ones are counted in `dropped` by reason; an
    instance whose category colour is outside the palette raises BadMaskError, or is dropped
    when `params.on_error` is 'skip'.
    """
    height, width = ids.shape
    total = height * width
    rows, cols = np.nonzero(ids >= MIN_INSTANCE_ID)
    if rows.size == 0:
        return []
    # One sort orders pixels by instance id, then column-major (the RLE's order).
    keys = ids[rows, cols].astype(np.int64) * total + (cols.astype(np.int64) * height + rows)
    keys.sort()
    inst = keys // total
    lin = keys - inst * total
    cols = lin // height
    rows = lin - cols * height
    starts = np.concatenate(([0], np.flatnonzero(np.diff(inst)) + 1))
    ends = np.concatenate((starts[1:], [inst.size]))
    category_values = np.minimum.reduceat(colours[rows, cols], starts)
    x_min, x_max = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts)
    y_min, y_max = np.minimum.reduceat(rows, starts), np.maximum.reduceat(rows, starts)

    objects = []
    for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        value = int(category_values[k])
        category = ISAID_COLOUR_TO_CATEGORY.get(value)
        if category is None:
            if value == UNLABELED:
                dropped[DROP_UNLABELED] += 1
                continue
            if params.on_error == "raise":
                raise BadMaskError(
                    f"colour ({colour_name(value)}) under instance {int(inst[s])} is not in the "
                    f"iSAID palette", colour_file)
            dropped[DROP_UNKNOWN_COLOUR] += 1
            continue
        x0, x1, y0, y1 = int(x_min[k]), int(x_max[k]), int(y_min[k]), int(y_max[k])
        # Crop padded by one pixel except where the instance touches the tile's edge, so the
        # contours are those of the full tile mask.
        cy0, cx0 = max(y0 - 1, 0), max(x0 - 1, 0)
        crop = np.zeros((min(y1 + 2, height) - cy0, min(x1 + 2, width) - cx0), np.uint8)
        crop[rows[s:e] - cy0, cols[s:e] - cx0] = 1
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            dropped[DROP_NO_CONTOUR] += 1
            continue
        if min(len(c) for c in contours) <= params.min_contour_points:
            dropped[DROP_SMALL_CONTOUR] += 1
            continue
        area = e - s
        if area <= params.min_instance_area:
            dropped[DROP_SMALL_AREA] += 1
            continue
        objects.append(ObjectInstance(
            object_id=int(inst[s]), category=category,
            category_id=ISAID_CATEGORY_IDS[category],
            bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)], area=area,
            mask=run_length_rle(lin[s:e], height, width)))
    return objects


def iter_tiles(scene: IsaidScene, params: PrepareParams, dropped: Counter) -> Iterator[Tile]:
    """The scene's tiles in devkit order, each with its PNG bytes and instances."""
    height, width = scene.image.shape[:2]
    for tile_id, w in tile_layout(scene.name, height, width, params.tile_size, params.stride):
        png = encode_png(scene.image[w.y0:w.y1, w.x0:w.x1], params.png_compression)
        objects = []
        if scene.ids is not None:
            objects = tile_instances(scene.ids[w.y0:w.y1, w.x0:w.x1],
                                     scene.colours[w.y0:w.y1, w.x0:w.x1], params,
                                     scene.colour_file, dropped)
        yield Tile(tile_id=tile_id, source=SOURCE, split=scene.split, image_name=scene.name,
                   window=w, height=w.height, width=w.width, image_png=png,
                   image_sha256=sha256(png), objects=objects)
