"""Georeferenced outputs: every grounded phrase's mask as a MultiPolygon on the map.

A pass after export (export.py is unchanged): for the tiles that carry a CRS and an affine
transform (GeoTIFF scenes), each phrase is traced along its pixel edges (rasterio), mapped
to the tile's CRS by its transform, simplified by `imagery.polygon_tolerance_px` pixels and
reprojected (pyproj) to the output CRS, `imagery.output_crs`:

  wgs84 (default)  WGS 84 longitude/latitude, EPSG:4326: the GeoJSON is RFC 7946 (no `crs`
                   member, counter-clockwise exteriors, 7 decimals, about 1 cm)
  scene            the CRS of each split's first georeferenced tile (projected coordinates;
                   tiles of the split in another CRS are reprojected to it); the GeoJSON names
                   it in the legacy `crs` member, which GDAL and QGIS read

    export/geojson/{split}.geojson        FeatureCollection, one Feature per phrase
    export/geoparquet/{split}.parquet     GeoParquet, one row per phrase
    export/geojson/report.json            counts
    export/parquet/*.parquet              rewritten with a `geometry` column: per record, the
                                          MultiPolygon of all its phrases

A phrase's geometry is a MultiPolygon (empty for an empty mask) made of its member instances'
polygons, each instance traced on its own (its mask read from the tiles shards), so the touching
vehicles of a group stay apart as in the GeoPixel layout; a phrase whose members are not in the
tile, or do not make up its mask, is traced from its mask (`pipeline.geometry.masks.member_masks`,
the rule the GeoPixel polygons follow). Members may share edges, so a group's MultiPolygon is not
"valid" in the OGC sense: its union (`shapely.union_all`) is the phrase's footprint. Its
properties are record_id, tile_id, split, seg_index (the i-th [SEG] of the caption, like
`masks[i]`), phrase, kind, category and object_ids; the GeoJSON Feature id is
"{record_id}:{seg_index}". Both per-phrase files are written by geopandas (GDAL's GeoJSON
driver through pyogrio; GeoParquet 1.0.0 metadata). Rows of the Parquet shards whose tile has
no CRS have a null geometry; the shards get GeoParquet 1.0.0 metadata ("geo" key, the CRS as
PROJJSON). The Parquet folder is replaced whole or not at all.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import MultiPolygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from pipeline.core.errors import BadAnnotationError, BadParamsError
from pipeline.core.params import Params
from pipeline.core.shards import list_shards, safe_name, staged_folder, write_json, write_table
from pipeline.geometry import masks
from pipeline.sources.label_sources import same_crs
from schemas import RLE

GEO_VERSION = "1.0.0"
GEOMETRY = "geometry"
WGS84 = "EPSG:4326"
# the GeoJSON Feature properties of a phrase, in order
PHRASE_PROPERTIES = ("record_id", "tile_id", "split", "seg_index", "phrase", "kind", "category",
                     "object_ids")

__all__ = ["GEO_VERSION", "PHRASE_PROPERTIES", "WGS84", "Georeference", "crs_projjson",
           "geo_metadata", "mask_geometry", "output_crs", "phrase_geometry", "reproject",
           "rle_geometry", "run_georef", "tile_georeference"]


def _rasterio_features():
    try:
        from affine import Affine
        from rasterio.features import shapes
    except ImportError:
        raise BadParamsError("georeferenced outputs need rasterio: pip install "
                             "'geopixeld[geo]'") from None
    return Affine, shapes


def _geopandas():
    try:
        import geopandas
        import pyproj  # noqa: F401
    except ImportError:
        raise BadParamsError("georeferenced outputs need geopandas and pyproj: pip install "
                             "'geopixeld[geo]'") from None
    return geopandas


def mask_geometry(mask: np.ndarray, transform: Sequence[float],
                  tolerance_px: float) -> MultiPolygon:
    """A binary tile mask as a MultiPolygon in map coordinates: pixel edges mapped by the
    tile's affine (a, b, c, d, e, f), simplified by `tolerance_px` pixels, exteriors CCW."""
    Affine, shapes = _rasterio_features()
    mask = np.ascontiguousarray(mask.astype(np.uint8))
    if not mask.any():
        return MultiPolygon()
    affine = Affine(*transform)
    parts = [shape(geom) for geom, value in shapes(mask, mask=mask.astype(bool),
                                                   transform=affine) if value == 1]
    merged = shapely.union_all(parts)
    if tolerance_px > 0:
        pixel = float(np.sqrt(abs(affine.a * affine.e - affine.b * affine.d)))
        simpler = merged.simplify(tolerance_px * pixel, preserve_topology=True)
        if not simpler.is_empty:
            merged = simpler
    return _multipolygon(merged)


