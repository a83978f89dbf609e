"""Hostile geometry through the real CLI (issue 13, class C): polygons, boxes, RLE masks, ids
and category names from a user's COCO json, GeoJSON file or DOTA labels.

Every case runs `geopixeld` in a subprocess (tests/hostile.py). A refused input must end with
exit code 2 and one stderr line naming the problem, and leave every file outside the command's
own output as it was. Coordinates far outside the image (1e8, 1e9, -1e15) are not refused but
clipped, and must finish in seconds under an address-space limit (they used to take ~12 GB or
crash pycocotools with a segmentation fault).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import yaml
from hostile import REPO, assert_one_line, assert_refused, cli_env, tree_digest
from pycocotools import mask as mask_utils
from rasterio.transform import Affine

from pipeline.core.shards import list_shards, read_records
from schemas import Tile

H, W = 64, 80  # the scene: one tile
# what a bounded run may use: the address space of the whole CLI process (Python, numpy,
# torch, dask threads), far below the ~12 GB a 1e8 polygon used to need
ADDRESS_SPACE = 3 << 30
SECONDS = 90  # wall-clock limit of a bounded run (a refused or clipped one takes a few)
ANNOTATE_OUT = ["out", ".cache"]
UTM = "EPSG:32633"
ORIGIN = (500000.0, 4200000.0)
PIXEL = 0.5


# ---- workspaces and inputs --------------------------------------------------------------------

@pytest.fixture()
def ws(tmp_path) -> Path:
    """A user's folder: params.yaml (template backend) and scene.png (64 x 80)."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cv2.imwrite(str(root / "scene.png"), np.full((H, W, 3), 120, np.uint8))
    return root


def coco(segmentation=None, annotation=None, category=None, image=None) -> dict:
    """A COCO json for scene.png with one annotation; fields overridden as given."""
    ann = {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0,
           "segmentation": [[10, 10, 50, 10, 50, 40]] if segmentation is None else segmentation}
    ann.update(annotation or {})
    cat = {"id": 1, "name": "Small_Vehicle"}
    cat.update(category or {})
    img = {"id": 1, "file_name": "scene.png", "height": H, "width": W}
    img.update(image or {})
    return {"images": [img], "categories": [cat], "annotations": [ann]}


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def annotate_coco(ws: Path, content) -> list[str]:
    write(ws / "coco.json", content)
    return ["annotate", "scene.png", "--out", "out", "--masks", "coco", "coco.json"]


def geotiff_ws(ws: Path) -> None:
    """scene.tif: a georeferenced copy of the scene (UTM 33N, 0.5 m pixels)."""
    data = np.full((3, H, W), 120, np.uint8)
    with rasterio.open(ws / "scene.tif", "w", driver="GTiff", width=W, height=H, count=3,
                       dtype="uint8", crs=UTM,
                       transform=Affine(PIXEL, 0.0, ORIGIN[0], 0.0, -PIXEL, ORIGIN[1])) as ds:
        ds.write(data)


def utm(c: float, r: float) -> list[float]:
    return [ORIGIN[0] + c * PIXEL, ORIGIN[1] - r * PIXEL]


def feature(coordinates=None, geometry_type="Polygon", **extra) -> dict:
    if coordinates is None:
        coordinates = [[utm(10, 10), utm(40, 10), utm(40, 30), utm(10, 30), utm(10, 10)]]
    out = {"type": "Feature", "properties": {"category": "building"},
           "geometry": {"type": geometry_type, "coordinates": coordinates}}
    out.update(extra)
    return out


