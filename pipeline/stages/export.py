"""Export: grounded records to Parquet (Hugging Face), COCO json and the GeoPixel layout.

    out/parquet/{split}-{i:05d}-of-{n:05d}.parquet   one row per record, `EXPORT_SCHEMA`
    out/coco/{split}.json                            pycocotools-loadable, plus "captions"
    out/geopixel/...                                 see `pipeline.formats.geopixel_format`
    out/report.json                                  counts

Parquet: at most `export.records_per_shard` rows per shard, records in input shard order.
`image` is a struct {bytes, path} and the schema metadata carries the `datasets` features, so
`load_dataset("parquet", data_files=...)` decodes it as an `Image()`. Masks are COCO RLE;
`masks[i]`, `phrase_polygons[i]`, `phrases[i]`, `phrase_kinds[i]`, `phrase_categories[i]` and
`object_ids[i]` belong to the i-th [SEG] of `caption`. `masks[i]` is the phrase's whole mask
(a group's: the union of its members); `phrase_polygons[i][j]` are the outer contours of member
`object_ids[i][j]` (polygons of [x, y] int32 points, as the GeoPixel layout writes them), so a
group's touching instances stay apart; a phrase whose members do not make up its mask has one
entry, its mask's contours (`pipeline.formats.geopixel_format.phrase_polygons`). `instruction`
is the human turn the record asks (also in the GeoPixel lists) and `instruction_id` names it:
"<list version>/<n>" of prompts/instructions, or "custom" (`ExportParams.instruction_for`).
`review` is unreviewed, accepted or edited (the review stage).

COCO: `images` are the tiles that have a record (`id`, `file_name` "<tile_id>.png", `width`,
`height`, `tile_id`); `annotations` are ALL instances of those tiles (`id` unique in the file,
`image_id`, `category_id`, `segmentation` as compressed RLE {size, counts}, `area`, `bbox`,
`iscrowd` 0, `object_id` = the source instance id); `categories` keep the ids the sources
give (`ObjectInstance.category_id`: iSAID's label ids 1 ship ... 15 Harbor, a COCO label
file's ids, a GeoJSON integer class); with iSAID's categories all 15 are listed, and any other
category name found, sorted, from 16 up (`pipeline.geometry.categories.category_ids`): an id
never depends on which categories a build holds, and all split files agree.
Extension, a top-level list pycocotools ignores:

    "captions": [{"image_id", "record_id", "caption", "review", "instruction", "instruction_id",
                  "phrases": [{"text", "kind", "category", "seg_index", "annotation_ids"}]}]

`seg_index` is the phrase's [SEG] position in `caption` (0-based); `annotation_ids` are the
annotations of its member instances, whose masks' union is the phrase's mask (one id for an
instance phrase, several for a cluster: one per member, in the phrase's `object_ids` order).

Every file's bytes depend on the inputs and parameters only (no timestamps, stable order).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__ as PIPELINE_VERSION
from pipeline.core.errors import (
    BadAnnotationError,
    BadRecordError,
    DuplicateNameError,
    EmptyInputError,
)
from pipeline.core.params import ExportParams, Params
from pipeline.core.shards import (
    SHARD_RE,
    atomic_path,
    list_shards,
    read_records,
    safe_name,
    shard_name,
    write_table,
)
from pipeline.core.stage import Stage
from pipeline.formats.geopixel_format import (
    SEG,
    check_record,
    layout_folder,
    phrase_polygons,
    write_geopixel_lists,
    write_geopixel_samples,
)
from pipeline.geometry.categories import CategoryIdConflict, category_ids
from schemas import RLE, SCHEMA_VERSION, GroundedRecord, Provenance, Tile, arrow_schema

# ---------------------------------------------------------------------------------------------
# The Parquet schema, and the `datasets` features that describe it.


def _nullable(dtype: pa.DataType) -> pa.DataType:
    """`dtype` with every nested field nullable, as `datasets` declares its own."""
    if pa.types.is_struct(dtype):
        return pa.struct([pa.field(f.name, _nullable(f.type)) for f in dtype])
    if pa.types.is_list(dtype):
        return pa.list_(_nullable(dtype.value_type))
    return dtype


IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
RLE_TYPE = _nullable(pa.struct(list(arrow_schema(RLE))))
PROVENANCE_TYPE = _nullable(pa.struct(list(arrow_schema(Provenance))))
# [x, y] point -> polygon -> polygons of one member instance -> members of one phrase
POLYGONS_TYPE = pa.list_(pa.list_(pa.list_(pa.list_(pa.int32()))))

_COLUMNS = pa.schema([
    pa.field("record_id", pa.string()),
    pa.field("tile_id", pa.string()),
    pa.field("split", pa.string()),
    pa.field("image", IMAGE_TYPE),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("instruction", pa.string()),
    pa.field("instruction_id", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("phrases", pa.list_(pa.string())),
    pa.field("phrase_kinds", pa.list_(pa.string())),
    pa.field("phrase_categories", pa.list_(pa.string())),
    pa.field("masks", pa.list_(RLE_TYPE)),
    pa.field("phrase_polygons", pa.list_(POLYGONS_TYPE)),
    pa.field("object_ids", pa.list_(pa.list_(pa.int64()))),
    pa.field("provenance", PROVENANCE_TYPE),
    pa.field("review", pa.string()),
])

_HF_VALUES = {pa.string(): "string", pa.int64(): "int64", pa.int32(): "int32",
              pa.binary(): "binary", pa.float64(): "float64", pa.bool_(): "bool"}


def hf_feature(dtype: pa.DataType) -> object:
    """The `datasets` feature (as its JSON) of an Arrow type.

    Written in the oldest spelling every `datasets` release reads: `Sequence` for lists of
    values, `[...]` for lists of structs, a plain dict for a struct.
    """
    if pa.types.is_struct(dtype):
        return {f.name: hf_feature(f.type) for f in dtype}
    if pa.types.is_list(dtype):
        inner = dtype.value_type
        if pa.types.is_struct(inner):
            return [hf_feature(inner)]
        return {"feature": hf_feature(inner), "_type": "Sequence"}
    return {"dtype": _HF_VALUES[dtype], "_type": "Value"}


def hf_features(schema: pa.Schema, images: tuple[str, ...] = ("image",)) -> dict:
    return {f.name: {"_type": "Image"} if f.name in images else hf_feature(f.type)
            for f in schema}


EXPORT_SCHEMA = _COLUMNS.with_metadata({
    # key order = column order: `datasets` builds its features in the order it reads
    b"huggingface": json.dumps({"info": {"features": hf_features(_COLUMNS)}}).encode(),
    b"geopixeld.schema_version": SCHEMA_VERSION.encode(),
    b"geopixeld.pipeline_version": PIPELINE_VERSION.encode(),
})


def _phrase_field(phrases: pa.Array, name: str) -> pa.ListArray:
    """One field of every record's phrases, still one list per record."""
    lengths = pc.list_value_length(phrases).fill_null(0).to_numpy()
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets),
                                    pc.struct_field(pc.list_flatten(phrases), name))


