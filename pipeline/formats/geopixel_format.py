"""GeoPixel's released training format: read it into records, write records into it.

The layout (what the GeoPixel repository's loader reads, relative to its working directory):

    {prefix}/GeoPixelD.json           training list: [{"id", "conversations", "image", "polygons"}]
    {prefix}/GeoPixelD_{folder}.json  the same list for every other layout folder (e.g. test)
    {prefix}/{folder}/{tile}.png      the tile image
    {prefix}/{folder}/{tile}.json     {"id", "img", "gcg_description", "polygons"}
    data.txt                          "{prefix}/GeoPixelD.json <samples in thousands>"

`prefix` is `export.geopixel_prefix` (release: "data/GeoPixelD"); `folder` is
`export.split_names[split]`. Copy the exported folder to `<GeoPixel>/{prefix}/` and data.txt to
`<GeoPixel>/data.txt`. The samples in thousands are written so that GeoPixel's
`int(float(k) * 1000)` (its `--given_num True` reading) gives back exactly the sample count:
three decimals, or four ending in 5 (half a sample) where float rounding would lose one.

`polygons[i]` holds the polygons of the i-th [SEG]: the outer contours
(`pipeline.geometry.masks.contours`, integer [x, y] points) of each of its member instances'
masks in turn, in the phrase's `object_ids` order (an instance in several parts gives several),
so that touching instances of a group stay apart; a phrase whose members are not in the tile, or
do not make up its mask, gets its mask's contours (`pipeline.geometry.masks.member_masks`). The
loader fills each polygon with `cv2.fillPoly` and ORs them, giving back the phrase's mask except
that holes are lost (a ring comes back filled); contours of one or two points are kept, since
fillPoly draws them as a pixel or a line. The human turn of each list entry is the record's
instruction (`ExportParams.instruction_for`).

Reading (`read_geopixel`) accepts the released list and the inline alternative
`"segmentation": [COCO RLE, ...]`. A path in the list is looked up first under `root` as written
(absolute paths as they are), then under the list's own folder with the leading `{prefix}/`
stripped, so both `<GeoPixel repo>` and a copy of the release folder work as `root`. The
release names no instances: every polygon (or, for RLE masks, every connected component)
becomes one instance, its category guessed from the phrase text ("tennis court-2" ->
tennis_court), and a phrase with more than one instance is a cluster.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline import __version__ as PIPELINE_VERSION
from pipeline.core.errors import (
    BadAnnotationError,
    BadImageError,
    BadParamsError,
    BadRecordError,
    DuplicateNameError,
)
from pipeline.core.imaging import PNG_SIGNATURE, decode_image, encode_png, sha256
from pipeline.core.params import ExportParams, PrepareParams
from pipeline.core.shards import atomic_path, safe_join, safe_name
from pipeline.core.user_files import read_user_json
from pipeline.geometry import checks as geometry
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_PALETTE, plural, readable
from schemas import RLE, SEG, GroundedRecord, ObjectInstance, Phrase, Provenance, Tile, Window

PHRASE_RE = re.compile(r"<p>\s*(.*?)\s*</p>\s*\[SEG\]", re.S)
NUMBER_SUFFIX_RE = re.compile(r"\s*-\s*\d+$")
DEVKIT_TILE_RE = re.compile(r"^(?P<image>.+)_(?P<y0>\d+)_(?P<y1>\d+)_(?P<x0>\d+)_(?P<x1>\d+)$")
TRAIN_LIST = "GeoPixelD.json"
RELEASE_BACKEND = "geopixeld-release"
RELEASE_SOURCE = "geopixeld"
HUMAN_ROLES = {"human", "user"}
# instances (polygons, or connected components of RLE masks) one sample may have: each is a
# tile-sized mask while it is read; a released cluster has tens to a few hundred
MAX_PARTS = 4096


# ---------------------------------------------------------------------------------------------
# Writing

def layout_folder(split: str, export: ExportParams) -> str:
    """The GeoPixel layout folder of a split (`export.split_names`)."""
    if split not in export.split_names:
        raise BadParamsError(f"export.split_names has no folder for split {split!r}",
                             export.where("split_names"))
    return safe_name(export.split_names[split], "export.split_names folder")


def list_name(folder: str, export: ExportParams) -> str:
    """File name of the list that holds a folder's samples."""
    return TRAIN_LIST if folder == export.geopixel_train_folder else f"GeoPixelD_{folder}.json"