def annotate_geojson(ws: Path, *features, raw: str | None = None) -> list[str]:
    geotiff_ws(ws)
    fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": "urn:ogc:def:crs:EPSG::32633"}}, "features": list(features)}
    write(ws / "labels.geojson", raw if raw is not None else fc)
    return ["annotate", "scene.tif", "--out", "out", "--masks", "geojson", "labels.geojson"]


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(args: list[str], cwd: Path, bootstrap: str | None = None
                ) -> tuple[subprocess.CompletedProcess, float]:
    """`geopixeld ARGS` under a timeout, and, unless a `bootstrap` (which imports torch: its
    thread pools need more address space than a limit can tell apart from a leak) replaces
    `python -m pipeline.cli`, under the address-space limit; (process, seconds)."""
    command = ([sys.executable, "-c", bootstrap, *map(str, args)] if bootstrap
               else [sys.executable, "-m", "pipeline.cli", *map(str, args)])
    start = time.monotonic()
    proc = subprocess.run(command, cwd=cwd, env=cli_env(MALLOC_ARENA_MAX="2"),
                          capture_output=True, text=True, timeout=SECONDS,
                          preexec_fn=None if bootstrap else _limits)
    return proc, time.monotonic() - start


def refused_bounded(args: list[str], ws: Path, *needles: str, may_change=ANNOTATE_OUT,
                    bootstrap: str | None = None) -> str:
    """`assert_refused`, but bounded as `run_bounded` runs it."""
    keep_out = [ws / p for p in may_change]
    before = tree_digest(ws, keep_out)
    proc, _ = run_bounded(args, ws, bootstrap)
    line = assert_one_line(proc, *needles)
    after = tree_digest(ws, keep_out)
    assert before == after, sorted(k for k in before.keys() | after.keys()
                                   if before.get(k) != after.get(k))
    return line


def only_object(out: Path) -> np.ndarray:
    """The full mask of the one object the run found (the scene is one tile)."""
    tiles = [t for s in list_shards(out / "tiles") for t in read_records(s, Tile)]
    assert len(tiles) == 1 and len(tiles[0].objects) == 1, [len(t.objects) for t in tiles]
    rle = tiles[0].objects[0].mask
    return mask_utils.decode({"size": rle.size, "counts": rle.counts.encode()})


def pycocotools_mask(polygons: list) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, H, W)))


# ---- COCO polygons far outside the image: clipped, bounded ------------------------------------

