"""COCO source adapter: any COCO instance-segmentation json plus its image folder -> tiles.

One scene per COCO image, cut with the devkit's windows (pipeline.isaid.tile_layout); each
instance mask (polygons, compressed or uncompressed RLE, rasterised by pycocotools as COCO
does) is cropped to every tile it reaches. Category = the COCO category name, object id = the
annotation id. The json is checked whole when it is read: a malformed file stops with one
BadAnnotationError naming it and the offending entry.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from pipeline import masks
from pipeline.errors import BadAnnotationError, BadImageError, DuplicateNameError
from pipeline.imaging import decode_image, encode_png, image_size, sha256
from pipeline.isaid import natural_key, run_length_rle, tile_layout
from pipeline.params import PrepareParams
from pipeline.shards import read_json
from schemas import ObjectInstance, Tile

SOURCE = "coco"
DROP_CROWD = "crowd"
DROP_EMPTY_MASK = "empty_mask"
DROP_SMALL_AREA = "small_area"


@dataclass(frozen=True)
class CocoAnnotation:
    """One annotation as the json gives it (segmentation already checked)."""

    object_id: int
    category: str
    segmentation: Any
    iscrowd: bool


@dataclass(frozen=True)
class CocoImage:
    """One COCO image entry and its annotations, sorted by annotation id."""

    image_id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[CocoAnnotation, ...]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string, or None if it is malformed."""
    try:
        return masks.run_lengths(text).tolist()
    except ValueError:
        return None


def _check_segmentation(seg: object, height: int, width: int, where: str, path: Path) -> None:
    """Polygons (lists of >= 3 [x, y] points, flattened) or an RLE of the image's size."""
    if isinstance(seg, list):
        if not seg:
            raise BadAnnotationError(f"{where}: empty segmentation", path)
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise BadAnnotationError(f"{where}: a polygon is not a list of numbers", path)
            if len(poly) % 2 or len(poly) < 6:
                raise BadAnnotationError(
                    f"{where}: polygon with {len(poly)} coordinates (needs an even count, "
                    f"at least 3 points)", path)
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise BadAnnotationError(f"{where}: RLE without a [height, width] size", path)
        if size != [height, width]:
            raise BadAnnotationError(
                f"{where}: RLE size {size} differs from its image's [{height}, {width}]", path)
        if isinstance(counts, str):
            counts = rle_string_counts(counts)
            if counts is None:
                raise BadAnnotationError(f"{where}: RLE counts string is malformed", path)
        if not (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts)):
            raise BadAnnotationError(f"{where}: RLE counts are neither a string nor a list of "
                                     f"non-negative integers", path)
        if sum(counts) != height * width:
            raise BadAnnotationError(
                f"{where}: RLE counts cover {sum(counts)} pixels, not height x width = "
                f"{height * width}", path)
        return
    raise BadAnnotationError(f"{where}: segmentation is neither polygons nor RLE", path)


