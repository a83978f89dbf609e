"""prepare, iSAID adapter: tiles and instances equal the devkit's, on the bundled real scenes.

The expected values come from tests/isaid_reference.py, a plain full-mask reading of the devkit
that shares no code with pipeline.sources.isaid. Small scenes for the edge cases are crops of the real
P0005 (image, id and colour masks) written by `write_crop` below.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from isaid_reference import devkit_scene, devkit_tiles

from pipeline.core.errors import BadMaskError
from pipeline.core.imaging import decode_png, sha256
from pipeline.core.params import DataParams, Params, PrepareParams, RunnerParams
from pipeline.core.shards import list_shards, read_records
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_CATEGORY_IDS
from pipeline.stages.prepare import discover_scenes, run_prepare, tile_scene
from schemas import Tile

SUFFIXES = ("", "_instance_id_RGB", "_instance_color_RGB")


def isaid_params(root: Path, **prepare) -> Params:
    return Params(data=DataParams(root=str(root)), prepare=PrepareParams(**prepare),
                  runner=RunnerParams(local_scheduler="synchronous"))


def write_crop(root: Path, split: str, stem: str, source: Path, box=(0, 0, 300, 300),
               edit=None) -> Path:
    """Copy a crop (y0, x0, h, w) of the real P0005 as scene `stem`; `edit(arrays)` may paint
    the BGR arrays (keys: '', '_instance_id_RGB', '_instance_color_RGB') first."""
    y0, x0, h, w = box
    arrays = {s: cv2.imread(str(source / "train" / "images" / f"P0005{s}.png"),
                            cv2.IMREAD_UNCHANGED)[y0:y0 + h, x0:x0 + w].copy() for s in SUFFIXES}
    if edit:
        edit(arrays)
    folder = root / split / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, array in arrays.items():
        cv2.imwrite(str(folder / f"{stem}{suffix}.png"), array)
    return folder / f"{stem}.png"


def bgr(value: int) -> tuple[int, int, int]:
    """A devkit value R + 256 G + 65536 B as the BGR pixel cv2 writes."""
    return (value >> 16, (value >> 8) & 255, value & 255)


def scene_by_name(params: Params, split: str, name: str):
    return next(s for s in discover_scenes(params, split) if s.name == name)


def as_reference(tile: Tile) -> dict:
    return {"tile_id": tile.tile_id,
            "window": (tile.window.y0, tile.window.y1, tile.window.x0, tile.window.x1),
            "objects": [{"object_id": o.object_id, "category": o.category, "area": o.area,
                         "bbox": o.bbox, "counts": o.mask.counts} for o in tile.objects]}


def test_p0003_tile_names_and_windows_follow_the_devkit(isaid_root):
    tiles, report = tile_scene(scene_by_name(isaid_params(isaid_root), "val", "P0003"),
                               isaid_params(isaid_root))
    assert [t.tile_id for t in tiles] == [
        "P0003_0_800_0_800", "P0003_223_1023_0_800", "P0003_0_800_347_1147",
        "P0003_223_1023_347_1147"]
    assert [(t.window.y0, t.window.y1, t.window.x0, t.window.x1) for t in tiles] == [
        (0, 800, 0, 800), (223, 1023, 0, 800), (0, 800, 347, 1147), (223, 1023, 347, 1147)]
    assert all((t.height, t.width) == (800, 800) for t in tiles)
    assert report["tiles"] == 4 and report["objects"] == sum(len(t.objects) for t in tiles)


@pytest.mark.parametrize("split,name", [("val", "P0003"), ("val", "P0004"), ("train", "P0005")])
def test_tiles_and_instances_equal_the_devkit_reading(isaid_root, split, name):
    params = isaid_params(isaid_root)
    scene = scene_by_name(params, split, name)
    tiles, report = tile_scene(scene, params)
    expected = devkit_scene(scene.image, scene.id_mask, scene.colour_mask)
    assert [as_reference(t) for t in tiles] == expected
    assert report["objects"] > 50  # the real scenes are dense: the comparison is not vacuous
    image = cv2.cvtColor(cv2.imread(str(scene.image)), cv2.COLOR_BGR2RGB)
    for tile in tiles:
        w = tile.window
        assert np.array_equal(decode_png(tile.image_png), image[w.y0:w.y1, w.x0:w.x1])
        assert tile.image_sha256 == sha256(tile.image_png)
        assert (tile.source, tile.split, tile.image_name) == ("isaid", split, name)
        for obj in tile.objects:  # the RLE is a mask of the tile's frame with `area` pixels
            assert obj.mask.size == [tile.height, tile.width]
            assert obj.category_id == ISAID_CATEGORY_IDS[obj.category]
            assert masks.area(obj.mask) == obj.area


def test_test_split_gives_tiles_without_objects(isaid_root):
    params = isaid_params(isaid_root)
    scene = scene_by_name(params, "test", "P0006")
    assert scene.id_mask is None and scene.colour_mask is None
    tiles, report = tile_scene(scene, params)
    assert [t.tile_id for t in tiles] == [n for n, _ in devkit_tiles(1529, 1054, "P0006")]
    assert len(tiles) == 6 and all(t.objects == [] for t in tiles)
    assert report["objects"] == 0


def test_drop_rules_and_tile_border_match_the_devkit(tmp_path, isaid_root):
    """Synthetic instances painted into a real crop: each devkit drop rule, counted by reason."""
    small_vehicle, large_vehicle = 8323072, 8355584

    def paint(arrays):
        ids, colours = arrays["_instance_id_RGB"], arrays["_instance_color_RGB"]
        ids[240:300, 230:300] = 0
        colours[240:300, 230:300] = 0

        def put(value, colour, rows, cols):
            ids[rows, cols] = bgr(value)
            colours[rows, cols] = bgr(colour)

        put(6000001, small_vehicle, slice(245, 246), slice(240, 242))  # 2 px: contour of 2 points
        put(6000002, small_vehicle, slice(250, 253), slice(240, 243))  # 3x3: area 9 <= 10
        put(6000003, 0, slice(260, 265), slice(240, 245))  # colour 0: unlabeled
        put(6000004, large_vehicle, slice(270, 276), slice(240, 246))  # 6x6 and ...
        put(6000004, large_vehicle, slice(290, 291), slice(250, 251))  # ... a 1-point part
        put(6000005, large_vehicle, slice(280, 284), slice(260, 264))  # 4x4: kept
        put(6000006, small_vehicle, slice(245, 257), slice(299, 300))  # 1x12 on the right edge
        put(999, small_vehicle, slice(285, 288), slice(280, 283))  # id < 1000: background

    image = write_crop(tmp_path, "val", "P0001", isaid_root, edit=paint)
    params = isaid_params(tmp_path)
    tiles, report = tile_scene(scene_by_name(params, "val", "P0001"), params)
    expected = devkit_scene(image, image.with_name("P0001_instance_id_RGB.png"),
                            image.with_name("P0001_instance_color_RGB.png"))
    assert [as_reference(t) for t in tiles] == expected
    kept = {o.object_id: o for o in tiles[0].objects}
    assert 6000005 in kept and kept[6000005].area == 16
    assert kept[6000006].bbox == [299.0, 245.0, 1.0, 12.0]
    assert not {6000001, 6000002, 6000003, 6000004, 999} & set(kept)
    assert report["dropped"] == {"small_contour": 2, "small_area": 1, "unlabeled": 1}


def _paint_unknown(colour_bgr):
    """Edit that paints half of one instance's colour pixels with a colour outside the palette."""
    def paint(arrays):
        ids = arrays["_instance_id_RGB"].astype(np.int64)
        values = ids[..., 2] + 256 * ids[..., 1] + 65536 * ids[..., 0]
        target = int(np.unique(values[values >= 1000])[0])
        rows, cols = np.nonzero(values == target)
        arrays["_instance_color_RGB"][rows[::2], cols[::2]] = colour_bgr
        paint.target, paint.pixels = target, len(rows[::2])
    return paint