def _rle(row: dict) -> RLE:
    """An RLE of a shard row, as an earlier stage wrote and checked it (not validated again)."""
    return RLE.model_construct(size=row["size"], counts=row["counts"])


def polygon_column(records: pa.Table, tiles: pa.Table) -> pa.ListArray:
    """`phrase_polygons` of GroundedRecord rows (row i of `tiles`, with its `objects`, is record
    i's tile): per phrase, per member instance, its polygons of [x, y] points
    (`geopixel_format.phrase_polygons`), the contour arrays laid out as Arrow offsets."""
    points: list[np.ndarray] = []
    per_polygon, per_member, per_phrase, per_record = [], [], [], []
    for phrases, objects in zip(records.column("phrases").to_pylist(),
                                tiles.column("objects").to_pylist()):
        instance_masks = {o["object_id"]: _rle(o["mask"]) for o in objects}
        per_record.append(len(phrases))
        for phrase in phrases:
            members = phrase_polygons(_rle(phrase["mask"]), phrase["object_ids"], instance_masks)
            per_phrase.append(len(members))
            for polygons in members:
                per_member.append(len(polygons))
                per_polygon.extend(len(poly) for poly in polygons)
                points.extend(polygons)
    xy = (np.concatenate(points).astype(np.int32, copy=False).reshape(-1) if points
          else np.zeros(0, np.int32))
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, xy.size + 1, 2, dtype=np.int32)),
                                      pa.array(xy, pa.int32()))
    for counts in (per_polygon, per_member, per_phrase, per_record):
        offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64))).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), column)
    return column