def rle_geometry(rle: RLE, transform: Sequence[float], tolerance_px: float) -> MultiPolygon:
    """`mask_geometry` of an RLE mask, traced on its bounding box only."""
    crop, x0, y0 = masks.decode_crop(rle)
    if not crop.size:
        return MultiPolygon()
    Affine, _ = _rasterio_features()
    return mask_geometry(crop, tuple(Affine(*transform) @ Affine.translation(x0, y0))[:6],
                         tolerance_px)


def phrase_geometry(mask: RLE, members: Sequence[Optional[RLE]], transform: Sequence[float],
                    tolerance_px: float) -> MultiPolygon:
    """A phrase as a MultiPolygon in its tile's CRS: the polygons of each member instance
    (`members`: their masks, None for one the tile lacks) traced one by one, or of the phrase's
    own mask when the members cannot be used (`masks.member_masks`)."""
    return MultiPolygon([polygon for part in masks.member_masks(mask, members)
                         for polygon in rle_geometry(part, transform, tolerance_px).geoms])


def _multipolygon(geom: BaseGeometry) -> MultiPolygon:
    """The polygons of `geom` as one MultiPolygon, exteriors counter-clockwise."""
    return MultiPolygon([orient(p, sign=1.0) for p in getattr(geom, "geoms", [geom])
                         if p.geom_type == "Polygon" and not p.is_empty])


@functools.lru_cache(maxsize=64)
def _transformer(source: str, target: str):
    import pyproj

    try:
        return pyproj.Transformer.from_crs(source, target, always_xy=True)
    except pyproj.exceptions.CRSError as exc:
        raise BadAnnotationError(f"cannot reproject from {source} to {target} ({exc})") from None


def reproject(geom: MultiPolygon, source: str, target: str) -> MultiPolygon:
    """`geom` from CRS `source` to `target` (pyproj, x = easting/longitude), exteriors kept
    counter-clockwise."""
    if same_crs(source, target) or geom.is_empty:
        return geom
    transformer = _transformer(source, target)
    moved = shapely.transform(geom, lambda xy: np.column_stack(
        transformer.transform(xy[:, 0], xy[:, 1])))
    return _multipolygon(moved)


def output_crs(setting: str, tile_crs: str) -> str:
    """The CRS a split's outputs are written in: WGS 84 or the (first) tile's CRS."""
    return WGS84 if setting == "wgs84" else tile_crs


def crs_projjson(crs: str) -> dict:
    """PROJJSON of a CRS string (pyproj)."""
    import pyproj

    return pyproj.CRS.from_user_input(crs).to_json_dict()


def geo_metadata(crs: str, bbox: Optional[Sequence[float]]) -> dict:
    """GeoParquet 1.0.0 file metadata for the `geometry` column of the record shards."""
    column = {"encoding": "WKB", "geometry_types": ["MultiPolygon"],
              "crs": crs_projjson(crs), "edges": "planar", "orientation": "counterclockwise"}
    if bbox is not None:
        column["bbox"] = [float(v) for v in bbox]
    return {"version": GEO_VERSION, "primary_column": GEOMETRY, "columns": {GEOMETRY: column}}


class Georeference(NamedTuple):
    """A georeferenced tile: its CRS, its affine transform, and the tiles shard holding it."""

    crs: str
    transform: list[float]
    shard: Path


