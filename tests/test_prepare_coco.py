"""prepare, COCO adapter: a COCO json made here from the real P0005 masks (polygons, compressed
and uncompressed RLE) gives the devkit's tiles with every instance cropped to each tile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from isaid_reference import VALUE_TO_LABEL, read_rgb_values
from pycocotools import mask as mask_utils

from pipeline.core.errors import BadAnnotationError, DuplicateNameError, UnsafePathError
from pipeline.core.params import DataParams, Params, PrepareParams, RunnerParams
from pipeline.core.shards import list_shards, read_records
from pipeline.stages.prepare import discover_scenes, run_prepare, tile_scene
from schemas import Tile


def coco_params(root: Path, **prepare) -> Params:
    return Params(data=DataParams(source="coco", root=str(root), splits=["val"],
                                  coco_json="annotations_{split}.json", coco_images="images"),
                  prepare=PrepareParams(**prepare),
                  runner=RunnerParams(local_scheduler="synchronous"))


def uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, zeros first."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return [0] + runs if flat[0] else runs


def full_mask(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
    return mask_utils.decode(rle)


@pytest.fixture(scope="module")
def p0005_coco(tmp_path_factory, isaid_root) -> tuple[Path, dict]:
    """root/images/P0005.png + root/annotations_val.json built from the real P0005 masks."""
    root = tmp_path_factory.mktemp("coco")
    src = isaid_root / "train" / "images"
    (root / "images").mkdir()
    shutil.copy(src / "P0005.png", root / "images" / "P0005.png")
    ids = read_rgb_values(src / "P0005_instance_id_RGB.png")
    colours = read_rgb_values(src / "P0005_instance_color_RGB.png")
    height, width = ids.shape
    names = sorted({n for n in VALUE_TO_LABEL.values() if n != "unlabeled"})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    annotations = []
    for k, inst in enumerate(i for i in np.unique(ids) if i >= 1000):
        mask = (ids == inst).astype(np.uint8)
        label = VALUE_TO_LABEL[int(colours[ids == inst].min())]
        seg: object
        if k % 3 == 0:
            rle = mask_utils.encode(np.asfortranarray(mask))
            seg = {"size": [height, width], "counts": rle["counts"].decode()}
        elif k % 3 == 1:
            seg = {"size": [height, width], "counts": uncompressed_counts(mask)}
        else:
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            seg = [c.reshape(-1).tolist() for c in contours if len(c) >= 3]
            if not seg:
                continue
        annotations.append({"id": 100 + k, "image_id": 7, "category_id": cat_ids[label],
                            "segmentation": seg, "iscrowd": 0})
    coco = {"images": [{"id": 7, "file_name": "P0005.png", "height": height, "width": width}],
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]}
    (root / "annotations_val.json").write_text(json.dumps(coco))
    return root, coco


def test_coco_tiles_and_instances_follow_the_masks(p0005_coco, isaid_root):
    root, coco = p0005_coco
    params = coco_params(root)
    (scene,) = discover_scenes(params, "val")
    tiles, report = tile_scene(scene, params)
    isaid_params = Params(data=DataParams(root=str(isaid_root)))
    isaid_scene = next(s for s in discover_scenes(isaid_params, "train") if s.name == "P0005")
    isaid_tiles, _ = tile_scene(isaid_scene, isaid_params)
    assert [t.tile_id for t in tiles] == [t.tile_id for t in isaid_tiles]
    assert [t.image_sha256 for t in tiles] == [t.image_sha256 for t in isaid_tiles]
    assert {s for a in coco["annotations"] for s in [type(a["segmentation"]).__name__]} == {
        "list", "dict"}
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    small = 0
    for tile in tiles:
        w = tile.window
        expected = []
        for ann in coco["annotations"]:
            crop = full_mask(ann["segmentation"], 977, 884)[w.y0:w.y1, w.x0:w.x1]
            area = int(crop.sum())
            if area == 0:
                continue
            if area <= 10:
                small += 1
                continue
            ys, xs = np.nonzero(crop)
            expected.append((ann["id"], categories[ann["category_id"]], ann["category_id"], area,
                             [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                              float(ys.max() - ys.min() + 1)],
                             mask_utils.encode(np.asfortranarray(crop))["counts"].decode()))
        got = [(o.object_id, o.category, o.category_id, o.area, o.bbox, o.mask.counts)
               for o in tile.objects]
        assert got == expected
    assert report["objects"] == sum(len(t.objects) for t in tiles) > 100
    assert dict(report["dropped"]) == ({"small_area": small} if small else {})


def test_coco_run_prepare_writes_shards_and_report(p0005_coco, tmp_path):
    root, _ = p0005_coco
    report = run_prepare(coco_params(root, tiles_per_shard=2), tmp_path / "tiles")
    shards = list_shards(tmp_path / "tiles", "val")
    assert [p.name for p in shards] == ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    tiles = [t for p in shards for t in read_records(p, Tile)]
    assert len(tiles) == 4 and all(t.source == "coco" for t in tiles)
    assert report["source"] == "coco" and report["tiles"] == 4


BASE = {"images": [{"id": 1, "file_name": "P0001.png", "height": 40, "width": 40}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "iscrowd": 0,
                         "segmentation": [[2, 2, 30, 2, 30, 30, 2, 30]]}],
        "categories": [{"id": 3, "name": "plane"}]}


def _with(path: str, value):
    """BASE with one entry replaced (path like 'annotations.0.segmentation')."""
    coco = json.loads(json.dumps(BASE))
    node = coco
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[int(leaf) if leaf.isdigit() else leaf] = value
    return json.dumps(coco)


MALFORMED = {
    "not json": "{images: [",
    "not an object": "[1, 2]",
    "no annotations": json.dumps({"images": BASE["images"], "categories": BASE["categories"]}),
    "image without size": _with("images.0.height", None),
    "unknown image": _with("annotations.0.image_id", 99),
    "unknown category": _with("annotations.0.category_id", 99),
    "polygon of two points": _with("annotations.0.segmentation", [[1, 1, 5, 5]]),
    "odd polygon": _with("annotations.0.segmentation", [[1, 1, 5, 5, 9, 9, 3]]),
    "rle of another size": _with("annotations.0.segmentation", {"size": [20, 20], "counts": "00"}),
    "rle counts past the image": _with("annotations.0.segmentation",
                                       {"size": [40, 40], "counts": [10, 2000]}),
    "segmentation missing": _with("annotations.0.segmentation", None),
    "rle string malformed": _with("annotations.0.segmentation",
                                  {"size": [40, 40], "counts": "zzzzzzzz"}),
    "rle string of a larger mask": _with("annotations.0.segmentation",
                                         {"size": [40, 40], "counts": "0`h9"}),  # 100x100 ones
    "annotation id twice": json.dumps({**BASE, "annotations": BASE["annotations"] * 2}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_coco_json_is_a_bad_annotation_naming_the_file(tmp_path, case):
    (tmp_path / "annotations_val.json").write_text(MALFORMED[case])
    with pytest.raises(BadAnnotationError) as info:
        discover_scenes(coco_params(tmp_path), "val")
    assert "annotations_val.json" in info.value.one_line()


def _write_base(root: Path, coco: dict, image_hw=(40, 40)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / "P0001.png"), np.full((*image_hw, 3), 90, np.uint8))
    (root / "annotations_val.json").write_text(json.dumps(coco))


def test_image_size_other_than_the_json_says_is_a_bad_annotation(tmp_path):
    _write_base(tmp_path, BASE, image_hw=(40, 50))
    params = coco_params(tmp_path)
    with pytest.raises(BadAnnotationError, match="50x40") as info:
        tile_scene(discover_scenes(params, "val")[0], params)
    assert "annotations_val.json" in info.value.one_line()


def test_same_image_name_twice_is_a_duplicate(tmp_path):
    coco = json.loads(json.dumps(BASE))
    coco["images"].append({"id": 2, "file_name": "sub/P0001.jpg", "height": 40, "width": 40})
    _write_base(tmp_path, coco)
    with pytest.raises(DuplicateNameError, match="P0001") as info:
        discover_scenes(coco_params(tmp_path), "val")
    assert "annotations_val.json" in info.value.one_line()


def test_image_path_escaping_the_image_folder_is_refused(tmp_path):
    coco = json.loads(json.dumps(BASE))
    coco["images"][0]["file_name"] = "../../P0001.png"
    _write_base(tmp_path, coco)
    with pytest.raises(UnsafePathError, match="P0001"):
        discover_scenes(coco_params(tmp_path), "val")


def test_crowd_annotations_are_counted_not_kept(tmp_path):
    coco = json.loads(_with("annotations.0.iscrowd", 1))
    _write_base(tmp_path, coco)
    params = coco_params(tmp_path)
    tiles, report = tile_scene(discover_scenes(params, "val")[0], params)
    assert tiles[0].objects == [] and report["dropped"] == {"crowd": 1}
    plain_tiles, _ = tile_scene(discover_scenes(coco_params(_plain(tmp_path)), "val")[0],
                                coco_params(_plain(tmp_path)))
    assert [o.object_id for o in plain_tiles[0].objects] == [5]
    polygon = full_mask(BASE["annotations"][0]["segmentation"], 40, 40)
    assert plain_tiles[0].objects[0].area == int(polygon.sum()) > 700


def _plain(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    if not root.exists():
        _write_base(root, BASE)
    return root
