"""SAM masks with a tiny random-initialised SAM built here (tests/tiny_sam.py), saved as a
checkpoint and loaded back through pipeline.sources.sam_masks.load_sam: box prompts in, masks of the
tile's size out, one image encoding per tile; the automatic generator's masks filtered and
given the unknown category; a missing or wrong checkpoint stops with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tiny_sam import MODEL_TYPE, build_tiny_sam, write_tiny_checkpoint

from pipeline.core.errors import BadParamsError
from pipeline.core.params import SamParams, parse_params
from pipeline.core.shards import list_shards, read_records
from pipeline.geometry import masks
from pipeline.geometry.categories import UNKNOWN_CATEGORY
from pipeline.sources import sam_masks
from pipeline.stages.new_imagery import mask_spec, run_annotate_imagery, run_tile_imagery
from schemas import Request, Tile

torch.set_num_threads(1)
sam_masks.register_model(MODEL_TYPE, build_tiny_sam)

# 600 x 400 scene, 256 px tiles -> windows x: 0, 256, 344; y: 0, 144 (six tiles)
DOTA = """imagesource:GoogleEarth
gsd:0.5
40 50 120 50 120 90 40 90 plane 0
400 300 500 300 500 330 400 330 ship 1
10 10 10 10 10 10 10 10 ship 0
0 0 5 5 10 10 15 15 ship 0
550 350 650 350 650 450 550 450 small-vehicle 0
700 700 720 700 720 720 700 720 ship 0
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth")


def sam_section(checkpoint: Path, **extra) -> dict:
    return {"checkpoint": str(checkpoint), "model_type": MODEL_TYPE, "device": "cpu", **extra}


def params(checkpoint: Path, **sam):
    return parse_params({"prepare": {"tile_size": 256, "stride": 256},
                         "annotate": {"cache": {"enabled": False}},
                         "runner": {"local_scheduler": "synchronous"},
                         "sam": sam_section(checkpoint, **sam)})


@pytest.fixture()
def scene(tmp_path) -> Path:
    image = np.full((400, 600, 3), 90, np.uint8)
    image[50:90, 40:120] = 220
    image[300:330, 400:500] = 30
    cv2.imwrite(str(tmp_path / "P9.png"), image)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "P9.txt").write_text(DOTA)
    return tmp_path / "P9.png"


def count_calls(module: torch.nn.Module, batch_of: str | None = None) -> list:
    """Batch size of every forward call of `module`: of its keyword input `batch_of`, else
    of its first positional input."""
    calls: list = []

    def hook(module, args, kwargs, out):
        calls.append((kwargs[batch_of] if batch_of else args[0]).shape[0])

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_checkpoint_is_loaded_and_box_prompts_give_tile_sized_masks(checkpoint):
    loaded = sam_masks.load_sam(SamParams(**sam_section(checkpoint)))
    saved = torch.load(checkpoint, weights_only=True)
    key = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(loaded.model.state_dict()[key], saved[key])  # weights from the file
    assert sam_masks.load_sam(SamParams(**sam_section(checkpoint))) is loaded  # once per process
    rgb = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 50], [100, 20, 290, 190], [0, 0, 300, 200]], np.float32)
    encoder = count_calls(loaded.model.image_encoder)
    decoder = count_calls(loaded.model.mask_decoder, batch_of="sparse_prompt_embeddings")
    out = sam_masks.box_masks(loaded, rgb, boxes, batch=2)
    assert out.shape == (3, 200, 300) and out.dtype == bool
    assert len(encoder) == 1  # encoded once for all three boxes
    assert decoder == [2, 1]  # decoded in batches of sam.box_batch boxes


def test_dota_boxes_one_encoding_per_tile(scene, checkpoint):
    p = params(checkpoint)
    encoder = count_calls(sam_masks.load_sam(p.sam).model.image_encoder)
    report = run_tile_imagery([scene], scene.parent / "tiles", p,
                              mask_spec("dota", scene.parent / "labels"))
    tiles = [t for s in list_shards(scene.parent / "tiles") for t in read_records(s, Tile)]
    with_boxes = [t for t in tiles if t.objects]
    assert len(tiles) == 6
    # the plane's tile; the ship reaches two tiles; one of them also has the clipped vehicle
    assert len(encoder) == len(with_boxes) == 3
    assert report["counts"]["box_prompts"] == 4 and report["objects"] == 4
    labels = report["per_scene"][0]["labels"]
    assert labels == {"boxes": 6, "clipped": 1, "degenerate": 2, "outside_image": 1}
    for tile in with_boxes:
        for obj in tile.objects:
            mask = masks.decode(obj.mask)
            assert mask.shape == (tile.height, tile.width) and mask.any()
    plane = next(o for t in with_boxes for o in t.objects if o.category == "plane")
    # clip_to_box: the mask never leaves the plane's box (columns 40..120, rows 50..90)
    x, y, w, h = plane.bbox
    assert x >= 40 and y >= 50 and x + w <= 120 and y + h <= 90


