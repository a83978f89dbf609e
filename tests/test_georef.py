"""Georeferenced outputs: GeoTIFF scenes made here (rasterio, CRS + transform) with GeoJSON
labels go through `run_annotate_imagery`; every exported phrase MultiPolygon must land on the
map coordinates of the label it grounds, read back with geopandas: in the RFC 7946 GeoJSON
(WGS 84, the default) and the per-phrase GeoParquet, in the scene-CRS files
(`imagery.output_crs: scene`), and in the Parquet shards' `geometry` column; a scene in another
CRS is reprojected into the file's CRS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import shapely
from rasterio.transform import Affine
from shapely.geometry import shape

from pipeline.core.params import parse_params
from pipeline.core.shards import list_shards
from pipeline.sources.georef import WGS84, mask_geometry, run_georef
from pipeline.stages.new_imagery import run_annotate_imagery

UTM, MERCATOR = "EPSG:32633", "EPSG:3857"
PIXEL = 0.5
UTM_TRANSFORM = Affine(PIXEL, 0.0, 500000.0, 0.0, -PIXEL, 4200000.0)
# label squares in scene pixels (col0, row0, col1, row1): one per 256 px tile, so that each
# tile's own transform (its window's offset) is exercised
SQUARES = {1: (40, 30, 80, 70), 2: (300, 60, 340, 90), 3: (100, 300, 150, 340),
           4: (380, 400, 420, 440)}


def map_box(transform: Affine, c0, r0, c1, r1) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = transform @ (c0, r0), transform @ (c1, r1)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def write_scene(path: Path, crs: str, transform: Affine) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(70, 110, (3, 512, 512), dtype=np.uint8)
    for i, (c0, r0, c1, r1) in SQUARES.items():
        data[:, r0:r1, c0:c1] = 40 + 45 * i
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="uint8", crs=crs, transform=transform) as ds:
        ds.write(data)


def geojson(path: Path, crs: str, transform: Affine) -> None:
    features = []
    for i, square in SQUARES.items():
        x0, y0, x1, y1 = map_box(transform, *square)
        features.append({"type": "Feature", "id": i, "properties": {"category": "building"},
                         "geometry": {"type": "Polygon", "coordinates": [[
                             [x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}})
    code = crs.split(":")[1]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features,
                                "crs": {"type": "name", "properties": {
                                    "name": f"urn:ogc:def:crs:EPSG::{code}"}}}))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One run over two scenes 5 km apart: A in UTM 33N, B in Web Mercator; all labels in one
    UTM GeoJSON (B's are reprojected on reading)."""
    root = tmp_path_factory.mktemp("geo")
    write_scene(root / "A.tif", UTM, UTM_TRANSFORM)
    to_merc = pyproj.Transformer.from_crs(UTM, MERCATOR, always_xy=True)
    mx, my = to_merc.transform(505000.0, 4200000.0)
    merc_transform = Affine(0.6, 0.0, mx, 0.0, -0.6, my)
    write_scene(root / "B.tif", MERCATOR, merc_transform)
    # B's labels in UTM: map B's pixel squares to Mercator, then to UTM
    to_utm = pyproj.Transformer.from_crs(MERCATOR, UTM, always_xy=True)
    features = []
    for i, (c0, r0, c1, r1) in SQUARES.items():
        ring = [merc_transform @ (c, r) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]
        ring = [list(to_utm.transform(x, y)) for x, y in ring]
        features.append({"type": "Feature", "id": 100 + i,
                         "properties": {"category": "storage_tank"},
                         "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}})
    geojson(root / "labels.geojson", UTM, UTM_TRANSFORM)
    labels = json.loads((root / "labels.geojson").read_text())
    labels["features"] += features
    (root / "labels.geojson").write_text(json.dumps(labels))
    params = parse_params({"prepare": {"tile_size": 256, "stride": 256},
                           "annotate": {"cache": {"enabled": False}},
                           "imagery": {"polygon_tolerance_px": 0.5},
                           "runner": {"local_scheduler": "synchronous"}})
    summary = run_annotate_imagery([root / "A.tif", root / "B.tif"], root / "out", params,
                                   "geojson", root / "labels.geojson", None)
    return root / "out", summary, merc_transform


@pytest.fixture(scope="module")
def scene_export(exported, tmp_path_factory):
    """The same export with `imagery.output_crs: scene` (run_georef again on a copy)."""
    out, _, _ = exported
    export = tmp_path_factory.mktemp("scene") / "export"
    shutil.copytree(out / "export", export)
    params = parse_params({"imagery": {"polygon_tolerance_px": 0.5, "output_crs": "scene"}})
    report = run_georef(params, out / "tiles", export)
    return export, report


def features_by_object(export: Path) -> tuple[dict, dict]:
    fc = json.loads((export / "geojson" / "train.geojson").read_text())
    return fc, {f["properties"]["object_ids"][0]: f for f in fc["features"]}


def to_utm(geom):
    return gpd.GeoSeries([geom], crs=WGS84).to_crs(UTM).iloc[0]


def test_geojson_is_rfc7946_wgs84_multipolygons_by_default(exported):
    out, summary, _ = exported
    assert summary["georeferenced"] and summary["geojson"] == {"train": "geojson/train.geojson"}
    assert summary["objects"] == 8 and summary["phrases"] == 8
    fc, by_object = features_by_object(out / "export")
    assert "crs" not in fc  # RFC 7946: WGS 84 lon/lat, no crs member
    frame = gpd.read_file(out / "export" / "geojson" / "train.geojson")
    assert frame.crs.to_epsg() == 4326 and len(frame) == 8
    assert set(frame.geom_type) == {"MultiPolygon"}
    assert {"record_id", "tile_id", "seg_index", "phrase", "kind", "category"} <= set(frame.columns)
    for i, square in SQUARES.items():
        geom = shape(by_object[i]["geometry"])
        assert geom.geom_type == "MultiPolygon"
        lon, lat = geom.centroid.x, geom.centroid.y
        assert 14.9 < lon < 15.1 and 37.9 < lat < 38.0  # UTM 33N, 4200 km north: Sicily
        # back in metres: the label's square, to the centimetre RFC 7946's 7 decimals keep
        assert to_utm(geom).bounds == pytest.approx(map_box(UTM_TRANSFORM, *square), abs=0.02)
        assert by_object[i]["properties"]["category"] == "building"
        assert by_object[i]["id"] == f"{by_object[i]['properties']['record_id']}:" \
            f"{by_object[i]['properties']['seg_index']}"
        # RFC 7946: exterior rings counter-clockwise
        assert shapely.is_ccw(geom.geoms[0].exterior)


def test_scene_crs_geojson_is_an_option_and_pixel_exact(scene_export):
    export, report = scene_export
    assert report["output_crs"] == "scene"
    fc, by_object = features_by_object(export)
    assert fc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert gpd.read_file(export / "geojson" / "train.geojson").crs == pyproj.CRS(UTM)
    for i, square in SQUARES.items():
        geom = shape(by_object[i]["geometry"])
        # pixel-exact: the label's square in metres, not a pixel more or less
        assert geom.bounds == pytest.approx(map_box(UTM_TRANSFORM, *square), abs=1e-6)
        assert geom.area == pytest.approx((square[2] - square[0]) * (square[3] - square[1])
                                          * PIXEL ** 2)
        assert shapely.is_ccw(geom.geoms[0].exterior)


def test_scene_in_another_crs_is_reprojected_into_the_files_crs(exported, scene_export):
    out, _, merc_transform = exported
    to_utm_ = pyproj.Transformer.from_crs(MERCATOR, UTM, always_xy=True)
    _, in_wgs84 = features_by_object(out / "export")
    _, in_utm = features_by_object(scene_export[0])
    for i, (c0, r0, c1, r1) in SQUARES.items():
        corners = [to_utm_.transform(*(merc_transform @ (c, r)))
                   for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]
        expected = shapely.Polygon(corners)
        for geom in (shape(in_utm[100 + i]["geometry"]),
                     to_utm(shape(in_wgs84[100 + i]["geometry"]))):
            assert geom.symmetric_difference(expected).area < 0.02 * expected.area


def test_geoparquet_has_one_multipolygon_row_per_phrase(exported, scene_export):
    out, _, _ = exported
    for export, crs in ((out / "export", pyproj.CRS(WGS84)), (scene_export[0], pyproj.CRS(UTM))):
        phrases = gpd.read_parquet(export / "geoparquet" / "train.parquet")
        assert phrases.crs == crs and len(phrases) == 8
        assert set(phrases.geom_type) == {"MultiPolygon"}
        features = gpd.read_file(export / "geojson" / "train.geojson")
        assert sorted(zip(phrases.record_id, phrases.seg_index)) == \
            sorted(zip(features.record_id, features.seg_index))
        geo = json.loads(pq.read_schema(export / "geoparquet" / "train.parquet").metadata[b"geo"])
        assert geo["primary_column"] == "geometry"
        assert geo["columns"]["geometry"]["geometry_types"] == ["MultiPolygon"]


def test_parquet_shards_geometry_column_and_metadata(exported):
    out, summary, _ = exported
    shards = list_shards(out / "export" / "parquet")
    assert shards
    phrases = gpd.read_parquet(out / "export" / "geoparquet" / "train.parquet")
    for path in shards:
        table = pq.read_table(path)
        geo = json.loads(table.schema.metadata[b"geo"])
        assert geo["version"] == "1.0.0" and geo["primary_column"] == "geometry"
        column = geo["columns"]["geometry"]
        assert column["encoding"] == "WKB" and column["geometry_types"] == ["MultiPolygon"]
        assert pyproj.CRS.from_json_dict(column["crs"]) == pyproj.CRS(WGS84)
        hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert list(hf) == table.column_names  # `datasets` features follow the columns
        records = gpd.read_parquet(path, columns=["record_id", "masks", "geometry"])
        assert records.crs == pyproj.CRS(WGS84) and set(records.geom_type) == {"MultiPolygon"}
        minx, miny, maxx, maxy = column["bbox"]
        for record in records.itertuples():
            # a record's geometry: all its phrases, one MultiPolygon
            own = phrases[phrases.record_id == record.record_id]
            assert len(own) == len(record.masks)
            assert record.geometry.symmetric_difference(own.union_all()).area < 1e-14
            x0, y0, x1, y1 = record.geometry.bounds
            assert minx <= x0 and miny <= y0 and x1 <= maxx and y1 <= maxy


def test_mask_geometry_keeps_holes_and_follows_a_rotated_transform():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 3:13] = 1
    mask[5:8, 6:9] = 0  # a hole
    rotated = Affine.translation(1000, 2000) @ Affine.rotation(30) @ Affine.scale(2, -2)
    geom = mask_geometry(mask, tuple(rotated)[:6], tolerance_px=0.0)
    assert len(geom.geoms) == 1 and len(geom.geoms[0].interiors) == 1
    assert geom.area == pytest.approx((100 - 9) * 4)
    corner = rotated @ (3, 2)
    assert min(shapely.Point(corner).distance(shapely.Point(p))
               for p in geom.geoms[0].exterior.coords) < 1e-6
    assert mask_geometry(np.zeros((4, 4), np.uint8), tuple(rotated)[:6], 0.5).is_empty
    # simplification (in pixels) removes the staircase of a diagonal edge
    diagonal = np.tril(np.ones((40, 40), np.uint8))
    exact = mask_geometry(diagonal, tuple(UTM_TRANSFORM)[:6], 0.0)
    simple = mask_geometry(diagonal, tuple(UTM_TRANSFORM)[:6], 1.0)
    assert len(simple.geoms[0].exterior.coords) < len(exact.geoms[0].exterior.coords) / 10


def test_geoparquet_shards_still_load_with_datasets(exported, tmp_path):
    from datasets import load_dataset

    out, _, _ = exported
    files = [str(p) for p in list_shards(out / "export" / "parquet")]
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert len(ds) == 8
    row = ds[0]
    assert row["image"].size == (256, 256)
    assert shapely.from_wkb(row["geometry"]).geom_type == "MultiPolygon"


def test_group_phrase_multipolygon_is_made_of_its_members(tmp_path):
    """Touching vehicles grounded as one group: the phrase's MultiPolygon has one polygon per
    member (two for an instance in two parts), not the union's single blob; their union is the
    phrase's footprint, pixel-exact in the scene CRS."""
    from pipeline.core.imaging import encode_png, sha256
    from pipeline.core.shards import shard_name, write_records
    from pipeline.geometry import masks
    from pipeline.stages.export import run_export
    from schemas import GroundedRecord, ObjectInstance, Phrase, Provenance, Tile, Window

    size = 40
    boxes = {1: [(5, 5, 11, 11)], 2: [(5, 11, 11, 17)], 3: [(5, 17, 11, 23)],  # bumper to bumper
             4: [(25, 5, 29, 9), (25, 15, 29, 19)]}  # (row0, col0, row1, col1) parts
    objects = []
    for object_id, parts in boxes.items():
        mask = np.zeros((size, size), np.uint8)
        for r0, c0, r1, c1 in parts:
            mask[r0:r1, c0:c1] = 1
        rle = masks.encode(mask)
        objects.append(ObjectInstance(object_id=object_id, category="Small_Vehicle",
                                      bbox=masks.bbox(rle), area=masks.area(rle), mask=rle))
    union = masks.union([o.mask for o in objects])
    png = encode_png(np.full((size, size, 3), 90, np.uint8))
    tile = Tile(tile_id="S_0_40_0_40", source="test", split="train", image_name="S",
                window=Window(y0=0, y1=size, x0=0, x1=size), height=size, width=size,
                image_png=png, image_sha256=sha256(png), objects=objects, crs=UTM,
                transform=list(UTM_TRANSFORM)[:6])
    record = GroundedRecord(
        record_id="train/S", tile_id=tile.tile_id, split="train",
        caption="Four <p> small vehicles </p> [SEG] are parked.",
        phrases=[Phrase(text="small vehicles", kind="cluster", category="Small_Vehicle",
                        object_ids=list(boxes), mask=union)],
        provenance=Provenance(backend="test", model="none", prompt_versions=[],
                              params_hash="x", pipeline_version="0"))
    name = shard_name("train", 0, 1)
    write_records(tmp_path / "tiles" / name, [tile], Tile)
    write_records(tmp_path / "records" / name, [record], GroundedRecord)
    params = parse_params({"imagery": {"polygon_tolerance_px": 0.0, "output_crs": "scene"},
                           "runner": {"local_scheduler": "synchronous"}})
    run_export(params, tmp_path / "tiles", tmp_path / "records", tmp_path / "export")
    run_georef(params, tmp_path / "tiles", tmp_path / "export")

    expected = [map_box(UTM_TRANSFORM, c0, r0, c1, r1)
                for parts in boxes.values() for r0, c0, r1, c1 in parts]
    for frame in (gpd.read_file(tmp_path / "export" / "geojson" / "train.geojson"),
                  gpd.read_parquet(tmp_path / "export" / "geoparquet" / "train.parquet")):
        geom, = frame.geometry
        assert geom.geom_type == "MultiPolygon"
        assert np.asarray([p.bounds for p in geom.geoms]) == pytest.approx(
            np.asarray(expected), abs=1e-6)
        assert shapely.union_all(list(geom.geoms)).area == pytest.approx(
            masks.area(union) * PIXEL ** 2)
    footprint = gpd.read_parquet(tmp_path / "export" / "parquet" / name).geometry.iloc[0]
    assert len(footprint.geoms) == 3  # the record's footprint dissolves the touching members
    assert footprint.area == pytest.approx(masks.area(union) * PIXEL ** 2)