def tile_georeference(tiles_dir: Path) -> dict[tuple[str, str], Georeference]:
    """(split, tile id) -> `Georeference` of every georeferenced tile (no image is read)."""
    found = {}
    for path in list_shards(Path(tiles_dir)):
        names = set(pq.read_schema(path).names)
        if not {"crs", "transform"} <= names:
            continue
        table = pq.read_table(path, columns=["tile_id", "split", "crs", "transform"])
        for row in table.to_pylist():
            if row["crs"] and row["transform"]:
                found[(row["split"], row["tile_id"])] = Georeference(
                    row["crs"], list(row["transform"]), path)
    return found


def _instance_masks(georef: dict[tuple[str, str], Georeference],
                   keys: set[tuple[str, str]]) -> dict[tuple[str, str], dict[int, RLE]]:
    """Object id -> mask of each tile `keys` names ((split, tile id), georeferenced), read
    from its tiles shard: only those tiles, only their instances."""
    by_shard: dict[Path, set[str]] = defaultdict(set)
    for key in keys:
        by_shard[georef[key].shard].add(key[1])
    found: dict[tuple[str, str], dict[int, RLE]] = {}
    for path, tile_ids in sorted(by_shard.items()):
        table = pq.read_table(path, columns=["tile_id", "split", "objects"],
                              filters=[("tile_id", "in", sorted(tile_ids))])
        for row in table.to_pylist():
            if (row["split"], row["tile_id"]) in keys:
                found[(row["split"], row["tile_id"])] = {
                    o["object_id"]: RLE(**o["mask"]) for o in row["objects"]}
    return found


class _PhraseFiles:
    """One split's phrases, gathered (geometries and properties, no images), then written as
    GeoJSON and GeoParquet by geopandas."""

    def __init__(self, geojson_dir: Path, geoparquet_dir: Path):
        self.geojson_dir, self.geoparquet_dir = geojson_dir, geoparquet_dir
        self.rows: dict[str, list[dict]] = {}
        self.geoms: dict[str, list[MultiPolygon]] = {}
        self.crs: dict[str, str] = {}

    def add(self, split: str, crs: str, geom: MultiPolygon, properties: dict) -> None:
        self.crs.setdefault(split, crs)
        self.rows.setdefault(split, []).append(properties)
        self.geoms.setdefault(split, []).append(geom)

    def write(self) -> dict:
        gpd = _geopandas()
        written = {}
        for split, rows in self.rows.items():
            crs, name = self.crs[split], safe_name(split, "split")
            frame = gpd.GeoDataFrame(
                {"id": [f"{r['record_id']}:{r['seg_index']}" for r in rows],
                 **{key: [r[key] for r in rows] for key in PHRASE_PROPERTIES}},
                geometry=gpd.GeoSeries(self.geoms[split], crs=crs), crs=crs)
            # RFC 7946 for WGS 84 (no crs member, CCW rings, 7 decimals); in another CRS GDAL
            # writes the legacy crs member
            options = {"RFC7946": "YES"} if crs == WGS84 else {}
            frame.to_file(self.geojson_dir / f"{name}.geojson", driver="GeoJSON",
                          engine="pyogrio", ID_FIELD="id", **options)
            frame.drop(columns="id").to_parquet(self.geoparquet_dir / f"{name}.parquet",
                                                index=False)
            written[split] = {"features": len(rows), "crs": crs,
                              "file": f"geojson/{name}.geojson",
                              "geoparquet": f"geoparquet/{name}.parquet"}
        return written


def _row_geometries(row: dict, objects: dict[int, RLE], transform: list[float], crs: str,
                    target: str, tolerance: float) -> list[MultiPolygon]:
    """Each phrase of an export row as a MultiPolygon in `target` (`phrase_geometry`)."""
    return [reproject(phrase_geometry(RLE(**rle), [objects.get(i) for i in ids], transform,
                                      tolerance), crs, target)
            for rle, ids in zip(row["masks"], row["object_ids"])]


