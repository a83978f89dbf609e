"""Stage `plan`: TilePlans and Requests for synthetic tiles and a real iSAID tile."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from test_priors import square, synthetic_tile

from pipeline.core.errors import BadMaskError, BadParamsError, EmptyInputError
from pipeline.core.imaging import decode_png, encode_png, sha256
from pipeline.core.params import Params, PlanParams, RunnerParams
from pipeline.core.shards import read_records, write_records
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_COLOUR_TO_CATEGORY
from pipeline.stages.plan import plan_tile, run_plan
from schemas import ObjectInstance, Request, Tile, TilePlan, Window

VAL = Path(__file__).resolve().parents[1] / "data" / "isaid" / "val" / "images"


def _rgb_value(path: Path) -> np.ndarray:
    """R + 256 G + 65536 B of an RGB annotation PNG (the devkit's id and colour encoding)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.int64)
    return img[..., 0] + 256 * img[..., 1] + 65536 * img[..., 2]


def isaid_tile(y0: int = 223, x0: int = 0, size: int = 800) -> Tile:
    """A real tile: P0003 (iSAID val) cropped to one 800x800 window, its instances decoded from
    the id mask (ids >= 1000), categories from the colour mask (smallest value under the pixels)."""
    win = np.s_[y0:y0 + size, x0:x0 + size]
    ids = _rgb_value(VAL / "P0003_instance_id_RGB.png")[win]
    colours = _rgb_value(VAL / "P0003_instance_color_RGB.png")[win]
    objects = []
    for oid in np.unique(ids[ids >= 1000]):
        m = (ids == oid).astype(np.uint8)
        if m.sum() <= 10:
            continue
        rle = masks.encode(m)
        cat = ISAID_COLOUR_TO_CATEGORY[int(colours[ids == oid].min())]
        objects.append(ObjectInstance(object_id=int(oid), category=cat, bbox=masks.bbox(rle),
                                      area=int(m.sum()), mask=rle))
    image = np.ascontiguousarray(cv2.imread(str(VAL / "P0003.png"))[win][:, :, ::-1])
    png = encode_png(image)
    return Tile(tile_id=f"P0003_{y0}_{y0 + size}_{x0}_{x0 + size}", source="isaid", split="val",
                image_name="P0003", window=Window(y0=y0, y1=y0 + size, x0=x0, x1=x0 + size),
                height=size, width=size, image_png=png, image_sha256=sha256(png),
                objects=objects)


@pytest.fixture(scope="module")
def real_tile() -> Tile:
    return isaid_tile()


@pytest.fixture(scope="module")
def real_plan(real_tile):
    return plan_tile(real_tile, PlanParams())


def test_real_tile_every_object_is_marked_clustered_or_unplanned_once(real_tile, real_plan):
    plan, requests = real_plan
    assert len(real_tile.objects) > 20
    assert len(plan.positions) == len(real_tile.objects)
    marked = [m.object_id for m in plan.marks]
    clustered = [i for c in plan.clusters for i in c.object_ids]
    everything = marked + clustered + plan.unplanned_object_ids
    assert sorted(everything) == sorted(o.object_id for o in real_tile.objects)
    assert plan.marks and plan.clusters  # this window has both kinds
    assert [m.number for m in plan.marks] == list(range(1, len(plan.marks) + 1))
    kinds = [r.kind for r in requests]
    assert kinds == ["holistic"] + ["instance"] * len(plan.marks) + ["cluster"] * len(plan.clusters)


def test_request_images_are_the_som_image_or_the_tile(real_tile, real_plan):
    plan, requests = real_plan
    assert plan.som_png is not None and plan.som_sha256 == sha256(plan.som_png)
    som = decode_png(plan.som_png)
    assert som.shape == (real_tile.height, real_tile.width, 3)
    for r in requests:
        want = plan.som_sha256 if r.kind == "instance" else real_tile.image_sha256
        assert r.image_sha256 == want
        assert r.tile_id == real_tile.tile_id and r.prompt_version == "v1"
    assert len({r.request_id for r in requests}) == len(requests)
    assert all(len(r.request_id) == 24 for r in requests)


def test_instance_and_cluster_requests_name_their_objects(real_tile, real_plan):
    plan, requests = real_plan
    pos = dict(zip([o.object_id for o in real_tile.objects], plan.positions))
    for r, m in zip([r for r in requests if r.kind == "instance"], plan.marks):
        assert r.object_ids == [m.object_id] and r.mark_number == m.number
        assert r.position == pos[m.object_id]
        assert f"marked with number {m.number} " in r.prompt
    for r, c in zip([r for r in requests if r.kind == "cluster"], plan.clusters):
        assert r.object_ids == c.object_ids and r.cluster_id == c.cluster_id
        assert r.position == c.region and f" at the {c.region} in" in r.prompt


def test_plan_is_deterministic(real_tile, real_plan):
    again = plan_tile(real_tile, PlanParams())
    assert again == real_plan


def test_prompts_are_the_papers_wording():
    boxes = [square(100, 100, 10)] + [square(500 + 20 * i, 400) for i in range(6)]
    tile = synthetic_tile(boxes, ["Small_Vehicle"] + ["Large_Vehicle"] * 6)
    params = PlanParams(cluster_min_count=6, cluster_max_area=1000, cluster_grids=["1x2"])
    plan, requests = plan_tile(tile, params)
    prompts = {r.kind: r.prompt for r in requests}
    assert prompts["holistic"] == "Describe the image in four short sentences."
    assert prompts["instance"] == (
        "List down all the attributes of the small vehicle at the top left that is marked with "
        "number 1 in one short sentence. Do not mention the marked number in output.")
    assert prompts["cluster"] == (
        "Give a brief, single-sentence description of several large vehicles at the right side "
        "in the given aerial image, without extra explanations.")
    assert plan.marks[0].object_id == 1000


def test_tile_without_objects_gets_only_a_holistic_request():
    tile = synthetic_tile([], [])
    plan, requests = plan_tile(tile, PlanParams())
    assert [r.kind for r in requests] == ["holistic"]
    assert requests[0].image_sha256 == tile.image_sha256 and requests[0].object_ids == []
    assert plan.som_png is None and plan.som_sha256 is None
    assert plan.positions == [] and plan.marks == [] and plan.clusters == []


def test_mark_limit_and_min_area_send_the_rest_to_unplanned():
    # five objects far apart, areas 400, 324, 256, 196 and 16 px
    boxes = [square(100 + 150 * i, 400, r) for i, r in enumerate((10, 9, 8, 7, 2))]
    tile = synthetic_tile(boxes, "ship")
    plan, requests = plan_tile(tile, PlanParams(max_marks_per_tile=2, min_mark_area=25))
    assert sorted(m.object_id for m in plan.marks) == [1000, 1001]   # the two largest
    assert sorted(plan.unplanned_object_ids) == [1002, 1003, 1004]
    assert sum(r.kind == "instance" for r in requests) == 2
    plan, _ = plan_tile(tile, PlanParams(max_marks_per_tile=10, min_mark_area=25))
    assert plan.unplanned_object_ids == [1004]
    plan, requests = plan_tile(tile, PlanParams(max_marks_per_tile=0))
    assert plan.marks == [] and plan.som_png is None
    assert [r.kind for r in requests] == ["holistic"]


def test_mark_numbers_follow_reading_order():
    boxes = [square(600, 100, 10), square(100, 600, 12), square(100, 100, 8), square(400, 400, 11)]
    plan, _ = plan_tile(synthetic_tile(boxes, "plane"), PlanParams())
    by_number = sorted(plan.marks, key=lambda m: m.number)
    assert [m.object_id for m in by_number] == [1002, 1000, 1003, 1001]


def test_mask_of_another_size_is_refused():
    tile = synthetic_tile([square(100, 100)], "ship")
    other = synthetic_tile([square(100, 100)], "ship", size=(400, 400))
    tile = tile.model_copy(update={"objects": other.objects})
    with pytest.raises(BadMaskError, match="400x400 mask, the tile is 800x800"):
        plan_tile(tile, PlanParams())


# --------------------------------------------------------------------------- run_plan


def _write_tile_shards(folder: Path, real_tile: Tile) -> list[Path]:
    folder.mkdir(parents=True)
    a = [real_tile, synthetic_tile([], [], tile_id="E_0_800_0_800")]
    b = [synthetic_tile([square(100, 100, 10), square(400, 400, 10)], "ship",
                        tile_id="S_0_800_0_800")]
    paths = [folder / "val-00000-of-00002.parquet", folder / "val-00001-of-00002.parquet"]
    write_records(paths[0], a, Tile)
    write_records(paths[1], b, Tile)
    return paths


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_run_plan_writes_aligned_shards_and_a_report(tmp_path, real_tile, real_plan):
    _write_tile_shards(tmp_path / "tiles", real_tile)
    params = Params(runner=RunnerParams(local_scheduler="synchronous"))
    report = run_plan(params, tmp_path / "tiles", tmp_path / "plan")
    out = tmp_path / "plan"
    names = ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert sorted(p.name for p in (out / "tiles").iterdir()) == names
    for kind in ("holistic", "instance", "cluster"):
        assert sorted(p.name for p in (out / "requests" / kind).iterdir()) == names
    plans = read_records(out / "tiles" / names[0], TilePlan)
    assert [p.tile_id for p in plans] == [real_tile.tile_id, "E_0_800_0_800"]
    assert plans[0] == real_plan[0]
    inst = read_records(out / "requests" / "instance" / names[1], Request)
    assert [r.tile_id for r in inst] == ["S_0_800_0_800"] * 2

    real, _ = real_plan
    assert report["tiles"] == 3 and report["shards"] == 2
    assert report["objects"] == len(real_tile.objects) + 2
    assert report["marks"] == len(real.marks) + 2
    assert report["clusters"] == len(real.clusters)
    assert report["requests"] == {"holistic": 3, "instance": len(real.marks) + 2,
                                  "cluster": len(real.clusters)}
    assert report["unplanned_objects"] == len(real.unplanned_object_ids)
    assert report["unmarkable_objects"] == 0
    assert report["requests_per_tile"]["total"] == pytest.approx(
        (3 + len(real.marks) + 2 + len(real.clusters)) / 3, abs=1e-4)
    assert (out / "report.json").is_file()


def test_run_plan_twice_gives_identical_bytes(tmp_path, real_tile):
    _write_tile_shards(tmp_path / "tiles", real_tile)
    params = Params()  # default runner: threads
    run_plan(params, tmp_path / "tiles", tmp_path / "one")
    run_plan(params, tmp_path / "tiles", tmp_path / "two")
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 2 + 2 * 4  # report, marker, tiles/ and three requests/ kinds
    assert one == two


def test_run_plan_refuses_empty_input_and_bad_params(tmp_path):
    (tmp_path / "tiles").mkdir()
    with pytest.raises(EmptyInputError):
        run_plan(Params(), tmp_path / "tiles", tmp_path / "plan")
    with pytest.raises(BadParamsError, match="cluster_grids"):
        run_plan(Params(plan=PlanParams(cluster_grids=["3by3"])), tmp_path / "tiles",
                 tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


def test_run_plan_names_the_shard_with_a_bad_mask(tmp_path):
    tile = synthetic_tile([square(100, 100)], "ship")
    other = synthetic_tile([square(100, 100)], "ship", size=(400, 400))
    tile = tile.model_copy(update={"objects": other.objects})
    shard = tmp_path / "tiles" / "val-00000-of-00001.parquet"
    write_records(shard, [tile], Tile)
    with pytest.raises(BadMaskError) as err:
        run_plan(Params(runner=RunnerParams(local_scheduler="synchronous")),
                 tmp_path / "tiles", tmp_path / "plan")
    assert str(shard) in err.value.one_line()
    assert not (tmp_path / "plan").exists()
