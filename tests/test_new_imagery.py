"""New imagery: GeoTIFF/PNG scenes read by windows into tiles (16-bit stretch, band choice,
nodata, georeference), labels from DOTA/COCO/GeoJSON, bad input, and the category-free
prompts of objects whose category is unknown. Scenes are written here with rasterio/OpenCV."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window as RioWindow

from pipeline.cli import MASK_SOURCES_WITH_PATH, masks_argv
from pipeline.core.errors import BadAnnotationError, BadImageError, BadParamsError, EmptyInputError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import ImageryParams, PlanParams, PrepareParams, parse_params
from pipeline.core.shards import list_shards, read_records
from pipeline.geometry import masks
from pipeline.geometry.categories import UNKNOWN_CATEGORY
from pipeline.sources.imagery import describe_scene, scene_windows
from pipeline.sources.label_sources import (
    clip_to_scene,
    geojson_scene_labels,
    parse_dota,
    read_geojson,
)
from pipeline.stages.new_imagery import (
    NEEDS_FILE,
    mask_spec,
    run_annotate_imagery,
    run_tile_imagery,
)
from pipeline.stages.plan import plan_tile
from schemas import ObjectInstance, Tile, Window

REPO = Path(__file__).resolve().parent.parent
UTM = "EPSG:32633"
ORIGIN = (500000.0, 4200000.0)
PIXEL = 0.5
GEOTRANSFORM = Affine(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])  # north-up, 0.5 m pixels


def params(**sections):
    raw = {"prepare": {"tile_size": 256, "stride": 256, "tiles_per_shard": 4},
           "runner": {"local_scheduler": "synchronous"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return parse_params(raw)


def write_geotiff(path: Path, data: np.ndarray, crs: str | None = UTM, nodata=None,
                  tiled: bool = False, **extra) -> Path:
    """(bands, H, W) array -> GeoTIFF (north-up, 0.5 m pixels) written in one go."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                   nodata=nodata, **extra)
    if crs:
        profile.update(crs=crs, transform=GEOTRANSFORM)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def tiles_of(folder: Path) -> list[Tile]:
    return [t for s in list_shards(folder) for t in read_records(s, Tile)]


# ---- reading ----------------------------------------------------------------------------------

def test_16bit_geotiff_tiles_keep_crs_transform_and_skip_nodata(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(1000, 3000, (3, 512, 512), dtype=np.uint16)
    data[:, :, 256:] = 0  # the east half is nodata
    data[:, 100:110, 100:110] = 3000
    scene = write_geotiff(tmp_path / "s16.tif", data, nodata=0)
    p = params(imagery={"max_nodata_share": 0.5})
    report = run_tile_imagery([scene], tmp_path / "tiles", p)
    tiles = {t.tile_id: t for t in tiles_of(tmp_path / "tiles")}
    # 2x2 windows; the two east ones are all nodata: skipped and counted
    assert sorted(tiles) == ["s16_0_256_0_256", "s16_256_512_0_256"]
    assert report["tiles_nodata"] == 2 and report["tiles"] == 2
    lower = tiles["s16_256_512_0_256"]
    assert lower.crs == UTM
    # the tile's transform maps its own pixel (0, 0) corner to the scene's pixel (0, 256)
    assert lower.transform == [PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1] - 256 * PIXEL]
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(tiles["s16_0_256_0_256"].image_png, np.uint8),
                                    cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    # 16-bit values stretched by the scene's 2nd-98th percentiles: the brightest saturate
    assert rgb[105, 105].tolist() == [255, 255, 255]
    assert 60 < rgb[:100, :100].mean() < 200
    scene_report = report["per_scene"][0]
    assert scene_report["dtype"] == "uint16" and scene_report["stretch"] is True


