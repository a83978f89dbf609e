"""Positional and category priors, and the instance vs cluster split with refined grids."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import BadParamsError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import PlanParams
from pipeline.geometry import masks
from pipeline.geometry.grid import position, region_name
from pipeline.geometry.priors import (
    category_prior,
    check_plan_params,
    cluster_info_word,
    instance_masks,
    parse_grid,
    split_instances,
)
from pipeline.stages.plan import plan_tile
from schemas import ObjectInstance, Tile, Window


def synthetic_tile(boxes: list[tuple[int, int, int, int]], categories: list[str] | str,
                   size: tuple[int, int] = (800, 800), tile_id: str = "S_0_800_0_800") -> Tile:
    """A tile with one filled rectangle (x0, y0, x1, y1) per object on a grey image."""
    h, w = size
    if isinstance(categories, str):
        categories = [categories] * len(boxes)
    objects = []
    for i, ((x0, y0, x1, y1), cat) in enumerate(zip(boxes, categories)):
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 1
        rle = masks.encode(m)
        objects.append(ObjectInstance(object_id=1000 + i, category=cat, bbox=masks.bbox(rle),
                                      area=int(m.sum()), mask=rle))
    image = np.full((h, w, 3), 90, np.uint8)
    png = encode_png(image)
    return Tile(tile_id=tile_id, source="test", split="val", image_name="S",
                window=Window(y0=0, y1=h, x0=0, x1=w), height=h, width=w, image_png=png,
                image_sha256=sha256(png), objects=objects)


def square(cx: int, cy: int, r: int = 4) -> tuple[int, int, int, int]:
    return cx - r, cy - r, cx + r, cy + r


@pytest.mark.parametrize("x, y, name", [
    (100, 100, "top left"), (400, 100, "top"), (700, 100, "top right"),
    (100, 400, "left"), (400, 400, "center"), (700, 400, "right"),
    (100, 700, "bottom left"), (400, 700, "bottom"), (700, 700, "bottom right"),
    (0, 0, "top left"), (800, 800, "bottom right"),           # the tile's own edges
    (800 / 3, 10, "top"), (800 / 3 - 0.01, 10, "top left"),    # split lines at W/3, 2W/3
    (10, 2 * 800 / 3, "bottom left"),
])
def test_position_names_the_papers_3x3_cells(x, y, name):
    assert position(x, y, 800, 800) == name


def test_position_on_non_square_tile_splits_each_axis_by_thirds():
    assert position(250, 10, 600, 300) == "top"        # 200 <= 250 < 400
    assert position(10, 250, 600, 300) == "bottom left"  # 250 >= 200


def test_region_names_of_refined_grids():
    assert parse_grid("1x2") == (1, 2)
    assert [region_name(1, 2, 0, c) for c in range(2)] == ["left side", "right side"]
    assert [region_name(2, 1, r, 0) for r in range(2)] == ["top half", "bottom half"]
    assert region_name(2, 2, 1, 0) == "bottom left"
    assert region_name(1, 1, 0, 0) == "whole image"
    assert parse_grid("4x5") == (4, 5)
    assert region_name(4, 5, 1, 2) == "row 2, column 3"
    for bad in ("3", "0x2", "axb", "3x"):
        with pytest.raises(BadParamsError, match="cluster_grids"):
            parse_grid(bad)


def test_category_prior_reads_like_the_paper():
    assert category_prior("Small_Vehicle") == "small vehicle"
    assert category_prior("Ground_Track_Field") == "ground track field"
    assert category_prior("Small_Vehicle", many=True) == "small vehicles"
    assert category_prior("ship", many=True) == "ships"


def test_position_uses_the_mask_centroid_not_the_box_centre():
    # A thick bar along the top plus a 1 px line down the left: box centre is the middle of
    # the tile, but the pixels are at the top.
    h = w = 600
    m = np.zeros((h, w), np.uint8)
    m[0:50, 0:500] = 1
    m[0:500, 0] = 1
    rle = masks.encode(m)
    tile = synthetic_tile([], [], size=(h, w))
    obj = ObjectInstance(object_id=7, category="Bridge", bbox=masks.bbox(rle),
                         area=int(m.sum()), mask=rle)
    tile = tile.model_copy(update={"objects": [obj]})
    bx, by, bw, bh = obj.bbox
    assert position(bx + bw / 2, by + bh / 2, w, h) == "center"
    plan, _ = plan_tile(tile, PlanParams())
    assert plan.positions == ["top"]
    (inst,) = instance_masks(tile.tile_id, h, w, tile.objects)
    ys, xs = np.nonzero(m)
    assert inst.centroid == pytest.approx((xs.mean() + 0.5, ys.mean() + 0.5))


def test_cluster_info_words_first_threshold_met():
    words = PlanParams().cluster_info
    assert cluster_info_word(25, words) == "numerous"
    assert cluster_info_word(20, words) == "numerous"
    assert cluster_info_word(19, words) == "many"
    assert cluster_info_word(9, words) == "several"
    assert cluster_info_word(3, words) == "a few"
    assert cluster_info_word(1, words) is None


def test_cluster_info_must_cover_the_smallest_cluster():
    with pytest.raises(BadParamsError, match="cluster_info"):
        check_plan_params(PlanParams(cluster_min_members=3, cluster_info=[(5, "several")]))


def _split(tile: Tile, **kw):
    params = PlanParams(**kw)
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    return split_instances(insts, tile.width, tile.height, params)


def test_cluster_split_follows_cluster_min_count():
    # six small vehicles in the top left cell, one large vehicle elsewhere
    boxes = [square(60 + 25 * i, 100) for i in range(6)] + [square(600, 600, 30)]
    tile = synthetic_tile(boxes, ["Small_Vehicle"] * 6 + ["Large_Vehicle"])
    split = _split(tile, cluster_min_count=6)
    assert len(split.clusters) == 1
    c = split.clusters[0]
    assert (c.cluster_id, c.category, c.grid, c.region) == ("c0", "Small_Vehicle", "3x3",
                                                            "top left")
    assert c.object_ids == [1000 + i for i in range(6)]
    assert c.cluster_info == "several"
    assert split.individual_ids == [1006]

    split = _split(tile, cluster_min_count=7)
    assert split.clusters == []
    assert split.individual_ids == [1000 + i for i in range(7)]


def test_cluster_max_area_keeps_large_objects_out_of_clusters():
    boxes = [square(60 + 25 * i, 100) for i in range(5)] + [square(120, 200, 40)]
    tile = synthetic_tile(boxes, "Small_Vehicle")
    split = _split(tile, cluster_min_count=6, cluster_max_area=100)
    assert [c.object_ids for c in split.clusters] == [[1000 + i for i in range(5)]]
    assert split.individual_ids == [1005]
    split = _split(tile, cluster_min_count=6, cluster_max_area=10_000)
    assert [c.object_ids for c in split.clusters] == [[1000 + i for i in range(6)]]


def _regions(split):
    return [(c.grid, c.region, c.object_ids) for c in split.clusters]


def test_a_concentrated_group_is_named_by_the_finest_cell_that_holds_it():
    # eight vehicles inside the 3x3 "bottom" cell
    tile = synthetic_tile([square(300 + 25 * i, 700) for i in range(8)], "Small_Vehicle")
    split = _split(tile, cluster_min_count=6, cluster_min_members=3)
    assert _regions(split) == [("3x3", "bottom", [1000 + i for i in range(8)])]
    assert split.individual_ids == []


def test_a_group_spanning_two_fine_cells_is_named_by_the_coarser_grid():
    # inside the 2x2 top-left quadrant, but across the 3x3 top-left and top cells
    boxes = [square(150 + 30 * i, 120) for i in range(8)]
    split = _split(synthetic_tile(boxes, "Small_Vehicle"), cluster_min_count=6,
                   cluster_min_members=3)
    assert _regions(split) == [("2x2", "top left", [1000 + i for i in range(8)])]


def test_a_group_spread_over_the_tile_is_split_on_the_coarsest_grid():
    boxes = [square(100 + 80 * i, 100 + 70 * (i % 9)) for i in range(9)]   # left to right
    split = _split(synthetic_tile(boxes, "Small_Vehicle"), cluster_min_count=6,
                   cluster_min_members=3)
    assert [(g, r) for g, r, _ in _regions(split)] == [("1x2", "left side"), ("1x2", "right side")]
    members = sorted(i for _, _, ids in _regions(split) for i in ids)
    assert members == [1000 + i for i in range(9)]


def test_region_share_decides_and_stragglers_stay_individual():
    # nine in the bottom cell, one straggler far away: 9/10 >= 0.8 -> "bottom" holds the group
    boxes = [square(300 + 22 * i, 700) for i in range(9)] + [square(60, 60)]
    tile = synthetic_tile(boxes, "Small_Vehicle")
    split = _split(tile, cluster_min_count=6, cluster_min_members=3)
    assert _regions(split) == [("3x3", "bottom", [1000 + i for i in range(9)])]
    assert split.individual_ids == [1009]
    # demanding the whole group in one cell: no cell holds all ten -> split on the 1x2 grid
    split = _split(tile, cluster_min_count=6, cluster_min_members=3, cluster_region_share=1.0)
    assert [(g, r) for g, r, _ in _regions(split)] == [("1x2", "left side"), ("1x2", "right side")]
    assert split.individual_ids == []


def test_with_only_a_fine_grid_spread_groups_form_one_cluster_per_full_cell():
    boxes = ([square(100 + 20 * i, 100) for i in range(3)] + [square(650 + 20 * i, 700)
                                                            for i in range(3)]
             + [square(400, 400)])
    split = _split(synthetic_tile(boxes, "Small_Vehicle"), cluster_min_count=6,
                   cluster_min_members=3, cluster_grids=["3x3"])
    assert _regions(split) == [("3x3", "top left", [1000, 1001, 1002]),
                               ("3x3", "bottom right", [1003, 1004, 1005])]
    assert split.individual_ids == [1006]
    split = _split(synthetic_tile(boxes, "Small_Vehicle"), cluster_min_count=6,
                   cluster_min_members=3, cluster_grids=["1x1"])
    assert _regions(split) == [("1x1", "whole image", [1000 + i for i in range(7)])]
    assert split.clusters[0].cluster_info == "several"


def test_clusters_of_several_categories_are_numbered_by_category_name():
    boxes = [square(60 + 25 * i, 100) for i in range(6)] + [square(60 + 25 * i, 700)
                                                            for i in range(6)]
    tile = synthetic_tile(boxes, ["Small_Vehicle"] * 6 + ["Large_Vehicle"] * 6)
    split = _split(tile, cluster_min_count=6)
    assert [(c.cluster_id, c.category, c.region) for c in split.clusters] == [
        ("c0", "Large_Vehicle", "bottom left"), ("c1", "Small_Vehicle", "top left")]


def test_an_object_on_a_cell_boundary_has_one_name_everywhere():
    """Pixels in columns 29 and 30 of a 90-wide tile: centroid 30.0 in continuous coordinates,
    on the 3x3 split line, so the later cell. The planner's prior and the template backend's
    measured cell must agree (they once used index and continuous centroids)."""
    from annotators.attributes import TileMeasure

    tile = synthetic_tile([(29, 44, 31, 46)], "ship", size=(90, 90), tile_id="B_0_90_0_90")
    plan, _ = plan_tile(tile, PlanParams(grid=3))
    measured = TileMeasure(tile.tile_id, plan.measurements).objects[tile.objects[0].object_id]
    assert plan.positions == ["center"]
    assert measured.cell == "center"