@pytest.mark.parametrize("far", [1e8, 1e9])
def test_far_coco_vertex_is_clipped_in_seconds_and_bounded_memory(ws, far):
    # the triangle below y = x: inside the image the same pixels as a triangle reaching 100
    proc, seconds = run_bounded(annotate_coco(ws, coco([[0, 0, far, 0, far, far]])), ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < SECONDS
    assert np.array_equal(only_object(ws / "out"), pycocotools_mask([[0, 0, 100, 0, 100, 100]]))


def test_huge_negative_coordinates_cover_the_image(ws):
    big = 1e15
    proc, _ = run_bounded(annotate_coco(ws, coco([[-big, -big, big, -big, 0, big]])), ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert only_object(ws / "out").sum() == H * W


def test_far_polygon_through_prepare_in_a_built_workspace(workspace):
    """`prepare --source coco` in a user's folder with a finished build: clipped, bounded,
    and build/ untouched; then a nested-too-deep json is refused the same way."""
    src = workspace / "coco_src"
    (src / "images").mkdir(parents=True)
    cv2.imwrite(str(src / "images" / "scene.png"), np.full((H, W, 3), 90, np.uint8))
    write(src / "ann.json", coco([[0, 0, 1e9, 0, 1e9, 1e9]]))
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["data"].update(source="coco", root="coco_src", splits=["val"], coco_json="ann.json",
                       coco_images="images")
    (workspace / "coco.yaml").write_text(yaml.safe_dump(raw))
    args = ["prepare", "--params", "coco.yaml", "--out", "coco_tiles"]
    before = tree_digest(workspace, [workspace / "coco_tiles"])
    proc, seconds = run_bounded(args, workspace)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree_digest(workspace, [workspace / "coco_tiles"]) == before
    (tile,) = [t for s in list_shards(workspace / "coco_tiles") for t in read_records(s, Tile)]
    assert tile.objects[0].area == int(pycocotools_mask([[0, 0, 100, 0, 100, 100]]).sum())
    write(src / "ann.json", "[" * 100_000 + "]" * 100_000)
    assert_refused(args, workspace, "ann.json", "nests deeper than 64 levels",
                   may_change=["coco_tiles"])
    (src / "ann.json").unlink()
    (src / "ann.json").mkdir()
    assert_refused(args, workspace, "ann.json", "is a folder, not a file",
                   may_change=["coco_tiles"])


# ---- COCO refusals ------------------------------------------------------------------------------

COCO_REFUSED = {
    "coordinate beyond 2**53": (coco([[0, 0, 1e300, 0, 5, 5]]), "within +-2**53"),
    "negative coordinate beyond 2**53": (coco([[0, 0, -1e17, 0, 5, 5]]), "within +-2**53"),
    "NaN token": (json.dumps(coco()).replace("[10, 10, 50", "[NaN, 10, 50"),
                  "NaN is not a JSON number"),
    "Infinity token": (json.dumps(coco()).replace("[10, 10, 50", "[-Infinity, 10, 50"),
                       "Infinity is not a JSON number"),
    "1e400 overflows to infinity": (json.dumps(coco()).replace("[10, 10, 50", "[1e400, 10, 50"),
                                    "too large for a float"),
    "integer of 400 digits": (json.dumps(coco()).replace("[10, 10, 50", "[1" + "0" * 400 + ", 10, 50"),
                              "within +-2**53"),
    "strings as coordinates": (coco([["10", "10", "50", "10", "50", "40"]]),
                               "a string where a number belongs"),
    "booleans as coordinates": (coco([[True, 10, 50, 10, 50, 40]]),
                                "a boolean where a number belongs"),
    "nested list as a coordinate": (coco([[[10, 10], [50, 10], [50, 40]]]),
                                    "a list where a number belongs"),
    "odd-length ring": (coco([[10, 10, 50, 10, 50, 40, 7]]), "7 coordinates"),
    "two points": (coco([[10, 10, 50, 10]]), "at least 3 points"),
    "empty segmentation": (coco([]), "empty segmentation"),
    "segmentation a number": (coco(7), "segmentation is an integer"),
    "bbox with NaN": (json.dumps(coco(annotation={"bbox": [1, 2, 3, 4]})).replace(
        "[1, 2, 3, 4]", "[1, NaN, 3, 4]"), "NaN is not a JSON number"),
    "bbox with a string": (coco(annotation={"bbox": [1, "2", 3, 4]}), "bbox holds a string"),
    "RLE of another size": (coco({"size": [10, 10], "counts": [100]}),
                            "RLE size [10, 10] differs from its image's [64, 80]"),
    "RLE size of 2**40 squared": (coco({"size": [2 ** 40, 2 ** 40], "counts": [0]}),
                                  "differs from its image's"),
    "RLE counts past the image": (coco({"size": [H, W], "counts": [H * W, 10 ** 12]}),
                                  "cover"),
    "RLE negative count": (coco({"size": [H, W], "counts": [H * W + 1, -1]}),
                           "non-negative integers"),
    "RLE counts an object": (coco({"size": [H, W], "counts": {"a": 1}}),
                             "neither a string nor a list"),
    "RLE counts string malformed": (coco({"size": [H, W], "counts": "\u00e9\u00e9"}),
                                    "RLE counts string is malformed"),
    "category name a number": (coco(category={"name": 7}), "name must be a string, not an integer"),
    "category name an object": (coco(category={"name": {"en": "car"}}),
                                "name must be a string, not an object"),
    "category name a list": (coco(category={"name": ["car"]}),
                             "name must be a string, not a list"),
    "annotation id 2**70": (coco(annotation={"id": 2 ** 70}), "outside the 64-bit range"),
    "annotation id a float": (coco(annotation={"id": 5.5}), "id must be an integer, not a number"),
    "category_id a list": (coco(annotation={"category_id": [1]}),
                           "category_id must be an integer, not a list"),
    "image_id a dict": (coco(annotation={"image_id": {"id": 1}}),
                        "image_id must be an integer, not an object"),
    "iscrowd a string": (coco(annotation={"iscrowd": "no"}), "iscrowd must be 0 or 1"),
    "image of 2**33 pixels": (coco(image={"height": 2 ** 17, "width": 2 ** 16}),
                              "more than the 4294967295 pixels"),
    "zigzag outline": (coco([[0, 0, W, H] * 10_000]), "outline of"),
    "nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
    "lone surrogate in a name": (json.dumps(coco(category={"name": "car"})).replace(
        '"car"', '"\\ud800car"'), "lone surrogate"),
    "not UTF-8": (b"\xff\xfe{\x00}", "not UTF-8 text"),
    "RLE counts string of a megabyte": (coco({"size": [H, W], "counts": "0" * 1_000_000}),
                                        "more runs than a 64x80 mask has pixels"),
    "a million polygons": (coco([[1, 1, 2, 1, 2, 2]] * 1_000_000), "more than the 10000"),
}


# run through the CLI (a few seconds each); every case above also runs in-process below
COCO_CLI = ["coordinate beyond 2**53", "NaN token", "Infinity token", "strings as coordinates",
            "odd-length ring", "empty segmentation", "bbox with NaN", "RLE of another size",
            "category name a number", "category name an object", "category name a list",
            "annotation id 2**70", "zigzag outline", "nested 100,000 deep",
            "lone surrogate in a name", "not UTF-8"]
# in the default run, one CLI case per kind of check (number range, JSON token, RLE, category
# type, nesting, encoding, outline size); the others are marked slow: their refusal is the same
# path through the CLI, and every case runs in-process in the default run
COCO_CLI_SLOW = {"Infinity token", "strings as coordinates", "odd-length ring",
                 "empty segmentation", "bbox with NaN", "category name an object",
                 "category name a list", "annotation id 2**70", "lone surrogate in a name"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in COCO_CLI_SLOW
                                  else c for c in COCO_CLI])
def test_hostile_coco_is_refused_in_one_line(ws, case):
    content, needle = COCO_REFUSED[case]
    refused_bounded(annotate_coco(ws, content), ws, "coco.json", needle)


# "a million polygons" takes ~25 s (a 30 MB json read through the guarded reader): slow; the
# default run keeps the other size limits (zigzag outline, megabyte RLE string, 100,000 deep)
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if c == "a million polygons" else c for c in COCO_REFUSED])
def test_every_hostile_coco_is_one_bad_annotation_in_process(tmp_path, case):
    from pipeline.core.errors import BadAnnotationError
    from pipeline.sources.coco_source import read_coco

    content, needle = COCO_REFUSED[case]
    with pytest.raises(BadAnnotationError) as err:
        read_coco(write(tmp_path / "coco.json", content))
    line = err.value.one_line()
    assert needle in line and "coco.json" in line and "\n" not in line