def samples_in_thousands(count: int) -> str:
    """`count` in thousands, written so that `int(float(k) * 1000) == count` (GeoPixel's read)."""
    text = f"{count / 1000:.3f}"
    if int(float(text) * 1000) != count:
        text = f"{(count + 0.5) / 1000:.4f}"
    return text


def phrase_polygons(mask: RLE, object_ids: Sequence[int],
                    instance_masks: Mapping[int, RLE]) -> list[list[np.ndarray]]:
    """The polygons of a phrase's [SEG] (its `mask`, its members `object_ids`), per member
    instance in `object_ids` order: each member's outer contours (a single list, its mask's
    contours, when the members cannot be used: `masks.member_masks`). `instance_masks` maps the
    tile's object ids to their masks."""
    members = [instance_masks.get(i) for i in object_ids]
    return [masks.rle_contours(m) for m in masks.member_masks(mask, members)]


def sample_json(sample_id: int, image: str, record: GroundedRecord,
                instance_masks: Optional[Mapping[int, RLE]] = None) -> str:
    """A per-tile polygon file's text, as the release writes it (`json.dumps` of id, img,
    gcg_description, polygons), the polygons written straight from the contour arrays: per
    [SEG], its members' polygons one after another (`phrase_polygons`; without
    `instance_masks`, the outline of each phrase's mask)."""
    head = json.dumps({"id": sample_id, "img": image, "gcg_description": record.caption})
    polygons = masks.polygons_json([
        [poly for member in phrase_polygons(p.mask, p.object_ids, instance_masks or {})
         for poly in member]
        for p in record.phrases])
    return f'{head[:-1]}, "polygons": {polygons}}}'


def _prefix(export: ExportParams) -> str:
    prefix = export.geopixel_prefix.strip().rstrip("/")
    if not prefix or any(c.isspace() for c in prefix):
        raise BadParamsError(f"export.geopixel_prefix {export.geopixel_prefix!r} must be a "
                             "non-empty path without spaces (data.txt is split on spaces)",
                             export.where("geopixel_prefix"))
    return prefix


def check_record(record: GroundedRecord, tile_id: str, height: int, width: int) -> None:
    """The loader contract (one mask of the tile's size per [SEG]), checked before writing."""
    if record.tile_id != tile_id:
        raise BadRecordError(f"record {record.record_id} names tile {record.tile_id!r}, "
                             f"paired with tile {tile_id!r}")
    if record.caption.count(SEG) != len(record.phrases):
        raise BadRecordError(f"record {record.record_id}: {record.caption.count(SEG)} [SEG] "
                             f"tokens but {len(record.phrases)} phrases")
    for phrase in record.phrases:
        if list(phrase.mask.size) != [height, width]:
            raise BadRecordError(f"record {record.record_id}: mask of {phrase.text!r} is "
                                 f"{phrase.mask.size}, tile is {[height, width]}")


