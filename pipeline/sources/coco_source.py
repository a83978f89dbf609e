"""COCO source adapter: any COCO instance-segmentation json plus its image folder -> tiles.

One scene per COCO image, cut with the devkit's windows (pipeline.sources.isaid.tile_layout); each
instance mask (polygons, compressed or uncompressed RLE, rasterised by pycocotools as COCO
does) is cropped to every tile it reaches. Category = the COCO category name, object id = the
annotation id. The json is checked whole when it is read (`pipeline.geometry.checks`: typed ids and
names, finite coordinates, polygons clipped to the image's frame, RLE of the image's size): a
malformed file stops with one BadAnnotationError naming it and the offending entry.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.core.errors import BadAnnotationError, BadImageError, DuplicateNameError
from pipeline.core.imaging import decode_image, encode_png, image_size, sha256
from pipeline.core.params import PrepareParams
from pipeline.core.user_files import read_user_json
from pipeline.geometry import checks as geometry
from pipeline.sources.isaid import natural_key, run_length_rle, tile_layout
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
    category_id: int
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


def read_coco(path: Path) -> list[CocoImage]:
    """Read and check a COCO instances json; images in natural order of their file names."""
    path = Path(path)
    raw = read_user_json(path, "COCO json")
    if not isinstance(raw, dict):
        raise BadAnnotationError("top level is not an object", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise BadAnnotationError(f"'{key}' missing or not a list", path)

    categories: dict[int, str] = {}
    for i, cat in enumerate(raw["categories"]):
        if not (isinstance(cat, dict) and geometry.is_int(cat.get("id"))):
            raise BadAnnotationError(f"categories[{i}] needs an integer id and a name", path)
        geometry.category_name(cat.get("name"), f"categories[{i}]", path, what="name")
        if cat["id"] in categories:
            raise BadAnnotationError(f"category id {cat['id']} appears twice", path)
        categories[cat["id"]] = cat["name"]

    images: dict[int, dict] = {}
    stems: dict[str, str] = {}
    for i, img in enumerate(raw["images"]):
        if not (isinstance(img, dict) and geometry.is_int(img.get("id"))
                and isinstance(img.get("file_name"), str) and img["file_name"]
                and geometry.is_int(img.get("height")) and geometry.is_int(img.get("width"))
                and img["height"] > 0 and img["width"] > 0):
            raise BadAnnotationError(
                f"images[{i}] needs an integer id, a file_name and positive height/width", path)
        geometry.frame_size(img["height"], img["width"], f"images[{i}]", path)
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
        if not isinstance(ann, dict):
            raise BadAnnotationError(f"annotations[{i}] is not an object", path)
        geometry.object_id(ann.get("id"), f"annotations[{i}]", path)
        where = f"annotation {ann['id']}"
        if ann["id"] in seen:
            raise BadAnnotationError(f"{where} appears twice", path)
        seen.add(ann["id"])
        for key, known, what in (("image_id", images, "an image"),
                                 ("category_id", categories, "a category")):
            value = ann.get(key)
            if not geometry.is_int(value):
                raise BadAnnotationError(f"{where}: {key} must be an integer, not "
                                         f"{geometry.kind_of(value)}", path)
            if value not in known:
                raise BadAnnotationError(f"{where}: {key} {geometry.short_int(value)} is not "
                                         f"{what} of this file", path)
        img = images[ann["image_id"]]
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):  # True/False are 1/0
            raise BadAnnotationError(f"{where}: iscrowd must be 0 or 1", path)
        if ann.get("bbox") is not None:  # unused (boxes are measured), checked all the same
            geometry.check_bbox(ann["bbox"], where, path)
        segmentation = geometry.coco_segmentation(ann.get("segmentation"), img["height"],
                                                  img["width"], where, path)
        per_image[img["id"]].append(CocoAnnotation(
            object_id=ann["id"], category=categories[ann["category_id"]],
            category_id=ann["category_id"], segmentation=segmentation, iscrowd=bool(crowd)))

    out = [CocoImage(image_id=k, file_name=img["file_name"], height=img["height"],
                     width=img["width"],
                     annotations=tuple(sorted(per_image[k], key=lambda a: a.object_id)))
           for k, img in images.items()]
    return sorted(out, key=lambda c: natural_key(Path(c.file_name).stem))


def annotation_mask(ann: CocoAnnotation, height: int, width: int, path: Path) -> np.ndarray:
    """Full-image binary mask of an annotation (checked and clipped by `read_coco`),
    rasterised by pycocotools."""
    try:
        return mask_utils.decode(geometry.coco_rle(ann.segmentation, height, width))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadAnnotationError(f"annotation {ann.object_id}: cannot decode its mask "
                                 f"({exc})", path) from None


@dataclass(frozen=True)
class InstanceCrop:
    """An instance's pixels within its bounding box (image frame offset y0, x0)."""

    object_id: int
    category: str
    category_id: int
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
        crops.append(InstanceCrop(ann.object_id, ann.category, ann.category_id, int(y0), int(x0),
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
                object_id=inst.object_id, category=inst.category, category_id=inst.category_id,
                bbox=[float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                      float(rows.max() - rows.min() + 1)],
                area=int(rows.size), mask=run_length_rle(lin, w.height, w.width)))
        yield Tile(tile_id=tile_id, source=SOURCE, split=scene.split, image_name=scene.name,
                   window=w, height=w.height, width=w.width, image_png=png,
                   image_sha256=sha256(png), objects=objects)