def export_table(records: pa.Table, tiles: pa.Table, export: ExportParams) -> pa.Table:
    """Parquet rows (`EXPORT_SCHEMA`) of GroundedRecord rows and their tiles' rows (tile_id,
    image_png, width, height, objects; row i of `tiles` is record i's tile), built column by
    column: the image bytes are never turned into Python objects."""
    records, tiles = records.combine_chunks(), tiles.combine_chunks()
    phrases = records.column("phrases").chunk(0) if records.num_rows else pa.array(
        [], records.schema.field("phrases").type)
    tile_ids = records.column("tile_id").to_pylist()
    instructions = [export.instruction_for(r) for r in records.column("record_id").to_pylist()]
    image = pa.StructArray.from_arrays(
        [tiles.column("image_png").combine_chunks(), pa.array([f"{t}.png" for t in tile_ids])],
        fields=list(IMAGE_TYPE))
    columns = {
        "record_id": records.column("record_id"),
        "tile_id": records.column("tile_id"),
        "split": records.column("split"),
        "image": image,
        "width": tiles.column("width"),
        "height": tiles.column("height"),
        "instruction": pa.array([i.text for i in instructions], pa.string()),
        "instruction_id": pa.array([i.id for i in instructions], pa.string()),
        "caption": records.column("caption"),
        "phrases": _phrase_field(phrases, "text"),
        "phrase_kinds": _phrase_field(phrases, "kind"),
        "phrase_categories": _phrase_field(phrases, "category"),
        "masks": _phrase_field(phrases, "mask"),
        "phrase_polygons": polygon_column(records, tiles),
        "object_ids": _phrase_field(phrases, "object_ids"),
        "provenance": records.column("provenance"),
        "review": records.column("review"),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in EXPORT_SCHEMA],
                                schema=EXPORT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Shard tasks (top-level, picklable: they read their inputs and write their outputs).


@dataclass(frozen=True)
class InputShard:
    """One records shard, its aligned tiles shard, and where its records land."""

    records: Path
    tiles: Path
    split: str
    folder: str
    count: int
    first_id: int  # id of its first sample in its GeoPixel list


@dataclass(frozen=True)
class ParquetSlice:
    records: Path
    tiles: Path
    start: int
    stop: int


@dataclass(frozen=True)
class ParquetShard:
    split: str
    path: Path
    slices: tuple[ParquetSlice, ...]


class InstanceMask(NamedTuple):
    """What the GeoPixel files need of an instance (`geopixel_format.InstanceMask`)."""

    object_id: int
    mask: RLE


class TileImage(NamedTuple):
    """What the GeoPixel files need of a tile (`geopixel_format.TileImage`): its instances
    are read as plain rows, not validated again."""

    tile_id: str
    height: int
    width: int
    image_png: bytes
    objects: tuple[InstanceMask, ...]

    @classmethod
    def of_row(cls, row: dict) -> "TileImage":
        """From a tiles-shard row (tile_id, height, width, image_png, objects)."""
        return cls(row["tile_id"], row["height"], row["width"], row["image_png"],
                   tuple(InstanceMask(o["object_id"], _rle(o["mask"])) for o in row["objects"]))