def _dump(path: Path, payload: object, indent: int | None = None) -> None:
    """JSON as the release writes it (key order kept, ASCII, so any locale's open() reads it)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=indent) + ("\n" if indent else ""),
                       encoding="ascii")


class InstanceMask(Protocol):
    """What a sample needs of an instance (an `ObjectInstance`, or a lighter row)."""

    object_id: int
    mask: RLE


class TileImage(Protocol):
    """What a sample needs of its tile (a `Tile`, or a row read without validation)."""

    tile_id: str
    height: int
    width: int
    image_png: bytes
    objects: Sequence[InstanceMask]


def _write(path: Path, data: bytes, atomic: bool) -> None:
    if not atomic:
        path.write_bytes(data)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_geopixel_samples(pairs: Iterable[tuple[GroundedRecord, TileImage]], out_dir: Path,
                           export: ExportParams, first_ids: Mapping[str, int] | None = None,
                           atomic: bool = True) -> dict[str, list[dict]]:
    """Write each pair's `<folder>/<tile>.png|.json`; return the list items, by folder.

    Ids count from `first_ids[folder]` (0 by default) in the order of `pairs`, so a stage that
    writes shard by shard passes each shard's offset and gets the ids of one whole-set write.
    Each file is written atomically unless `atomic` is False (for a caller whose whole output
    folder is staged and swapped in at once).
    """
    prefix = _prefix(export)
    next_id = defaultdict(int, first_ids or {})
    items: dict[str, list[dict]] = defaultdict(list)
    pairs = list(pairs)
    seen: set[tuple[str, str]] = set()
    for record, tile in pairs:  # validate all before writing any
        check_record(record, tile.tile_id, tile.height, tile.width)
        key = (layout_folder(record.split, export), safe_name(tile.tile_id, "tile id"))
        if key in seen:
            raise DuplicateNameError(f"two records for tile {tile.tile_id!r} in GeoPixel "
                                     f"folder {key[0]!r} (one polygon file per tile)")
        seen.add(key)
    for record, tile in pairs:
        folder = layout_folder(record.split, export)
        folder_dir = Path(out_dir) / folder
        name = safe_name(tile.tile_id, "tile id")
        png_path = safe_join(folder_dir, f"{name}.png")
        json_path = safe_join(folder_dir, f"{name}.json")
        image = f"{prefix}/{folder}/{name}.png"
        sample_id = next_id[folder]
        next_id[folder] += 1
        folder_dir.mkdir(parents=True, exist_ok=True)
        _write(png_path, tile.image_png, atomic)
        instance_masks = {o.object_id: o.mask for o in tile.objects}
        _write(json_path, sample_json(sample_id, image, record, instance_masks).encode("ascii"),
               atomic)
        items[folder].append({
            "id": sample_id,
            "conversations": [{"from": "human",
                               "value": export.instruction_for(record.record_id).text},
                              {"from": "bot", "value": record.caption}],
            "image": image,
            "polygons": f"{prefix}/{folder}/{name}.json",
        })
    return dict(items)


def write_geopixel_lists(items: Mapping[str, Sequence[dict]], out_dir: Path,
                         export: ExportParams) -> dict[str, int]:
    """Write GeoPixelD.json (always, maybe empty), one list per other folder, and data.txt."""
    prefix = _prefix(export)
    counts: dict[str, int] = {}
    folders = sorted(set(items) | {export.geopixel_train_folder})
    for folder in folders:
        entries = sorted(items.get(folder, []), key=lambda e: e["id"])
        name = list_name(folder, export)
        _dump(safe_join(Path(out_dir), name), entries, indent=4)
        counts[name] = len(entries)
    train = counts[TRAIN_LIST]
    lines = f"{prefix}/{TRAIN_LIST} {samples_in_thousands(train)}\n" if train else ""
    with atomic_path(Path(out_dir) / "data.txt") as tmp:
        tmp.write_text(lines, encoding="ascii")
    return counts


def write_geopixel(pairs: Iterable[tuple[GroundedRecord, Tile]], out_dir: Path,
                   export: ExportParams) -> dict[str, int]:
    """Write records and their tiles as a complete GeoPixel layout; sample count per list."""
    items = write_geopixel_samples(pairs, out_dir, export)
    return write_geopixel_lists(items, out_dir, export)


# ---------------------------------------------------------------------------------------------
# Reading

def guess_category(text: str) -> str:
    """Category of a released phrase: 'tennis court-2' -> 'tennis_court'; unknown: the text."""
    name = NUMBER_SUFFIX_RE.sub("", text).strip().lower()
    for category in ISAID_PALETTE:
        if name in (readable(category), plural(category)):
            return category
    return name


def resolve_path(written: str, json_list_path: Path, root: Path,
                 export: ExportParams) -> Path:
    """A path from the list: under `root` as written, else under the list's folder minus prefix."""
    path = Path(written)
    first = path if path.is_absolute() else Path(root) / path
    if first.exists():
        return first
    prefix = _prefix(export) + "/"
    rest = written[len(prefix):] if written.startswith(prefix) else written
    second = Path(json_list_path).parent / rest
    if second.exists():
        return second
    raise BadAnnotationError(f"{written!r} not found (tried {first} and {second})",
                             json_list_path)