def test_unknown_palette_colour_raises_naming_the_file_and_colour(tmp_path, isaid_root):
    write_crop(tmp_path, "val", "P0001", isaid_root, edit=_paint_unknown((5, 5, 5)))
    params = isaid_params(tmp_path)
    with pytest.raises(BadMaskError) as info:
        tile_scene(scene_by_name(params, "val", "P0001"), params)
    assert "P0001_instance_color_RGB.png" in info.value.one_line()
    assert "5,5,5" in info.value.one_line()


def test_unknown_palette_colour_is_dropped_and_counted_with_skip(tmp_path, isaid_root):
    paint = _paint_unknown((5, 5, 5))
    write_crop(tmp_path, "val", "P0001", isaid_root, edit=paint)
    params = isaid_params(tmp_path, on_error="skip")
    out = tmp_path.parent / f"{tmp_path.name}-tiles"  # outside the data root it reads
    report = run_prepare(params, out, splits=["val"])
    split = report["splits"]["val"]
    assert split["dropped"] == {"unknown_colour": 1}
    colour_file = str(tmp_path / "val" / "images" / "P0001_instance_color_RGB.png")
    assert split["unknown_colours"] == {colour_file: {"5,5,5": paint.pixels}}
    tiles = read_records(list_shards(out, "val")[0], Tile)
    assert paint.target not in {o.object_id for t in tiles for o in t.objects}
    assert json.loads((out / "report.json").read_text()) == report