def _with_geometry(table: pa.Table, wkb: list[Optional[bytes]], crs: str,
                   bbox: Optional[list[float]]) -> pa.Table:
    if GEOMETRY in table.column_names:
        table = table.drop_columns([GEOMETRY])
    table = table.append_column(pa.field(GEOMETRY, pa.binary()), pa.array(wkb, pa.binary()))
    meta = dict(table.schema.metadata or {})
    if b"huggingface" in meta:  # keep the `datasets` features in step with the columns
        hf = json.loads(meta[b"huggingface"])
        hf.setdefault("info", {}).setdefault("features", {})[GEOMETRY] = {
            "dtype": "binary", "_type": "Value"}
        meta[b"huggingface"] = json.dumps(hf).encode()
    meta[b"geo"] = json.dumps(geo_metadata(crs, bbox)).encode()
    return table.replace_schema_metadata(meta)


def run_georef(params: Params, tiles_dir: Path, export_dir: Path) -> dict:
    """Add the georeferenced outputs to an export folder; returns (and writes) the report.
    Does nothing, and says so, when no exported tile has a CRS."""
    tiles_dir, export_dir = Path(tiles_dir), Path(export_dir)
    georef = tile_georeference(tiles_dir)
    shards = list_shards(export_dir / "parquet")
    setting = params.imagery.output_crs
    report: dict = {"georeferenced": bool(georef), "output_crs": setting, "splits": {},
                    "parquet_shards": 0, "rows_with_geometry": 0, "rows_without_crs": 0,
                    "phrases": 0, "reprojected_phrases": 0}
    if not georef or not shards:
        return report
    _rasterio_features()
    _geopandas()
    tolerance = params.imagery.polygon_tolerance_px
    with staged_folder(export_dir / "geojson", stage="export", inputs=[tiles_dir]) as gj_dir, \
            staged_folder(export_dir / "geoparquet", stage="export",
                          inputs=[tiles_dir]) as gpq_dir, \
            staged_folder(export_dir / "parquet", stage="export", inputs=[tiles_dir]) as pq_dir:
        files = _PhraseFiles(gj_dir, gpq_dir)
        split_crs: dict[str, str] = {}
        for path in shards:
            table = pq.read_table(path)
            rows = table.select(["record_id", "tile_id", "split", "phrases", "phrase_kinds",
                                 "phrase_categories", "masks", "object_ids"]).to_pylist()
            shard_crs, wkb, bounds = None, [], []
            objects = _instance_masks(georef, {(r["split"], r["tile_id"]) for r in rows} &
                                     georef.keys())
            for row in rows:
                key = (row["split"], row["tile_id"])
                if key not in georef:
                    wkb.append(None)
                    report["rows_without_crs"] += 1
                    continue
                crs, transform, _ = georef[key]
                target = split_crs.setdefault(row["split"], output_crs(setting, crs))
                shard_crs = shard_crs or target
                geoms = _row_geometries(row, objects.get(key, {}), transform, crs, target,
                                        tolerance)
                if not same_crs(crs, target):
                    report["reprojected_phrases"] += len(geoms)
                for i, geom in enumerate(geoms):
                    files.add(row["split"], target, geom, {
                        "record_id": row["record_id"], "tile_id": row["tile_id"],
                        "split": row["split"], "seg_index": i, "phrase": row["phrases"][i],
                        "kind": row["phrase_kinds"][i],
                        "category": row["phrase_categories"][i],
                        "object_ids": list(row["object_ids"][i])})
                if not same_crs(target, shard_crs):  # a shard holding two splits' CRS
                    geoms = [reproject(g, target, shard_crs) for g in geoms]
                # members' polygons, dissolved (a group's may share edges)
                parts = [polygon for g in geoms for polygon in g.geoms]
                footprint = _multipolygon(shapely.union_all(parts)) if parts else MultiPolygon()
                wkb.append(shapely.to_wkb(footprint, output_dimension=2))
                if not footprint.is_empty:
                    bounds.append(footprint.bounds)
                report["rows_with_geometry"] += 1
                report["phrases"] += len(geoms)
            if shard_crs is not None:
                b = np.asarray(bounds) if bounds else None
                bbox = ([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
                        if b is not None else None)
                table = _with_geometry(table, wkb, shard_crs, bbox)
                report["parquet_shards"] += 1
            write_table(pq_dir / path.name, table, params.export.row_group_size)
        report["splits"] = files.write()
        write_json(gj_dir / "report.json", report)
    return report