def test_refused_coco_through_the_plain_harness(ws):
    """The same refusal through `assert_refused` as the other hostile suites run it."""
    assert_refused(annotate_coco(ws, coco([[0, 0, 1e300, 0, 5, 5]])), ws, "bad annotation",
                   "coco.json", "annotation 5", may_change=ANNOTATE_OUT)


# ---- GeoJSON ------------------------------------------------------------------------------------

GEOJSON_REFUSED = {
    "NaN coordinates": (None, json.dumps(feature()).replace(str(utm(40, 10)[0]), "NaN", 1),
                        "NaN is not a JSON number"),
    "coordinate beyond 2**53": ([feature([[utm(0, 0), [1e300, 0.0], utm(5, 5)]])], None,
                                "within +-2**53"),
    "strings as coordinates": ([feature([[["1", "2"], utm(1, 0), utm(5, 5)]])], None,
                               "a string where a number belongs"),
    "position of four numbers": ([feature([[[1, 2, 3, 4], utm(1, 0), utm(5, 5)]])], None,
                                 "is not [x, y] or [x, y, z]"),
    "ring of two positions": ([feature([[utm(0, 0), utm(1, 0)]])], None, "fewer than 3"),
    "coordinates a number": ([feature(5)], None, "Polygon coordinates must be a list"),
    "feature id 2**70": ([feature(id=2 ** 70)], None, "outside the 64-bit range"),
    "feature id a float": ([feature(id=1.5)], None, "id must be an integer or a string"),
    "feature id an object": ([feature(id={"a": 1})], None, "not an object"),
    "unsupported geometry type": ([feature(geometry_type="Circle")], None,
                                  "geometry type 'Circle' is not a GeoJSON geometry"),
    "geometry a list": ([{**feature(), "geometry": [1, 2]}], None,
                        "geometry must be an object or null"),
    "category an object": ([{**feature(), "properties": {"category": {"x": 1}}}], None,
                           "must be a string or an integer, not an object"),
    "category a list": ([{**feature(), "properties": {"category": ["car"]}}], None,
                        "must be a string or an integer, not a list"),
    "category a float": ([{**feature(), "properties": {"category": 2.5}}], None,
                         "not a number"),
    "properties a list": ([{**feature(), "properties": [1]}], None,
                          "properties must be an object or null"),
    "nested 100,000 deep": (None, "[" * 100_000 + "]" * 100_000, "nests deeper than 64"),
}