def _tile_png(data: bytes, path: Path, max_pixels: int,
              compression: int) -> tuple[bytes, int, int]:
    """The image as an 8-bit RGB PNG (kept as is when it already is one), height, width."""
    rgb = decode_image(data, path, max_pixels)
    height, width = rgb.shape[:2]
    if data[:8] == PNG_SIGNATURE and data[24] == 8 and data[25] == 2:
        return data, height, width
    return encode_png(rgb, compression), height, width


def _polygon_masks(polygons: object, height: int, width: int,
                   path: Path) -> list[list[RLE]]:
    """Per [SEG], one filled mask per polygon (GeoPixel fills each polygon on its own)."""
    if not isinstance(polygons, list):
        raise BadAnnotationError("'polygons' must be a list (one entry per [SEG])", path)
    if not all(isinstance(seg, list) for seg in polygons):
        i = next(i for i, seg in enumerate(polygons) if not isinstance(seg, list))
        raise BadAnnotationError(f"polygons[{i}] must be a list of polygons", path)
    _check_parts(sum(map(len, polygons)), "polygons", path)
    per_seg = []
    for i, seg in enumerate(polygons):
        # checked (finite numbers, [x, y] points) and clipped to the tile's frame by
        # pipeline.geometry.checks, then filled as GeoPixel's loader fills it
        per_seg.append([masks.encode(geometry.fill_polygon(poly, height, width,
                                                           f"polygons[{i}][{j}]", path))
                        for j, poly in enumerate(seg)])
    return per_seg


def _check_parts(count: int, what: str, path: Path) -> None:
    if count > MAX_PARTS:
        raise BadAnnotationError(f"{count} {what} in one sample, more than the {MAX_PARTS} "
                                 "instances a sample may have", path)


def _rle_masks(segmentation: object, height: int, width: int,
               path: Path) -> list[list[RLE]]:
    """Per [SEG], one mask per connected component of its inline COCO RLE."""
    if not isinstance(segmentation, list):
        raise BadAnnotationError("'segmentation' must be a list of COCO RLE masks", path)
    per_seg, parts = [], 0
    for i, rle in enumerate(segmentation):
        # size of the image, counts covering it exactly (pipeline.geometry.checks) before decoding
        checked = geometry.check_rle(rle, height, width, f"segmentation[{i}]", path)
        mask = mask_utils.decode(geometry.coco_rle(checked, height, width))
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        parts += count - 1
        _check_parts(parts, "connected components", path)
        per_seg.append([masks.encode((labels == k).astype(np.uint8))
                        for k in range(1, count)])
    return per_seg


def _window(tile_id: str, height: int, width: int) -> tuple[str, Window]:
    """Source image and window from a devkit tile name, else the whole tile."""
    m = DEVKIT_TILE_RE.match(tile_id)
    if m:
        y0, y1, x0, x1 = (int(m.group(k)) for k in ("y0", "y1", "x0", "x1"))
        if (y1 - y0, x1 - x0) == (height, width):
            return m.group("image"), Window(y0=y0, y1=y1, x0=x0, x1=x1)
    return tile_id, Window(y0=0, y1=height, x0=0, x1=width)


def _split_of(folder: str, export: ExportParams) -> str:
    for split, name in sorted(export.split_names.items()):
        if name == folder:
            return split
    return folder


