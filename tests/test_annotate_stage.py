"""The annotate stage: request shards in, response shards (same names, same order) out.

Tiles come from the real iSAID sample P0003 (two devkit windows), cut by a small builder that
stands in for the prepare stage; requests and set-of-marks plans are written by hand.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import BadParamsError, EmptyInputError
from pipeline.core.imaging import decode_png, encode_png, sha256
from pipeline.core.params import Params
from pipeline.core.shards import read_records, shard_name, write_records
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_COLOUR_TO_CATEGORY
from pipeline.geometry.grid import position
from pipeline.stages.annotate import run_annotate
from schemas import Mark, ObjectInstance, Request, Response, Tile, TilePlan, Window

ISAID_VAL = Path(__file__).resolve().parents[1] / "data" / "isaid" / "val" / "images"
WINDOWS = [(0, 0), (223, 347)]  # (y0, x0) of two devkit windows of P0003 (1023 x 1147)


def _scalar(path: Path, crop: tuple[slice, slice]) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)[crop]
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@lru_cache(maxsize=None)
def p0003_tile(y0: int, x0: int, size: int = 800) -> Tile:
    """An 800x800 window of P0003 with its instances (devkit id and category rules)."""
    crop = (slice(y0, y0 + size), slice(x0, x0 + size))
    pixels = cv2.cvtColor(cv2.imread(str(ISAID_VAL / "P0003.png")), cv2.COLOR_BGR2RGB)[crop]
    ids = _scalar(ISAID_VAL / "P0003_instance_id_RGB.png", crop)
    colours = _scalar(ISAID_VAL / "P0003_instance_color_RGB.png", crop)
    objects = []
    for object_id in np.unique(ids[ids >= 1000]):
        mask = (ids == object_id).astype(np.uint8)
        rle = masks.encode(mask)
        objects.append(ObjectInstance(
            object_id=int(object_id), category=ISAID_COLOUR_TO_CATEGORY[int(colours[mask > 0].min())],
            bbox=masks.bbox(rle), area=int(mask.sum()), mask=rle))
    png = encode_png(np.ascontiguousarray(pixels))
    return Tile(tile_id=f"P0003_{y0}_{y0 + size}_{x0}_{x0 + size}", source="isaid", split="val",
                image_name="P0003", window=Window(y0=y0, y1=y0 + size, x0=x0, x1=x0 + size),
                height=size, width=size, image_png=png, image_sha256=sha256(png),
                objects=objects)


def plan_of(tile: Tile, marked: list[ObjectInstance]) -> TilePlan:
    """A set-of-marks plan: a black square drawn at each marked object's centroid."""
    pixels = decode_png(tile.image_png)
    marks = []
    for number, obj in enumerate(marked, start=1):
        x, y, w, h = obj.bbox
        cx, cy = int(x + w / 2), int(y + h / 2)
        cv2.rectangle(pixels, (cx - 6, cy - 6), (cx + 6, cy + 6), (0, 0, 0), thickness=-1)
        marks.append(Mark(object_id=obj.object_id, number=number, x=cx, y=cy,
                          box=[cx - 6, cy - 6, cx + 7, cy + 7]))
    som = encode_png(pixels)
    return TilePlan(tile_id=tile.tile_id, split=tile.split,
                    positions=[position(o.bbox[0] + o.bbox[2] / 2, o.bbox[1] + o.bbox[3] / 2,
                                         tile.width, tile.height) for o in tile.objects],
                    marks=marks, clusters=[], unplanned_object_ids=[], som_png=som,
                    som_sha256=sha256(som))


