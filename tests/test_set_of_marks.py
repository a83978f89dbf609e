"""Set-of-marks: anchors inside masks, squares disjoint and inside the image, digits drawn."""

from __future__ import annotations

import numpy as np
import pytest
from test_plan import isaid_tile
from test_priors import synthetic_tile

from pipeline.core.imaging import decode_png
from pipeline.core.params import MarkParams, PlanParams
from pipeline.geometry import masks
from pipeline.geometry.priors import instance_masks
from pipeline.geometry.set_of_marks import (
    draw_marks,
    mark_side,
    number_glyph,
    place_marks,
    render_set_of_marks,
)
from pipeline.stages.plan import plan_tile
from schemas import Mark, Tile

YELLOW = (255, 255, 0)


def assert_marks_valid(tile: Tile, marks: list[Mark], gap: int = 1) -> None:
    """Anchors inside their masks, boxes inside the image, no two boxes overlapping or touching."""
    objects = {o.object_id: o for o in tile.objects}
    for m in marks:
        mask = masks.decode(objects[m.object_id].mask)
        assert mask[m.y, m.x] == 1, f"mark {m.number} anchor outside object {m.object_id}"
        x0, y0, x1, y1 = m.box
        assert 0 <= x0 < x1 <= tile.width and 0 <= y0 < y1 <= tile.height
        assert x0 <= m.x < x1 and y0 <= m.y < y1
    for i, a in enumerate(marks):
        for b in marks[i + 1:]:
            apart_x = a.box[2] + gap <= b.box[0] or b.box[2] + gap <= a.box[0]
            apart_y = a.box[3] + gap <= b.box[1] or b.box[3] + gap <= a.box[1]
            assert apart_x or apart_y, f"marks {a.number} and {b.number} overlap or touch"


def assert_digits_drawn(image: np.ndarray, som: np.ndarray, marks: list[Mark]) -> None:
    """Inside each box only black and yellow pixels, a number's worth of yellow, mostly black;
    outside the boxes the image is unchanged."""
    outside = np.ones(image.shape[:2], bool)
    for m in marks:
        x0, y0, x1, y1 = m.box
        patch = som[y0:y1, x0:x1]
        yellow = (patch == YELLOW).all(axis=-1)
        black = (patch == 0).all(axis=-1)
        assert (yellow | black).all(), f"mark {m.number} has colours other than black and yellow"
        assert yellow.sum() >= 10, f"no digits in mark {m.number}"
        assert black.sum() > yellow.sum()
        assert not yellow[0].any() and not yellow[-1].any()          # digits not cut at the edge
        assert not yellow[:, 0].any() and not yellow[:, -1].any()
        outside[y0:y1, x0:x1] = False
    assert (som[outside] == image[outside]).all()


@pytest.fixture(scope="module")
def real():
    tile = isaid_tile(y0=0, x0=347)
    # no clusters and a high limit, so that many real instances get marks
    plan, _ = plan_tile(tile, PlanParams(cluster_min_count=1000, max_marks_per_tile=99,
                                         min_mark_area=0))
    return tile, plan


def test_real_tile_marks_are_inside_masks_and_disjoint(real):
    tile, plan = real
    assert len(plan.marks) >= 20
    assert_marks_valid(tile, plan.marks)
    marked = {m.object_id for m in plan.marks}
    assert marked | set(plan.unplanned_object_ids) == {o.object_id for o in tile.objects}


def test_real_tile_digits_are_drawn(real):
    tile, plan = real
    image, som = decode_png(tile.image_png), decode_png(plan.som_png)
    assert_digits_drawn(image, som, plan.marks)
    side = plan.marks[0].box[2] - plan.marks[0].box[0]
    assert all(m.box[2] - m.box[0] == side == m.box[3] - m.box[1] for m in plan.marks)
    glyph = number_glyph(max(m.number for m in plan.marks), 0.5, 1, 64)
    assert side >= max(glyph.shape) + 2 * MarkParams().padding


def test_mark_sits_at_the_distance_transform_maximum():
    tile = synthetic_tile([(100, 200, 161, 241)], "tennis_court")  # 61 x 41 rectangle
    plan, _ = plan_tile(tile, PlanParams())
    (m,) = plan.marks
    assert (m.x, m.y) == (130, 220)