def _tile_rows(records_path: Path, tiles_path: Path, tile_ids: Sequence[str],
               columns: Sequence[str]) -> pa.Table:
    """The rows of the tiles `tile_ids` names, in that order (only those tiles are read)."""
    if not tile_ids:
        return pq.read_table(tiles_path, schema=arrow_schema(Tile), columns=list(columns)
                             ).slice(0, 0)
    table = pq.read_table(tiles_path, schema=arrow_schema(Tile), columns=list(columns),
                          filters=[("tile_id", "in", sorted(set(tile_ids)))])
    row_of = {t: i for i, t in enumerate(table.column("tile_id").to_pylist())}
    for tile_id in tile_ids:
        if tile_id not in row_of:
            raise BadRecordError(f"a record names tile {tile_id!r}, absent from "
                                 f"{tiles_path.name}", records_path)
    return table.take(pa.array([row_of[t] for t in tile_ids], pa.int64()))


def _coco_piece(record: GroundedRecord, tile: dict, export: ExportParams) -> dict:
    """What the COCO file needs of one record (`tile` a tiles-shard row), before ids are
    given out."""
    instruction = export.instruction_for(record.record_id)
    return {
        "tile_id": tile["tile_id"], "width": tile["width"], "height": tile["height"],
        "objects": [{"object_id": o["object_id"], "category": o["category"],
                     "category_id": o.get("category_id"), "area": o["area"], "bbox": o["bbox"],
                     "segmentation": o["mask"]} for o in tile["objects"]],
        "record_id": record.record_id, "caption": record.caption, "review": record.review,
        "instruction": instruction.text, "instruction_id": instruction.id,
        "phrases": [{"text": p.text, "kind": p.kind, "category": p.category,
                     "object_ids": list(p.object_ids)} for p in record.phrases],
    }


def export_shard(shard: InputShard, geopixel_dir: Path, export: ExportParams) -> dict:
    """Write one input shard's GeoPixel samples; return its COCO pieces and list items."""
    records = read_records(shard.records, GroundedRecord)
    tiles = _tile_rows(shard.records, shard.tiles, [r.tile_id for r in records],
                       ["tile_id", "height", "width", "image_png", "objects"]).to_pylist()
    pairs = [(r, TileImage.of_row(t)) for r, t in zip(records, tiles)]
    # the staging folder is swapped in whole: its files need no atomic writes of their own
    items = write_geopixel_samples(pairs, geopixel_dir, export, {shard.folder: shard.first_id},
                                   atomic=False)
    return {"split": shard.split,
            "coco": [_coco_piece(r, t, export) for r, t in zip(records, tiles)],
            "geopixel": items}


def write_parquet_shard(shard: ParquetShard, export: ExportParams) -> int:
    """Write one output Parquet shard from slices of input shards; rows written."""
    parts = []
    for s in shard.slices:
        records = pq.read_table(s.records, schema=arrow_schema(GroundedRecord)
                                ).slice(s.start, s.stop - s.start)
        tiles = _tile_rows(s.records, s.tiles, records.column("tile_id").to_pylist(),
                           ["tile_id", "image_png", "width", "height", "objects"])
        parts.append(export_table(records, tiles, export))
    table = pa.concat_tables(parts) if parts else EXPORT_SCHEMA.empty_table()
    write_table(shard.path, table, export.row_group_size)
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# Planning (cheap: reads ids only) and assembling.