def geojson_args(ws: Path, case: str) -> list[str]:
    features, one, _ = GEOJSON_REFUSED[case]
    if one is not None and one.startswith("{"):  # one feature's text, spliced in
        fc = json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
            "name": "urn:ogc:def:crs:EPSG::32633"}}, "features": ["@"]})
        return annotate_geojson(ws, raw=fc.replace('"@"', one))
    if one is not None:
        return annotate_geojson(ws, raw=one)
    return annotate_geojson(ws, *features)


GEOJSON_CLI = ["NaN coordinates", "coordinate beyond 2**53", "feature id 2**70",
               "unsupported geometry type", "category an object"]
# slow: the same refusal path through the CLI as the two kept; all run in-process below
GEOJSON_CLI_SLOW = {"coordinate beyond 2**53", "feature id 2**70", "category an object"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if c in GEOJSON_CLI_SLOW else c for c in GEOJSON_CLI])
def test_hostile_geojson_is_refused_in_one_line(ws, case):
    refused_bounded(geojson_args(ws, case), ws, "labels.geojson", GEOJSON_REFUSED[case][2])


@pytest.mark.parametrize("case", list(GEOJSON_REFUSED))
def test_every_hostile_geojson_is_one_bad_annotation_in_process(ws, case):
    from collections import Counter

    from pipeline.core.errors import BadAnnotationError
    from pipeline.core.params import ImageryParams
    from pipeline.sources.label_sources import read_geojson

    geojson_args(ws, case)
    with pytest.raises(BadAnnotationError) as err:
        read_geojson(ws / "labels.geojson", ImageryParams(), Counter())
    line = err.value.one_line()
    assert GEOJSON_REFUSED[case][2] in line and "labels.geojson" in line


def test_geojson_integer_category_and_string_id_follow_the_documented_rules(ws):
    """A class code 3 is the category "3" with id 3; a string id gives the feature's
    position."""
    args = annotate_geojson(ws, {**feature(), "id": "way/17", "properties": {"category": 3}})
    proc, _ = run_bounded(args, ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tile,) = [t for s in list_shards(ws / "out" / "tiles") for t in read_records(s, Tile)]
    assert [(o.object_id, o.category, o.category_id) for o in tile.objects] == [(1, "3", 3)]


# ---- DOTA ---------------------------------------------------------------------------------------