def test_band_choice_and_grey(tmp_path):
    data = np.stack([np.full((64, 64), v, np.uint8) for v in (10, 20, 30, 40)])
    four = write_geotiff(tmp_path / "four.tif", data)
    grey = write_geotiff(tmp_path / "grey.tif", data[:1])
    run_tile_imagery([four], tmp_path / "a", params(imagery={"bands": [3, 2, 1]}))
    run_tile_imagery([grey], tmp_path / "b", params())
    got = {t.image_name: cv2.imdecode(np.frombuffer(t.image_png, np.uint8), cv2.IMREAD_COLOR)
           for t in tiles_of(tmp_path / "a") + tiles_of(tmp_path / "b")}
    assert got["four"][0, 0].tolist()[::-1] == [30, 20, 10]  # (R, G, B) = bands 3, 2, 1
    assert got["grey"][0, 0].tolist() == [10, 10, 10]
    # default for four bands: 1, 2, 3 (the 4th is alpha or near infrared)
    info = describe_scene(four, ImageryParams(), PrepareParams())
    assert info.bands == (1, 2, 3)
    with pytest.raises(BadParamsError, match=r"band\(s\) \[5\]"):
        describe_scene(four, ImageryParams(bands=[5, 2, 1]), PrepareParams())


def test_unsupported_band_count_refused_in_one_line(tmp_path):
    two = write_geotiff(tmp_path / "two.tif", np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(BadImageError) as err:
        describe_scene(two, ImageryParams(), PrepareParams())
    line = err.value.one_line()
    assert "two.tif" in line and "2 bands" in line and "imagery.bands" in line
    assert "\n" not in line


def test_corrupt_and_truncated_tiff(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(BadImageError, match="cannot read TIFF") as err:
        run_tile_imagery([garbage], tmp_path / "t1", params())
    assert "garbage.tif" in err.value.one_line()
    assert not (tmp_path / "t1").exists()

    rng = np.random.default_rng(0)
    good = write_geotiff(tmp_path / "good.tif",
                         rng.integers(0, 255, (3, 512, 512), dtype=np.uint8), tiled=True)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadImageError, match="cannot read window") as err:
        run_tile_imagery([cut], tmp_path / "t2", params())
    assert "cut.tif" in err.value.one_line()
    assert not (tmp_path / "t2").exists()
    # on_error skip: the bad scenes are skipped and named, the good one is tiled
    report = run_tile_imagery([garbage, cut, good], tmp_path / "t3",
                              params(prepare={"on_error": "skip"}))
    assert sorted(s["scene"] for s in report["skipped_scenes"]) == ["cut", "garbage"]
    assert {t.image_name for t in tiles_of(tmp_path / "t3")} == {"good"}


def test_png_alpha_is_nodata_and_long_strips_are_cut_along_their_length(tmp_path):
    rgba = np.full((100, 1000, 4), 200, np.uint8)
    rgba[:, 700:, 3] = 0  # transparent = nodata
    cv2.imwrite(str(tmp_path / "strip.png"), rgba)
    report = run_tile_imagery([tmp_path / "strip.png"], tmp_path / "tiles",
                              params(prepare={"tile_size": 256, "stride": 256}))
    tiles = tiles_of(tmp_path / "tiles")
    # a 1000 x 100 strip: windows along x only; the last one (744..1000) is mostly nodata
    assert [(t.window.x0, t.window.x1) for t in tiles] == [(0, 256), (256, 512), (512, 768)]
    assert report["tiles_nodata"] == 1
    last = cv2.imdecode(np.frombuffer(tiles[-1].image_png, np.uint8), cv2.IMREAD_COLOR)
    assert last[:, 700 - 512:].max() == 0 and last[:, : 700 - 512].min() == 200
    assert all(t.crs is None and t.transform is None for t in tiles)
    assert scene_windows(100, 1000, 256, 256)[-1] == Window(y0=0, y1=100, x0=744, x1=1000)


# ---- memory -----------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    from pipeline.stages.new_imagery import run_tile_imagery
    from pipeline.core.params import parse_params
    p = parse_params({"prepare": {"tiles_per_shard": 4},
                      "imagery": {"gdal_cache_mb": 8},
                      "runner": {"local_scheduler": "synchronous"}})
    small, large, out = (Path(a) for a in sys.argv[1:4])
    run_tile_imagery([small], out / "warm", p)   # every code path loaded once
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    report = run_tile_imagery([large], out / "large", p)
    traced = tracemalloc.get_traced_memory()[1]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(json.dumps({"traced_peak": traced, "rss_growth": grown, "tiles": report["tiles"]}))
""")


def write_large_geotiff(path: Path, side: int) -> int:
    """A tiled 3-band uint16 GeoTIFF of side x side written by windows (never whole in
    memory); returns its decoded size in bytes."""
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint16",
                   crs=UTM, transform=GEOTRANSFORM, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    cols = np.arange(side, dtype=np.uint32)
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, side, 256):
            rows = np.arange(y0, min(y0 + 256, side), dtype=np.uint32)[:, None]
            band = ((rows * 7 + cols * 3) % 4000 + 500).astype(np.uint16)
            ds.write(np.stack([band, band // 2 + 300, 4500 - band]),
                     window=RioWindow(0, y0, side, len(rows)))
    return side * side * 3 * 2


def run_memory(tmp_path: Path, side: int) -> tuple[dict, int]:
    write_large_geotiff(tmp_path / "warm.tif", 1024)
    decoded = write_large_geotiff(tmp_path / "large.tif", side)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "warm.tif"),
                           str(tmp_path / "large.tif"), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), decoded


def test_large_scene_read_by_windows_in_bounded_memory(tmp_path):
    got, decoded = run_memory(tmp_path, 4096)  # 96 MiB decoded
    assert got["tiles"] == 49
    # what stays: one window, its 8-bit copy, a shard of PNGs and the stretch sample
    # (imagery.stretch_sample_pixels), none of which grows with the scene
    assert got["traced_peak"] < decoded / 5, got
    assert got["rss_growth"] < decoded / 2, got


@pytest.mark.slow
def test_8000px_scene_read_by_windows_in_bounded_memory(tmp_path):
    got, decoded = run_memory(tmp_path, 8000)  # 366 MiB decoded
    assert got["tiles"] == 13 * 13
    assert got["traced_peak"] < decoded / 20, got
    assert got["rss_growth"] < decoded / 8, got


# ---- labels -----------------------------------------------------------------------------------

DOTA = """imagesource:GoogleEarth
gsd:0.146
10 10 50 10 50 30 10 30 small-vehicle 0
100 100 100 100 100 100 100 100 ship 0
0 0 10 10 20 20 30 30 plane 1
60 60 90 60 90 80 60 80 Harbor 1
490 490 530 490 530 530 490 530 storage-tank 0
600 600 640 600 640 640 600 640 ship 0
"""


def test_dota_labels_parsed_with_degenerate_boxes_skipped_and_counted(tmp_path):
    path = tmp_path / "P1.txt"
    path.write_text(DOTA)
    counts = Counter()
    labels = parse_dota(path, ImageryParams(), counts)
    assert counts["boxes"] == 6 and counts["degenerate"] == 2  # a point, a line
    assert [(l.object_id, l.category, l.difficult) for l in labels] == [
        (3, "Small_Vehicle", False), (6, "Harbor", True), (7, "storage_tank", False),
        (8, "ship", False)]
    assert labels[0].geometry.area == 40 * 20
    dropped = Counter()
    assert len(parse_dota(path, ImageryParams(keep_difficult=False), dropped)) == 3
    assert dropped["difficult_dropped"] == 2  # checked first: the collinear one counts here
    # a box partly outside a 512 x 512 scene is clipped, one wholly outside is skipped
    clipped = Counter()
    kept = clip_to_scene(labels, 512, 512, clipped)
    assert clipped == {"clipped": 1, "outside_image": 1}
    assert [l.object_id for l in kept] == [3, 6, 7]
    assert kept[-1].geometry.bounds == (490, 490, 512, 512)


def test_malformed_dota_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("10 10 50 10 50 30 10 30 ship 0\n1 2 3 4 ship\n")
    with pytest.raises(BadAnnotationError, match="line 2") as err:
        parse_dota(path, ImageryParams(), Counter())
    assert "bad.txt" in err.value.one_line()
    path.write_text("10 10 50 x 50 30 10 30 ship 0\n")
    with pytest.raises(BadAnnotationError, match="line 1: coordinates must be numbers"):
        parse_dota(path, ImageryParams(), Counter())


def test_coco_labels_rasterised_into_each_tile(tmp_path):
    image = np.full((300, 400, 3), 120, np.uint8)
    cv2.imwrite(str(tmp_path / "scene.png"), image)
    square = [[240.0, 100.0, 280.0, 100.0, 280.0, 140.0, 240.0, 140.0]]  # crosses x = 256
    coco = {"images": [{"id": 1, "file_name": "scene.png", "height": 300, "width": 400}],
            "categories": [{"id": 12, "name": "Small_Vehicle"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 12, "segmentation": square,
                             "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    spec = mask_spec("coco", tmp_path / "coco.json")
    report = run_tile_imagery([tmp_path / "scene.png"], tmp_path / "tiles", params(), spec)
    found = {t.tile_id: t.objects for t in tiles_of(tmp_path / "tiles") if t.objects}
    # windows x: 0..256, 144..400; y: 0..256, 44..300; the square is in all four
    assert report["objects"] == 4 and len(found) == 4
    left = found["scene_0_256_0_256"][0]
    # the file's own category id travels with the object (to the COCO export)
    assert (left.object_id, left.category, left.category_id) == (5, "Small_Vehicle", 12)
    assert left.bbox == [240.0, 100.0, 16.0, 40.0] and left.area == 16 * 40
    assert masks.decode(left.mask).shape == (256, 256)


def test_small_scenes_are_packed_into_shards_in_order(tmp_path):
    for name in ("a", "b", "c"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((64, 64, 3), 100, np.uint8))
    jpeg = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "d.jpg"), jpeg)
    out = tmp_path.parent / f"{tmp_path.name}-tiles"  # outside the images it reads
    report = run_tile_imagery([tmp_path], out, params(prepare={"tiles_per_shard": 3}))
    shards = list_shards(out)
    assert [s.name for s in shards] == ["train-00000-of-00002.parquet",
                                        "train-00001-of-00002.parquet"]
    assert [[t.tile_id for t in read_records(s, Tile)] for s in shards] == [["a", "b", "c"],
                                                                          ["d"]]
    assert report["shards"] == 2 and [s["format"] for s in report["per_scene"]] == [
        "png", "png", "png", "jpeg"]
    assert read_records(shards[1], Tile)[0].width == 80


def test_masks_path_is_split_from_the_image_paths():
    assert set(MASK_SOURCES_WITH_PATH) == set(NEEDS_FILE)
    assert masks_argv(["annotate", "a.tif", "--masks", "dota", "labels/", "--out", "o"]) == [
        "annotate", "a.tif", "--masks", "dota", "--masks-path", "labels/", "--out", "o"]
    assert masks_argv(["annotate", "--masks=coco", "c.json", "a.png"]) == [
        "annotate", "--masks", "coco", "--masks-path", "c.json", "a.png"]
    assert masks_argv(["annotate", "a.png", "--masks", "sam", "b.png"]) == [
        "annotate", "a.png", "--masks", "sam", "b.png"]


def test_mask_source_arguments_are_checked(tmp_path):
    with pytest.raises(BadParamsError, match="takes no path"):
        mask_spec("sam", tmp_path)
    with pytest.raises(BadParamsError, match="needs a folder of DOTA label files"):
        mask_spec("dota", None)
    with pytest.raises(BadParamsError, match="is not one of"):
        mask_spec("yolo", tmp_path)
    with pytest.raises(EmptyInputError, match="DOTA label folder not found"):
        mask_spec("dota", tmp_path / "nope")
    # no masks at all: every caption would ground nothing and be dropped after being paid for
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(BadParamsError, match="no --masks"):
        run_annotate_imagery([tmp_path / "x.png"], tmp_path / "out", params(), None, None, None)
    assert not (tmp_path / "out").exists()


def utm_square(c0: float, r0: float, c1: float, r1: float) -> list:
    x0, y0 = ORIGIN[0] + c0 * PIXEL, ORIGIN[1] - r0 * PIXEL
    x1, y1 = ORIGIN[0] + c1 * PIXEL, ORIGIN[1] - r1 * PIXEL
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def feature_collection(rings: list, crs: str | None) -> dict:
    fc = {"type": "FeatureCollection",
          "features": [{"type": "Feature", "properties": {"category": "building"},
                        "geometry": {"type": "Polygon", "coordinates": r}} for r in rings]}
    if crs:
        fc["crs"] = {"type": "name", "properties": {"name": crs}}
    return fc


TRANSFORM = (PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])


def test_geojson_in_another_crs_is_reprojected(tmp_path):
    import pyproj

    ring = utm_square(100, 60, 140, 100)[0]
    to_wgs84 = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    lonlat = [list(to_wgs84.transform(x, y)) for x, y in ring]
    (tmp_path / "wgs84.geojson").write_text(json.dumps(feature_collection([[lonlat]], None)))
    counts = Counter()
    geo = read_geojson(tmp_path / "wgs84.geojson", ImageryParams(), counts)
    labels = geojson_scene_labels(geo, "s", UTM, TRANSFORM, 512, 512, counts)
    assert counts["reprojected"] == 1
    x0, y0, x1, y1 = labels[0].geometry.bounds
    assert np.allclose([x0, y0, x1, y1], [100, 60, 140, 100], atol=1e-3)
    assert labels[0].category == "building"


def test_geojson_crs_problems_are_refused_clearly(tmp_path):
    # no crs member: RFC 7946 says lon/lat, but these are UTM metres
    (tmp_path / "nocrs.geojson").write_text(
        json.dumps(feature_collection([utm_square(0, 0, 10, 10)], None)))
    with pytest.raises(BadAnnotationError, match="RFC 7946") as err:
        read_geojson(tmp_path / "nocrs.geojson", ImageryParams(), Counter())
    assert "nocrs.geojson" in err.value.one_line() and "\n" not in err.value.one_line()
    # ... which imagery.geojson_crs fixes
    geo = read_geojson(tmp_path / "nocrs.geojson", ImageryParams(geojson_crs=UTM), Counter())
    assert geo.crs == UTM
    # a CRS nobody knows cannot be reprojected
    (tmp_path / "odd.geojson").write_text(
        json.dumps(feature_collection([utm_square(0, 0, 10, 10)], "EPSG:999999")))
    geo = read_geojson(tmp_path / "odd.geojson", ImageryParams(), Counter())
    with pytest.raises(BadAnnotationError, match="cannot reproject from EPSG:999999"):
        geojson_scene_labels(geo, "s", UTM, TRANSFORM, 64, 64, Counter())
    # a scene without a CRS cannot take map coordinates
    with pytest.raises(BadAnnotationError, match="has no CRS"):
        geojson_scene_labels(geo, "plain", None, None, 64, 64, Counter())


# ---- unknown categories -----------------------------------------------------------------------

def unknown_tile() -> Tile:
    """A 256 px tile with two large (> plan.cluster_max_area) and seven small objects of
    unknown category."""
    image = np.full((256, 256, 3), 90, np.uint8)
    boxes = [(10, 10, 80, 80), (150, 20, 230, 100)] + [(10 + 12 * i, 200, 18 + 12 * i, 208)
                                                       for i in range(7)]
    objects = []
    for i, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        mask = np.zeros((256, 256), np.uint8)
        mask[y0:y1, x0:x1] = 1
        image[y0:y1, x0:x1] = 40 * (i % 5)
        objects.append(ObjectInstance(object_id=i, category=UNKNOWN_CATEGORY,
                                      bbox=[x0, y0, x1 - x0, y1 - y0],
                                      area=int(mask.sum()), mask=masks.encode(mask)))
    png = encode_png(image)
    return Tile(tile_id="u", source="imagery", split="train", image_name="u",
                window=Window(y0=0, y1=256, x0=0, x1=256), height=256, width=256,
                image_png=png, image_sha256=sha256(png), objects=objects)


def test_unknown_category_objects_get_category_free_prompts():
    plan, requests = plan_tile(unknown_tile(), PlanParams())
    instance = [r for r in requests if r.kind == "instance"]
    cluster = [r for r in requests if r.kind == "cluster"]
    assert len(instance) >= 2 and len(cluster) >= 1 and plan.clusters
    known = {"vehicle", "ship", "plane", "tank", "court", "building", "harbor", "bridge",
             "pool", "field", "roundabout", "helicopter", "diamond"}
    for r in instance + cluster:
        words = set(r.prompt.lower().replace(",", " ").replace(".", " ").split())
        assert not words & known, r.prompt
        assert "{" not in r.prompt and "object" in r.prompt
    assert instance[0].prompt.startswith("List down all the attributes of the object at the ")
    assert f"marked with number {instance[0].mark_number} " in instance[0].prompt
    assert cluster[0].prompt.startswith(
        f"Give a brief, single-sentence description of {plan.clusters[0].cluster_info} objects "
        f"at the {plan.clusters[0].region} ")
    # a known category still gets the paper's prompt
    tile = unknown_tile()
    known_tile = tile.model_copy(update={"objects": [
        o.model_copy(update={"category": "ship"}) for o in tile.objects]})
    _, requests = plan_tile(known_tile, PlanParams())
    assert any("ship at the" in r.prompt for r in requests if r.kind == "instance")