def test_ten_tiny_objects_close_together_never_get_overlapping_marks():
    boxes = [(100 + 14 * i, 300, 112 + 14 * i, 312) for i in range(10)]  # 12x12, 14 px apart
    tile = synthetic_tile(boxes, "Small_Vehicle")
    params = PlanParams(cluster_min_count=1000, max_marks_per_tile=10, min_mark_area=0)
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    placed = place_marks(insts, tile.width, tile.height, 10, params.marks)
    assert len(placed.marks) + len(placed.unmarkable_ids) == 10
    assert 1 <= len(placed.marks) < 10 and placed.unmarkable_ids
    assert_marks_valid(tile, placed.marks)

    plan, requests = plan_tile(tile, params)
    assert_marks_valid(tile, plan.marks)
    assert sorted([m.object_id for m in plan.marks] + plan.unplanned_object_ids) == \
        [o.object_id for o in tile.objects]
    assert sum(r.kind == "instance" for r in requests) == len(plan.marks)
    assert_digits_drawn(decode_png(tile.image_png), decode_png(plan.som_png), plan.marks)


def test_colliding_best_anchor_moves_to_another_point_of_the_mask():
    # two 60 px long bands stacked 11 px apart: their best anchors collide, so the second mark
    # goes elsewhere along its band instead of being dropped
    tile = synthetic_tile([(100, 100, 160, 111), (100, 111, 160, 122)], "ship")
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    params = MarkParams()
    placed = place_marks(insts, tile.width, tile.height, 10, params)
    assert len(placed.marks) == 2 and placed.unmarkable_ids == []
    assert_marks_valid(tile, placed.marks)
    xs = sorted(m.x for m in placed.marks)
    assert xs[1] - xs[0] >= mark_side(2, params)
    # with a single candidate per object there is nowhere else to go
    placed = place_marks(insts, tile.width, tile.height, 10, params.model_copy(
        update={"candidates": 1}))
    assert len(placed.marks) == 1 and len(placed.unmarkable_ids) == 1


def test_marks_stay_inside_the_image_at_its_edges():
    boxes = [(0, 0, 30, 30), (780, 770, 800, 800), (0, 400, 3, 460)]  # last: 3 px strip at the edge
    tile = synthetic_tile(boxes, "storage_tank")
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    placed = place_marks(insts, tile.width, tile.height, 10, MarkParams())
    assert_marks_valid(tile, placed.marks)
    assert sorted(m.object_id for m in placed.marks) == [1000, 1001]
    assert placed.unmarkable_ids == [1002]   # no square fits with its centre on the strip


def test_mark_limit_leaves_the_rest_untried():
    boxes = [(100 + 100 * i, 100, 130 + 100 * i, 130) for i in range(4)]
    tile = synthetic_tile(boxes, "plane")
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    placed = place_marks(insts, tile.width, tile.height, 3, MarkParams())
    assert len(placed.marks) == 3 and placed.over_limit_ids == [1003]


def test_square_grows_with_the_font_and_the_number_of_digits():
    small, big = MarkParams(), MarkParams(font_scale=1.0, thickness=2)
    assert mark_side(9, small) < mark_side(10, small) < mark_side(10, big)
    for p in (small, big):
        for n in (1, 10, 99):
            glyph = number_glyph(n, p.font_scale, p.thickness, p.ink_threshold)
            assert mark_side(n, p) >= max(glyph.shape) + 2 * p.padding


def test_rendered_png_matches_drawn_pixels():
    tile = synthetic_tile([(200, 200, 260, 260)], "Harbor")
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    placed = place_marks(insts, tile.width, tile.height, 10, MarkParams())
    image = decode_png(tile.image_png)
    drawn = draw_marks(image, placed.marks, MarkParams())
    assert (decode_png(render_set_of_marks(image, placed.marks, MarkParams())) == drawn).all()
    assert_digits_drawn(image, drawn, placed.marks)


@pytest.mark.parametrize("level", [0, 1, 6])
def test_set_of_marks_png_is_lossless_at_every_level(level):
    tile = synthetic_tile([(200, 200, 260, 260), (40, 40, 90, 70)], "Harbor")
    insts = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    params = MarkParams(png_compression=level)
    placed = place_marks(insts, tile.width, tile.height, 10, params)
    image = decode_png(tile.image_png)
    png = render_set_of_marks(image, placed.marks, params)
    assert (decode_png(png) == draw_marks(image, placed.marks, params)).all()
    if level == 0:  # stored, unfiltered: the pixels plus a few bytes a row
        assert len(png) >= image.size
