"""Georeferenced outputs: every grounded phrase's mask as a polygon in the scene's CRS.

A pass after export (export.py is unchanged): for the tiles that carry a CRS and an affine
transform (GeoTIFF scenes), each phrase mask is traced along its pixel edges (rasterio), mapped
to the CRS by the tile's transform and simplified by `imagery.polygon_tolerance_px` pixels.

    export/geojson/{split}.geojson   FeatureCollection, one Feature per phrase (record_id,
                                     tile_id, seg_index, phrase, kind, category, object_ids)
    export/geojson/report.json       counts
    export/parquet/*.parquet         rewritten with a `geometry` column (WKB) and GeoParquet
                                     1.0.0 metadata ("geo" key, crs as PROJJSON)

The `geometry` of a row is a GeometryCollection whose i-th member (a MultiPolygon, empty for
an empty mask) belongs to the i-th [SEG] of the caption, like `masks[i]`; rows of tiles without
a CRS have a null geometry. A GeoJSON file (one split) and a Parquet shard have one CRS: that
of their first georeferenced tile; tiles in another CRS are reprojected to it (pyproj). The
GeoJSON names its CRS in the legacy `crs` member (GDAL and QGIS read it); exterior rings are
counter-clockwise, as RFC 7946 asks. The Parquet folder is replaced whole or not at all.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, mapping, shape
from shapely.geometry.polygon import orient

from pipeline.core.errors import BadParamsError
from pipeline.core.params import Params
from pipeline.core.shards import list_shards, safe_name, staged_folder, write_json, write_table
from pipeline.geometry import masks
from pipeline.sources.label_sources import reproject, same_crs
from schemas import RLE

GEO_VERSION = "1.0.0"
GEOMETRY = "geometry"

__all__ = ["GEO_VERSION", "crs_projjson", "geo_metadata", "geojson_crs_member",
           "mask_geometry", "run_georef", "tile_georeference"]


def _rasterio_features():
    try:
        from affine import Affine
        from rasterio.features import shapes
    except ImportError:
        raise BadParamsError("georeferenced outputs need rasterio: pip install "
                             "'geopixeld[geo]'") from None
    return Affine, shapes


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
    polygons = [orient(p, sign=1.0) for p in getattr(merged, "geoms", [merged])
                if p.geom_type == "Polygon" and not p.is_empty]
    return MultiPolygon(polygons)


def crs_projjson(crs: str) -> dict:
    """PROJJSON of a CRS string (pyproj, else rasterio)."""
    try:
        import pyproj
        return pyproj.CRS.from_user_input(crs).to_json_dict()
    except ImportError:
        pass
    try:
        from rasterio.crs import CRS
    except ImportError:
        raise BadParamsError("GeoParquet metadata needs pyproj or rasterio: pip install "
                             "'geopixeld[geo]'") from None
    return CRS.from_user_input(crs).to_dict(projjson=True)


def geojson_crs_member(crs: str) -> Optional[dict]:
    """The legacy GeoJSON `crs` member for an 'EPSG:n' CRS (lon/lat EPSG:4326 -> CRS84)."""
    if not crs.upper().startswith("EPSG:"):
        return None
    code = crs.split(":", 1)[1]
    name = ("urn:ogc:def:crs:OGC:1.3:CRS84" if code == "4326"
            else f"urn:ogc:def:crs:EPSG::{code}")
    return {"type": "name", "properties": {"name": name}}


def geo_metadata(crs: str, bbox: Optional[Sequence[float]]) -> dict:
    """GeoParquet 1.0.0 file metadata for the `geometry` column."""
    column = {"encoding": "WKB", "geometry_types": ["GeometryCollection"],
              "crs": crs_projjson(crs), "edges": "planar", "orientation": "counterclockwise"}
    if bbox is not None:
        column["bbox"] = [float(v) for v in bbox]
    return {"version": GEO_VERSION, "primary_column": GEOMETRY, "columns": {GEOMETRY: column}}


def tile_georeference(tiles_dir: Path) -> dict[tuple[str, str], tuple[str, list[float]]]:
    """(split, tile id) -> (crs, transform) of every georeferenced tile (no image is read)."""
    found = {}
    for path in list_shards(Path(tiles_dir)):
        names = set(pq.read_schema(path).names)
        if not {"crs", "transform"} <= names:
            continue
        table = pq.read_table(path, columns=["tile_id", "split", "crs", "transform"])
        for row in table.to_pylist():
            if row["crs"] and row["transform"]:
                found[(row["split"], row["tile_id"])] = (row["crs"], list(row["transform"]))
    return found


class _GeoJsonWriter:
    """Streams one FeatureCollection per split (features never all held in memory)."""

    def __init__(self, folder: Path):
        self.folder, self.files, self.counts, self.crs = folder, {}, Counter(), {}

    def add(self, split: str, crs: str, feature: dict) -> None:
        if split not in self.files:
            path = self.folder / f".{safe_name(split, 'split')}.geojson.part"
            self.files[split] = path.open("w", encoding="utf-8")
            self.files[split].write('{"type": "FeatureCollection", "features": [\n')
            self.crs[split] = crs
        f = self.files[split]
        if self.counts[split]:
            f.write(",\n")
        f.write(json.dumps(feature, separators=(",", ":"), ensure_ascii=False))
        self.counts[split] += 1

    def close(self) -> dict:
        written = {}
        for split, f in self.files.items():
            crs = self.crs[split]
            member = geojson_crs_member(crs)
            tail = {"crs": member} if member else {"crs_wkt": crs}
            f.write("\n], " + json.dumps(tail)[1:-1] + "}\n")
            f.close()
            # the folder is staged whole: a rename is enough
            (self.folder / f".{split}.geojson.part").replace(self.folder / f"{split}.geojson")
            written[split] = {"features": self.counts[split], "crs": crs,
                              "file": f"geojson/{split}.geojson"}
        return written

    def abort(self) -> None:
        for f in self.files.values():
            f.close()


def _row_geometries(row: dict, crs: str, transform: list[float], target: str,
                    tolerance: float) -> list[MultiPolygon]:
    found = []
    for rle in row["masks"]:
        geom = mask_geometry(masks.decode(RLE(**rle)), transform, tolerance)
        if not same_crs(crs, target):
            geom = reproject(geom, crs, target, f"tile {row['tile_id']}")
        found.append(geom)
    return found


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
    report: dict = {"georeferenced": bool(georef), "splits": {}, "parquet_shards": 0,
                    "rows_with_geometry": 0, "rows_without_crs": 0, "phrases": 0,
                    "reprojected_phrases": 0}
    if not georef or not shards:
        return report
    _rasterio_features()
    tolerance = params.imagery.polygon_tolerance_px
    with staged_folder(export_dir / "geojson", stage="export", inputs=[tiles_dir]) as gj_dir, \
            staged_folder(export_dir / "parquet", stage="export", inputs=[tiles_dir]) as pq_dir:
        writer = _GeoJsonWriter(gj_dir)
        split_crs: dict[str, str] = {}
        try:
            for path in shards:
                table = pq.read_table(path)
                rows = table.select(["record_id", "tile_id", "split", "phrases",
                                     "phrase_kinds", "phrase_categories", "masks",
                                     "object_ids"]).to_pylist()
                shard_crs, wkb, bounds = None, [], []
                for row in rows:
                    found = georef.get((row["split"], row["tile_id"]))
                    if found is None:
                        wkb.append(None)
                        report["rows_without_crs"] += 1
                        continue
                    crs, transform = found
                    shard_crs = shard_crs or crs
                    target = split_crs.setdefault(row["split"], crs)
                    geoms = _row_geometries(row, crs, transform, shard_crs, tolerance)
                    if not same_crs(crs, shard_crs):
                        report["reprojected_phrases"] += len(geoms)
                    collection = GeometryCollection(geoms)
                    wkb.append(shapely.to_wkb(collection, output_dimension=2))
                    if not collection.is_empty:
                        bounds.append(collection.bounds)
                    if not same_crs(shard_crs, target):
                        geoms = _row_geometries(row, crs, transform, target, tolerance)
                    for i, geom in enumerate(geoms):
                        writer.add(row["split"], target, {
                            "type": "Feature", "id": f"{row['record_id']}:{i}",
                            "geometry": mapping(geom),
                            "properties": {
                                "record_id": row["record_id"], "tile_id": row["tile_id"],
                                "split": row["split"], "seg_index": i,
                                "phrase": row["phrases"][i], "kind": row["phrase_kinds"][i],
                                "category": row["phrase_categories"][i],
                                "object_ids": list(row["object_ids"][i])}})
                    report["rows_with_geometry"] += 1
                    report["phrases"] += len(geoms)
                if shard_crs is not None:
                    b = np.asarray(bounds) if bounds else None
                    bbox = ([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
                            if b is not None else None)
                    table = _with_geometry(table, wkb, shard_crs, bbox)
                    report["parquet_shards"] += 1
                write_table(pq_dir / path.name, table, params.export.row_group_size)
        except BaseException:
            writer.abort()
            raise
        report["splits"] = writer.close()
        write_json(gj_dir / "report.json", report)
    return report