# the CLI with the tiny test SAM registered (DOTA boxes are SAM prompts; no real weights here)
TINY_SAM_CLI = (
    "import runpy, sys; sys.path.insert(0, {tests!r}); "
    "from tiny_sam import MODEL_TYPE, build_tiny_sam; from pipeline.sources import sam_masks; "
    "sam_masks.register_model(MODEL_TYPE, build_tiny_sam); "
    "sys.argv = ['geopixeld', *sys.argv[1:]]; runpy.run_module('pipeline.cli', run_name='__main__')"
).format(tests=str(REPO / "tests"))


@pytest.fixture()
def dota_ws(ws) -> Path:
    from tiny_sam import MODEL_TYPE, write_tiny_checkpoint

    write_tiny_checkpoint(ws / "tiny_sam.pth")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["sam"].update(checkpoint="tiny_sam.pth", model_type=MODEL_TYPE, device="cpu")
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    (ws / "labels").mkdir()
    return ws


DOTA_REFUSED = [
    ("10 10 50 x 50 30 10 30 ship 0", "line 1: coordinates must be numbers"),
    ("nan 10 50 10 50 30 10 30 ship", "line 1: coordinates must be numbers"),
    ("1_0 10 50 10 50 30 10 30 ship", "line 1: coordinates must be numbers"),
    ("\uff11 10 50 10 50 30 10 30 ship", "line 1: coordinates must be numbers"),
    ("1e400 10 50 10 50 30 10 30 ship", "line 1: coordinates must be finite numbers"),
    ("1e300 10 50 10 50 30 10 30 ship", "line 1: coordinates must be finite numbers"),
    ("\x00\x01\x02 garbage", "line 1: expected"),
]


@pytest.mark.slow  # ~20 s (torch + tiny SAM); the DOTA CLI refusal stays in the default run
# (not UTF-8, below) and every garbage line runs in-process
def test_dota_garbage_line_is_refused_in_one_line(dota_ws):
    write(dota_ws / "labels" / "scene.txt", "10 10 50 x 50 30 10 30 ship 0\n")
    refused_bounded(["annotate", "scene.png", "--out", "out", "--masks", "dota", "labels"],
                    dota_ws, "scene.txt", "line 1: coordinates must be numbers",
                    bootstrap=TINY_SAM_CLI)


@pytest.mark.parametrize("line, needle", DOTA_REFUSED)
def test_every_dota_garbage_line_is_one_bad_annotation_in_process(tmp_path, line, needle):
    from collections import Counter

    from pipeline.core.errors import BadAnnotationError
    from pipeline.core.params import ImageryParams
    from pipeline.sources.label_sources import parse_dota

    with pytest.raises(BadAnnotationError) as err:
        parse_dota(write(tmp_path / "scene.txt", line + "\n"), ImageryParams(), Counter())
    assert needle in err.value.one_line() and "scene.txt" in err.value.one_line()


def test_dota_file_not_utf8_is_refused_in_one_line(dota_ws):
    write(dota_ws / "labels" / "scene.txt", b"10 10 50 10 50 30 10 30 \xff\xfe 0\n")
    refused_bounded(["annotate", "scene.png", "--out", "out", "--masks", "dota", "labels"],
                    dota_ws, "scene.txt", "not UTF-8 text", bootstrap=TINY_SAM_CLI)


# ---- GeoPixel release files (read by finetune; no CLI of their own) -----------------------------

def geopixel_release(root: Path, polygons=None, segmentation=None, raw: str | None = None) -> Path:
    """A one-sample GeoPixel release (40 x 60 tile, one [SEG]): `polygons` are the [SEG]'s
    list of polygons, `segmentation` its inline RLE, `raw` the polygon file's text."""
    from pipeline.core.imaging import encode_png
    from pipeline.core.params import ExportParams

    folder = root / "data" / "GeoPixelD" / "train"
    folder.mkdir(parents=True)
    (folder / "X1.png").write_bytes(encode_png(np.full((40, 60, 3), 90, np.uint8)))
    item = {"id": 0, "image": "data/GeoPixelD/train/X1.png", "conversations": [
        {"from": "human", "value": ExportParams().instruction_for("X1").text},
        {"from": "bot", "value": "A <p> ship </p> [SEG] ."}]}
    if segmentation is not None:
        item["segmentation"] = [segmentation]
    else:
        item["polygons"] = "data/GeoPixelD/train/X1.json"
        write(folder / "X1.json", raw if raw is not None else {"id": 0, "polygons": [polygons]})
    return write(root / "data" / "GeoPixelD.json", [item])