def build_inputs(root: Path) -> tuple[Path, Path, dict[str, list[Request]]]:
    """tiles/ and plan/ folders with one shard per tile; returns the requests per kind."""
    tiles_dir, plan_dir = root / "tiles", root / "plan"
    requests: dict[str, list[Request]] = {"holistic": [], "instance": []}
    for i, (y0, x0) in enumerate(WINDOWS):
        tile = p0003_tile(y0, x0)
        name = shard_name("val", i, len(WINDOWS))
        marked = tile.objects[:4]
        plan = plan_of(tile, marked)
        write_records(tiles_dir / name, [tile], Tile)
        write_records(plan_dir / "tiles" / name, [plan], TilePlan)
        holistic = [Request(request_id=f"{tile.tile_id}/holistic", tile_id=tile.tile_id,
                            kind="holistic", prompt="Describe the image in four short sentences.",
                            prompt_version="v1", image_sha256=tile.image_sha256, object_ids=[])]
        if i == 1:  # a request whose tile is not in its shard: answered as failed
            holistic.append(holistic[0].model_copy(update={"request_id": "stray/holistic",
                                                           "tile_id": "P0003_0_800_347_1147"}))
        instance = [Request(request_id=f"{tile.tile_id}/instance/{m.number}", tile_id=tile.tile_id,
                            kind="instance", prompt=f"(mark {m.number})", prompt_version="v1",
                            image_sha256=plan.som_sha256, object_ids=[m.object_id],
                            category=obj.category, position=plan.positions[k],
                            mark_number=m.number)
                    for k, (m, obj) in enumerate(zip(plan.marks, marked))]
        # reversed: the stage must keep the shard's order, whatever it is
        instance = instance[::-1]
        for kind, reqs in (("holistic", holistic), ("instance", instance)):
            write_records(plan_dir / "requests" / kind / name, reqs, Request)
            requests[kind].extend(reqs)
    return tiles_dir, plan_dir, requests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("annotate-inputs"))


@pytest.mark.parametrize("kind", ["holistic", "instance"])
def test_stage_writes_responses_in_request_order(inputs, tmp_path, kind):
    tiles_dir, plan_dir, requests = inputs
    # one stray request fails on purpose: let the stage finish and count it
    params = Params.model_validate({"annotate": {"max_failed_share": 0.5}})
    out = tmp_path / "responses" / kind
    report = run_annotate(params, kind, tiles_dir, plan_dir, out, scheduler=None)

    names = sorted(p.name for p in (plan_dir / "requests" / kind).glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == names
    responses = [r for name in names for r in read_records(out / name, Response)]
    assert [r.request_id for r in responses] == [r.request_id for r in requests[kind]]
    failed = [r for r in responses if r.status == "failed"]
    expected_failed = 1 if kind == "holistic" else 0
    assert len(failed) == expected_failed
    assert all(r.text and r.backend == "template" for r in responses if r.status == "ok")
    assert report["requests"] == len(requests[kind])
    assert report["ok"] == len(requests[kind]) - expected_failed
    assert report["failed"] == expected_failed
    assert report["by_backend"] == {"template/template-v2": {
        "requests": report["requests"], "ok": report["ok"], "failed": report["failed"]}}
    assert report["tokens"]["total"] == 0 and report["cost_usd"] == 0
    assert (out / "report.json").is_file()


def test_second_run_is_byte_identical(inputs, tmp_path):
    tiles_dir, plan_dir, _ = inputs
    first, second = tmp_path / "first", tmp_path / "second"
    run_annotate(Params(), "instance", tiles_dir, plan_dir, first)
    run_annotate(Params(), "instance", tiles_dir, plan_dir, second)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir()) and "report.json" in files
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_missing_tiles_shard_stops_before_writing(inputs, tmp_path):
    _, plan_dir, _ = inputs
    out = tmp_path / "responses"
    with pytest.raises(EmptyInputError) as err:
        run_annotate(Params(), "holistic", tmp_path / "no-tiles", plan_dir, out)
    assert "val-00000-of-00002.parquet" in err.value.one_line()
    assert not out.exists()


def test_unknown_kind_and_missing_requests_are_user_errors(inputs, tmp_path):
    tiles_dir, plan_dir, _ = inputs
    with pytest.raises(BadParamsError):
        run_annotate(Params(), "captions", tiles_dir, plan_dir, tmp_path / "out")
    with pytest.raises(EmptyInputError):
        run_annotate(Params(), "cluster", tiles_dir, plan_dir, tmp_path / "out")