def read_coco(path: Path) -> list[CocoImage]:
    """Read and check a COCO instances json; images in natural order of their file names."""
    path = Path(path)
    raw = read_json(path, "COCO json")
    if not isinstance(raw, dict):
        raise BadAnnotationError("top level is not an object", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise BadAnnotationError(f"'{key}' missing or not a list", path)

    categories: dict[int, str] = {}
    for i, cat in enumerate(raw["categories"]):
        if not (isinstance(cat, dict) and _is_int(cat.get("id"))
                and isinstance(cat.get("name"), str) and cat["name"].strip()):
            raise BadAnnotationError(f"categories[{i}] needs an integer id and a name", path)
        if cat["id"] in categories:
            raise BadAnnotationError(f"category id {cat['id']} appears twice", path)
        categories[cat["id"]] = cat["name"]

    images: dict[int, dict] = {}
    stems: dict[str, str] = {}
    for i, img in enumerate(raw["images"]):
        if not (isinstance(img, dict) and _is_int(img.get("id"))
                and isinstance(img.get("file_name"), str) and img["file_name"]
                and _is_int(img.get("height")) and _is_int(img.get("width"))
                and img["height"] > 0 and img["width"] > 0):
            raise BadAnnotationError(
                f"images[{i}] needs an integer id, a file_name and positive height/width", path)
        if img["id"] in images:
            raise BadAnnotationError(f"image id {img['id']} appears twice", path)
        stem = Path(img["file_name"]).stem
        if stem.lower() in stems:
            raise DuplicateNameError(
                f"images {stems[stem.lower()]!r} and {img['file_name']!r} give the same scene "
                f"name {stem!r}", path)
        stems[stem.lower()] = img["file_name"]
        images[img["id"]] = img

    per_image: dict[int, list[CocoAnnotation]] = {k: [] for k in images}
    seen: set[int] = set()
    for i, ann in enumerate(raw["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("id"))):
            raise BadAnnotationError(f"annotations[{i}] has no integer id", path)
        where = f"annotation {ann['id']}"
        if ann["id"] in seen:
            raise BadAnnotationError(f"{where} appears twice", path)
        seen.add(ann["id"])
        img = images.get(ann.get("image_id"))
        if img is None:
            raise BadAnnotationError(f"{where}: image_id {ann.get('image_id')!r} is not an "
                                     f"image of this file", path)
        if ann.get("category_id") not in categories:
            raise BadAnnotationError(f"{where}: category_id {ann.get('category_id')!r} is not "
                                     f"a category of this file", path)
        _check_segmentation(ann.get("segmentation"), img["height"], img["width"], where, path)
        per_image[img["id"]].append(CocoAnnotation(
            object_id=ann["id"], category=categories[ann["category_id"]],
            segmentation=ann["segmentation"], iscrowd=bool(ann.get("iscrowd", 0))))

    out = [CocoImage(image_id=k, file_name=img["file_name"], height=img["height"],
                     width=img["width"],
                     annotations=tuple(sorted(per_image[k], key=lambda a: a.object_id)))
           for k, img in images.items()]
    return sorted(out, key=lambda c: natural_key(Path(c.file_name).stem))


def annotation_mask(ann: CocoAnnotation, height: int, width: int, path: Path) -> np.ndarray:
    """Full-image binary mask of an annotation, rasterised by pycocotools."""
    seg = ann.segmentation
    try:
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")}
        return mask_utils.decode(rle)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadAnnotationError(f"annotation {ann.object_id}: cannot decode its mask "
                                 f"({exc})", path) from None


@dataclass(frozen=True)
class InstanceCrop:
    """An instance's pixels within its bounding box (image frame offset y0, x0)."""

    object_id: int
    category: str
    y0: int
    x0: int
    pixels: np.ndarray


@dataclass(frozen=True)
class CocoScene:
    name: str
    split: str
    image: np.ndarray
    instances: tuple[InstanceCrop, ...]
    dropped: dict[str, int]


def load_scene(name: str, split: str, image_path: Path, entry: CocoImage, json_path: Path,
               max_pixels: int) -> CocoScene:
    """Decode the image and rasterise every instance once (kept as bounding-box crops)."""
    try:
        data = Path(image_path).read_bytes()
    except FileNotFoundError:
        raise BadImageError("file not found", image_path) from None
    height, width = image_size(data, image_path)
    if (height, width) != (entry.height, entry.width):
        raise BadAnnotationError(
            f"image {image_path} is {width}x{height} but the json says "
            f"{entry.width}x{entry.height} (width x height)", json_path)
    image = decode_image(data, image_path, max_pixels)
    crops, dropped = [], Counter()
    for ann in entry.annotations:
        if ann.iscrowd:  # a crowd region is not an instance
            dropped[DROP_CROWD] += 1
            continue
        mask = annotation_mask(ann, height, width, json_path)
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            dropped[DROP_EMPTY_MASK] += 1
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crops.append(InstanceCrop(ann.object_id, ann.category, int(y0), int(x0),
                                  np.ascontiguousarray(mask[y0:y1, x0:x1])))
    return CocoScene(name=name, split=split, image=image, instances=tuple(crops),
                     dropped=dict(dropped))


def iter_tiles(scene: CocoScene, params: PrepareParams, dropped: Counter) -> Iterator[Tile]:
    """The scene's tiles, each with the instances that reach it (area filter applied)."""
    height, width = scene.image.shape[:2]
    dropped.update(scene.dropped)
    for tile_id, w in tile_layout(scene.name, height, width, params.tile_size, params.stride):
        png = encode_png(scene.image[w.y0:w.y1, w.x0:w.x1], params.png_compression)
        objects = []
        for inst in scene.instances:
            ch, cw = inst.pixels.shape
            y0, y1 = max(w.y0, inst.y0), min(w.y1, inst.y0 + ch)
            x0, x1 = max(w.x0, inst.x0), min(w.x1, inst.x0 + cw)
            if y0 >= y1 or x0 >= x1:
                continue
            rows, cols = np.nonzero(inst.pixels[y0 - inst.y0:y1 - inst.y0,
                                                x0 - inst.x0:x1 - inst.x0])
            if rows.size == 0:
                continue
            if rows.size <= params.min_instance_area:
                dropped[DROP_SMALL_AREA] += 1
                continue
            rows = rows + (y0 - w.y0)
            cols = cols + (x0 - w.x0)
            lin = np.sort(cols.astype(np.int64) * w.height + rows)
            objects.append(ObjectInstance(
                object_id=inst.object_id, category=inst.category,
                bbox=[float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                      float(rows.max() - rows.min() + 1)],
                area=int(rows.size), mask=run_length_rle(lin, w.height, w.width)))
        yield Tile(tile_id=tile_id, source=SOURCE, split=scene.split, image_name=scene.name,
                   window=w, height=w.height, width=w.width, image_png=png,
                   image_sha256=sha256(png), objects=objects)