def test_sam_automatic_masks_are_filtered_and_unknown(scene, checkpoint):
    p = params(checkpoint, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
               min_area=20, max_area_share=1.0, max_overlap=1.0, max_objects_per_tile=3)
    encoder = count_calls(sam_masks.load_sam(p.sam).model.image_encoder)
    report = run_tile_imagery([scene], scene.parent / "tiles", p, mask_spec("sam", None))
    tiles = [t for s in list_shards(scene.parent / "tiles") for t in read_records(s, Tile)]
    assert len(encoder) == len(tiles) == 6  # one encoding per tile
    objects = [o for t in tiles for o in t.objects]
    assert objects and all(o.category == UNKNOWN_CATEGORY for o in objects)
    assert all(len(t.objects) <= 3 for t in tiles)
    assert all(o.mask.size == [t.height, t.width] for t in tiles for o in t.objects)
    assert report["counts"]["sam_tiles"] == 6


def test_filter_masks_drops_small_large_and_overlapping():
    def box(y0, y1, x0, x1):
        m = np.zeros((100, 100), bool)
        m[y0:y1, x0:x1] = True
        return m

    candidates = [box(0, 10, 0, 10), box(0, 9, 0, 9), box(50, 52, 50, 52), box(0, 90, 0, 90),
                  box(20, 40, 20, 40)]
    scores = [0.9, 0.8, 0.99, 0.95, 0.5]
    params = SamParams(min_area=10, max_area_share=0.5, max_overlap=0.5)
    kept, dropped = sam_masks.filter_masks(candidates, scores, None, params)
    assert kept == [0, 4]  # best score first; 1 lies under 0, 2 is small, 3 is background
    assert dropped == {"small": 1, "large": 1, "overlap": 1, "over_limit": 0}
    valid = np.zeros((100, 100), bool)
    valid[:, :25] = True  # masks are cut to valid pixels first: the background mask shrinks
    kept, _ = sam_masks.filter_masks(candidates, scores, valid, params)  # under max_area_share
    assert kept == [3]  # ... and now covers all the others


def test_dota_run_end_to_end_without_crs_has_no_geo_outputs(scene, checkpoint):
    out = scene.parent / "out"
    summary = run_annotate_imagery([scene], out, params(checkpoint), "dota",
                                   scene.parent / "labels", None)
    assert summary["objects"] == 4 and summary["phrases"] >= 1
    assert summary["calls"] == summary["calls_by_pass"]["holistic"] + \
        summary["calls_by_pass"]["instance"] + summary["calls_by_pass"]["cluster"]
    assert summary["georeferenced"] is False and not (out / "export" / "geojson").exists()
    assert json.loads((out / "summary.json").read_text()) == summary
    prompts = [r.prompt for s in list_shards(out / "plan" / "requests" / "instance")
               for r in read_records(s, Request)]
    assert any("plane at the" in p for p in prompts)  # a known category keeps its prompt


def test_missing_checkpoint_is_one_clear_line(scene, tmp_path):
    missing = tmp_path / "nowhere" / "sam_vit_h.pth"
    p = parse_params({"sam": {"checkpoint": str(missing)}})
    with pytest.raises(BadParamsError) as err:
        run_annotate_imagery([scene], tmp_path / "out", p, "sam", None, None)
    line = err.value.one_line()
    assert line == f"bad parameters: {missing}: sam.checkpoint: file not found"
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadParamsError, match="sam.checkpoint: SAM masks need a checkpoint"):
        run_annotate_imagery([scene], tmp_path / "out", parse_params({}), "dota",
                             scene.parent / "labels", None)


def test_wrong_checkpoint_or_model_type_is_refused(tmp_path, checkpoint):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BadParamsError, match="not a tiny SAM checkpoint") as err:
        sam_masks.load_sam(SamParams(**sam_section(junk)))
    assert "junk.pth" in err.value.one_line() and "\n" not in err.value.one_line()
    # a state_dict of another shape (here: a key missing) is refused, not loaded half
    state = torch.load(checkpoint, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BadParamsError, match="not a tiny SAM checkpoint.*iou_token"):
        sam_masks.load_sam(SamParams(**sam_section(tmp_path / "partial.pth")))
    with pytest.raises(BadParamsError, match="sam.model_type: 'vit_x'"):
        sam_masks.load_sam(SamParams(**{**sam_section(checkpoint), "model_type": "vit_x"}))