def _read_item(item: object, index: int, json_list_path: Path, root: Path,
               export: ExportParams, max_pixels: int,
               compression: int) -> tuple[GroundedRecord, Tile]:
    where = f"item {index}"
    if not isinstance(item, dict) or "conversations" not in item or "image" not in item:
        raise BadAnnotationError(f"{where} needs 'conversations' and 'image'", json_list_path)
    turns = item["conversations"]
    if not (isinstance(turns, list) and all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)):
        raise BadAnnotationError(f"{where}: 'conversations' must be a list of "
                                 "{'from', 'value'} turns", json_list_path)
    answers = [t["value"] for t in turns if str(t.get("from", "")).lower() not in HUMAN_ROLES]
    if len(answers) != 1:
        raise BadAnnotationError(f"{where}: expected one bot turn, found {len(answers)}",
                                 json_list_path)
    caption = answers[0].strip()
    seg_count = sum(t["value"].count(SEG) for t in turns)

    image_path = resolve_path(str(item["image"]), json_list_path, root, export)
    try:
        data = image_path.read_bytes()
    except OSError:
        raise BadImageError("cannot read image", image_path) from None
    png, height, width = _tile_png(data, image_path, max_pixels, compression)

    if "polygons" in item:
        mask_file = resolve_path(str(item["polygons"]), json_list_path, root, export)
        payload = read_user_json(mask_file, "polygon file")
        if not isinstance(payload, dict) or "polygons" not in payload:
            found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise BadAnnotationError(f"no key 'polygons' (GeoPixel's loader reads 'polygons'; "
                                     f"found {found})", mask_file)
        per_seg = _polygon_masks(payload["polygons"], height, width, mask_file)
    elif "segmentation" in item:
        mask_file = json_list_path
        per_seg = _rle_masks(item["segmentation"], height, width, json_list_path)
    else:
        keys = sorted(item)
        hint = " ('polygon' must be spelled 'polygons')" if "polygon" in item else ""
        raise BadAnnotationError(f"{where} has neither 'polygons' nor 'segmentation' "
                                 f"(keys {keys}){hint}", json_list_path)
    if len(per_seg) != seg_count:
        raise BadAnnotationError(f"{len(per_seg)} masks for {seg_count} [SEG] tokens "
                                 f"({where}, {image_path.name})", mask_file)
    texts = PHRASE_RE.findall(caption)
    if len(texts) != caption.count(SEG):
        raise BadAnnotationError(f"{where}: {caption.count(SEG)} [SEG] tokens but "
                                 f"{len(texts)} '<p> phrase </p> [SEG]' groups", json_list_path)

    tile_id = safe_name(image_path.stem, "tile id")
    split = _split_of(image_path.parent.name, export)
    objects: list[ObjectInstance] = []
    phrases: list[Phrase] = []
    for text, parts in zip(texts, per_seg):
        category = guess_category(text)
        ids = []
        union = np.zeros((height, width), np.uint8)
        for rle in parts:  # parts are kept as RLE: one tile-sized mask at a time
            ids.append(len(objects) + 1)
            objects.append(ObjectInstance(object_id=ids[-1], category=category,
                                          bbox=masks.bbox(rle), area=masks.area(rle), mask=rle))
            union |= masks.decode(rle)
        phrases.append(Phrase(text=text, kind="cluster" if len(parts) > 1 else "instance",
                              category=category, object_ids=ids, mask=masks.encode(union)))
    image_name, window = _window(tile_id, height, width)
    tile = Tile(tile_id=tile_id, source=RELEASE_SOURCE, split=split, image_name=image_name,
                window=window, height=height, width=width, image_png=png,
                image_sha256=sha256(png), objects=objects)
    record = GroundedRecord(
        record_id=tile_id, tile_id=tile_id, split=split, caption=caption, phrases=phrases,
        provenance=Provenance(backend=RELEASE_BACKEND, model="unknown", prompt_versions=[],
                              params_hash="none", pipeline_version=PIPELINE_VERSION))
    return record, tile


def read_geopixel(json_list_path: Path, root: Path, *, export: ExportParams | None = None,
                  max_pixels: int | None = None) -> list[tuple[GroundedRecord, Tile]]:
    """Read a GeoPixel training list and its images and masks into (record, tile) pairs.

    The i-th [SEG] owns the i-th mask, as GeoPixel's loader asserts; a list or polygon file
    that breaks that contract raises BadAnnotationError naming the file. The split is the
    one `export.split_names` maps to the image's folder (else the folder name).
    """
    export = export or ExportParams()
    prepare = PrepareParams()
    max_pixels = max_pixels or prepare.max_image_pixels
    json_list_path = Path(json_list_path)
    items = read_user_json(json_list_path, "GeoPixel list")
    if not isinstance(items, list):
        raise BadAnnotationError("a GeoPixel list must be a JSON array of samples",
                                 json_list_path)
    return [_read_item(item, i, json_list_path, Path(root), export, max_pixels,
                       prepare.png_compression) for i, item in enumerate(items)]