GEOPIXEL_REFUSED = {
    "point at 1e300": (dict(polygons=[[[1e300, 5], [3, 4], [5, 6]]]), "X1.json", "within +-2**53"),
    "NaN token": (dict(raw='{"polygons": [[[NaN, 5], [3, 4], [5, 6]]]}'), "X1.json",
                  "NaN is not a JSON number"),
    "string coordinate": (dict(polygons=[[["1", 5], [3, 4], [5, 6]]]), "X1.json",
                          "a string where a number belongs"),
    "point of three numbers": (dict(polygons=[[[1, 5, 7], [3, 4, 1]]]), "X1.json",
                               "is not [x, y]"),
    "five thousand polygons": (dict(polygons=[[[1, 1], [2, 1], [2, 2]]] * 5000), "X1.json",
                               "more than the 4096"),
    "RLE size a number": (dict(segmentation={"size": 5, "counts": "0"}), "GeoPixelD.json",
                          "RLE without a [height, width] size"),
    "RLE of another size": (dict(segmentation={"size": [4, 4], "counts": [16]}),
                            "GeoPixelD.json", "differs from its image's [40, 60]"),
    "RLE counts an object": (dict(segmentation={"size": [40, 60], "counts": {"a": 1}}),
                             "GeoPixelD.json", "neither a string nor a list"),
}


@pytest.mark.parametrize("case", list(GEOPIXEL_REFUSED))
def test_hostile_geopixel_release_is_one_bad_annotation(tmp_path, case):
    from pipeline.core.errors import BadAnnotationError
    from pipeline.formats.geopixel_format import read_geopixel

    masks_given, file_name, needle = GEOPIXEL_REFUSED[case]
    listing = geopixel_release(tmp_path, **masks_given)
    with pytest.raises(BadAnnotationError) as err:
        read_geopixel(listing, tmp_path)
    assert needle in err.value.one_line() and file_name in err.value.one_line()


def test_geopixel_polygon_far_outside_is_clipped_not_wrapped(tmp_path):
    """int32 casts of 1e15 used to wrap: the triangle below y = x fills as one reaching 100."""
    import cv2 as cv

    from pipeline.formats.geopixel_format import read_geopixel
    from pipeline.geometry import masks

    listing = geopixel_release(tmp_path, polygons=[[[0, 0], [1e15, 0], [1e15, 1e15]]])
    ((record, _),) = read_geopixel(listing, tmp_path)
    expected = np.zeros((40, 60), np.uint8)
    cv.fillPoly(expected, [np.array([[0, 0], [100, 0], [100, 100]], np.int32)], 1)
    assert np.array_equal(masks.decode(record.phrases[0].mask), expected)


# ---- predictions (evaluate) ---------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    ([{"image_id": "x", "pred_masks": [{"size": [2 ** 40, 2 ** 40], "counts": [0]}]}],
     "is not a mask size"),
    ([{"image_id": "x", "pred_masks": [{"size": [4, 4], "counts": [True] * 16}]}],
     "non-negative integers"),
    ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
])
def test_hostile_predictions_are_refused_in_one_line(workspace, content, needle):
    write(workspace / "predictions.json", content)
    assert_refused(["evaluate", "--records", "build/export/parquet", "--predictions",
                    "predictions.json", "--out", "ev", "--metrics", "ev_metrics.json"],
                   workspace, "predictions.json", needle, may_change=["ev", "ev_metrics.json"])