def test_unknown_colour_above_the_category_keeps_the_instance_but_is_reported(tmp_path,
                                                                            isaid_root):
    """The devkit takes the smallest colour value: a larger stray colour does not change the
    category, but it is still listed in the report."""
    paint = _paint_unknown((255, 255, 255))
    write_crop(tmp_path, "val", "P0001", isaid_root, edit=paint)
    params = isaid_params(tmp_path)
    tiles, report = tile_scene(scene_by_name(params, "val", "P0001"), params)
    assert paint.target in {o.object_id for t in tiles for o in t.objects}
    assert list(report["unknown_colours"].values()) == [{"255,255,255": paint.pixels}]


def test_discovery_natural_order_and_skip_images(tmp_path, isaid_root):
    for stem in ("P10", "P2", "P1527", "P1"):
        write_crop(tmp_path, "test", stem, isaid_root, box=(0, 0, 40, 40))
    params = isaid_params(tmp_path)
    assert [s.name for s in discover_scenes(params, "test")] == ["P1", "P2", "P10"]
    report = run_prepare(params, tmp_path.parent / f"{tmp_path.name}-tiles", splits=["test"])
    assert report["splits"]["test"]["excluded_scenes"] == ["P1527"]
    assert report["splits"]["test"]["tiles"] == 3


@pytest.mark.parametrize("mode", ["RGBA", "grey", "16-bit"])
def test_images_of_other_depths_and_channels_become_rgb8(tmp_path, isaid_root, mode):
    def convert(arrays):
        img = arrays[""]
        if mode == "RGBA":
            arrays[""] = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
        elif mode == "grey":
            arrays[""] = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            arrays[""] = img.astype(np.uint16) * 257
        convert.rgb = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2RGB) \
            if mode == "grey" else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    write_crop(tmp_path, "val", "P0001", isaid_root, edit=convert)
    write_crop(tmp_path, "val", "P0002", isaid_root)
    params = isaid_params(tmp_path)
    converted, _ = tile_scene(scene_by_name(params, "val", "P0001"), params)
    plain, _ = tile_scene(scene_by_name(params, "val", "P0002"), params)
    assert np.array_equal(decode_png(converted[0].image_png), convert.rgb)
    assert converted[0].objects == plain[0].objects and plain[0].objects


def test_run_prepare_writes_shards_that_read_back_as_the_tiles(tmp_path, isaid_root):
    params = isaid_params(isaid_root, tiles_per_shard=4)
    out = tmp_path / "tiles"
    report = run_prepare(params, out, splits=["val", "test"])
    names = sorted(p.name for p in out.iterdir())
    assert names == [".geopixeld-stage.json", "report.json", "test-00000-of-00002.parquet", "test-00001-of-00002.parquet",
                     "val-00000-of-00003.parquet", "val-00001-of-00003.parquet",
                     "val-00002-of-00003.parquet"]
    val = [t for p in list_shards(out, "val") for t in read_records(p, Tile)]
    expected = [t for name in ("P0003", "P0004")
                for t in tile_scene(scene_by_name(params, "val", name), params)[0]]
    assert val == expected
    assert all(len(read_records(p, Tile)) <= 4 for p in list_shards(out))
    assert report["splits"]["val"]["tiles"] == 10 and report["tiles"] == 16
    assert report["objects"] == sum(len(t.objects) for t in val)
    assert report["splits"]["val"]["scenes"] == 2 and report["skipped_scenes"] == 0


def test_run_prepare_is_byte_identical_across_runs_and_schedulers(tmp_path, isaid_root):
    outs = []
    for i, scheduler in enumerate(["threads", "synchronous"]):
        params = Params(data=DataParams(root=str(isaid_root), splits=["val", "train"]),
                        prepare=PrepareParams(tiles_per_shard=3),
                        runner=RunnerParams(local_scheduler=scheduler, workers=2))
        run_prepare(params, tmp_path / f"run{i}")
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"run{i}").iterdir())})
    assert len(outs[0]) == 8  # 6 shards, report.json and the stage marker
    assert outs[0] == outs[1]