def _check_shard(records_path: Path, tiles_path: Path, split: str) -> list[GroundedRecord]:
    """Every record of a shard against its tile's size and instances (no image is read)."""
    records = read_records(records_path, GroundedRecord)
    table = pq.read_table(tiles_path, columns=["tile_id", "height", "width", "objects"])
    outlines = {row["tile_id"]: (row["height"], row["width"],
                                 {o["object_id"] for o in row["objects"]})
                for row in table.to_pylist()}
    for record in records:
        if record.split != split:
            raise BadRecordError(f"record {record.record_id} of split {record.split!r} in a "
                                 f"{split!r} shard", records_path)
        safe_name(record.tile_id, "tile id")
        if record.tile_id not in outlines:
            raise BadRecordError(f"record {record.record_id} names tile {record.tile_id!r}, "
                                 f"absent from {tiles_path.name}", records_path)
        height, width, object_ids = outlines[record.tile_id]
        check_record(record, record.tile_id, height, width)
        for phrase in record.phrases:
            missing = sorted(set(phrase.object_ids) - object_ids)
            if missing:
                raise BadRecordError(f"record {record.record_id}: phrase {phrase.text!r} names "
                                     f"instances {missing} absent from tile {record.tile_id}",
                                     records_path)
    return records


def scan_inputs(records_dir: Path, tiles_dir: Path, export: ExportParams) -> list[InputShard]:
    """Check every record before anything is written; plan the input shards.

    Tasks fail only on what this cannot see (unreadable images), so a refused export never
    races shard tasks still writing.
    """
    shards = list_shards(Path(records_dir))
    if not shards:
        raise EmptyInputError("no record shards ({split}-NNNNN-of-NNNNN.parquet)", records_dir)
    planned: list[InputShard] = []
    next_id: dict[str, int] = defaultdict(int)
    seen: dict[tuple[str, str], str] = {}
    for path in shards:
        split = SHARD_RE.match(path.name).group("split")
        tiles = Path(tiles_dir) / path.name
        if not tiles.is_file():
            raise EmptyInputError(f"no tiles shard for records shard {path.name}", tiles)
        folder = layout_folder(split, export)
        records = _check_shard(path, tiles, split)
        for record in records:
            key = (folder, record.tile_id)
            if key in seen:
                raise DuplicateNameError(f"tile {record.tile_id!r} has two records ({seen[key]}, "
                                         f"{record.record_id}); the GeoPixel layout holds one",
                                         path)
            seen[key] = record.record_id
        planned.append(InputShard(records=path, tiles=tiles, split=split, folder=folder,
                                  count=len(records), first_id=next_id[folder]))
        next_id[folder] += len(records)
    return planned


def plan_parquet(shards: list[InputShard], out_dir: Path, per_shard: int) -> list[ParquetShard]:
    """Cut each split's records, in input order, into output shards of `per_shard` rows."""
    by_split: dict[str, list[InputShard]] = defaultdict(list)
    for s in shards:
        by_split[s.split].append(s)
    planned = []
    for split, inputs in sorted(by_split.items()):
        total = sum(s.count for s in inputs)
        n = math.ceil(total / per_shard)
        for k in range(n):
            lo, hi = k * per_shard, min((k + 1) * per_shard, total)
            slices, offset = [], 0
            for s in inputs:
                a, b = max(lo, offset), min(hi, offset + s.count)
                if a < b:
                    slices.append(ParquetSlice(s.records, s.tiles, a - offset, b - offset))
                offset += s.count
            planned.append(ParquetShard(split, Path(out_dir) / shard_name(split, k, n),
                                        tuple(slices)))
    return planned


def coco_files(pieces: list[dict], tiles_dir: Path) -> dict[str, dict]:
    """COCO datasets per split from the shard pieces: image and annotation ids given out in
    input order, category ids fixed (`category_ids`; sources that disagree on them are a
    BadAnnotationError naming `tiles_dir`)."""
    try:
        category_id = category_ids((o["category"], o["category_id"]) for p in pieces
                                   for c in p["coco"] for o in c["objects"])
    except CategoryIdConflict as exc:
        raise BadAnnotationError(f"the tiles' category ids disagree: {exc}", tiles_dir) from None
    files: dict[str, dict] = {}
    for piece in pieces:
        coco = files.setdefault(piece["split"], {
            "info": {"description": "GeoPixelD builder export", "schema_version": SCHEMA_VERSION,
                     "pipeline_version": PIPELINE_VERSION},
            "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": i, "name": n, "supercategory": "object"}
                           for n, i in sorted(category_id.items(), key=lambda c: c[1])],
            "captions": [], "_tiles": {}})
        for c in piece["coco"]:
            if c["tile_id"] not in coco["_tiles"]:
                image_id = len(coco["images"]) + 1
                coco["images"].append({"id": image_id, "file_name": f"{c['tile_id']}.png",
                                       "width": c["width"], "height": c["height"],
                                       "tile_id": c["tile_id"]})
                by_object = {}
                for o in c["objects"]:
                    ann_id = len(coco["annotations"]) + 1
                    coco["annotations"].append({
                        "id": ann_id, "image_id": image_id,
                        "category_id": category_id[o["category"]],
                        "segmentation": o["segmentation"], "area": o["area"],
                        "bbox": o["bbox"], "iscrowd": 0, "object_id": o["object_id"]})
                    by_object[o["object_id"]] = ann_id
                coco["_tiles"][c["tile_id"]] = (image_id, by_object)
            image_id, by_object = coco["_tiles"][c["tile_id"]]
            coco["captions"].append({
                "image_id": image_id, "record_id": c["record_id"], "caption": c["caption"],
                "review": c["review"], "instruction": c["instruction"],
                "instruction_id": c["instruction_id"],
                "phrases": [{"text": p["text"], "kind": p["kind"], "category": p["category"],
                             "seg_index": i,
                             "annotation_ids": [by_object[o] for o in p["object_ids"]]}
                            for i, p in enumerate(c["phrases"])]})
    for coco in files.values():
        del coco["_tiles"]
    return files


def _write_coco(path: Path, coco: dict) -> None:
    """Compact, sorted, ASCII JSON: stable bytes, readable by pycocotools under any locale."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n",
                       encoding="ascii")


def run_export(params: Params, tiles_dir: Path, records_dir: Path, out_dir: Path,
               scheduler: str | None = None) -> dict:
    """Export every record shard; write `out_dir` whole or not at all; return the report."""
    export = params.export
    stage = Stage("export", params, scheduler)
    shards = scan_inputs(Path(records_dir), Path(tiles_dir), export)
    with stage.output(Path(out_dir), inputs=[tiles_dir, records_dir],
                      count_key="records") as out:
        staging = out.folder
        geopixel_dir = staging / "geopixel"
        pieces = stage.map(partial(export_shard, geopixel_dir=geopixel_dir, export=export),
                           shards, label="export geopixel+coco")
        parquet = plan_parquet(shards, staging / "parquet", export.records_per_shard)
        rows = stage.map(partial(write_parquet_shard, export=export), parquet,
                         label="export parquet")
        items: dict[str, list[dict]] = defaultdict(list)
        for piece in pieces:
            for folder, entries in piece["geopixel"].items():
                items[folder].extend(entries)
        lists = write_geopixel_lists(items, geopixel_dir, export)
        cocos = coco_files(pieces, Path(tiles_dir))
        for split, coco in sorted(cocos.items()):
            _write_coco(staging / "coco" / f"{safe_name(split, 'split')}.json", coco)
        report = {
            "records": sum(s.count for s in shards),
            "splits": {split: {
                "records": len(coco["captions"]),
                "tiles": len(coco["images"]),
                "annotations": len(coco["annotations"]),
                "phrases": sum(len(c["phrases"]) for c in coco["captions"]),
                "seg_tokens": sum(c["caption"].count(SEG) for c in coco["captions"]),
                "parquet_shards": sum(1 for p in parquet if p.split == split),
            } for split, coco in sorted(cocos.items())},
            "parquet": {"shards": len(parquet), "rows": sum(rows)},
            "coco": {"files": len(cocos),
                     "categories": len(next(iter(cocos.values()))["categories"]) if cocos else 0},
            "geopixel": {"lists": lists, "samples": sum(lists.values())},
        }
        out.report = report
    return report
