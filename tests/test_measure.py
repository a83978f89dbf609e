"""Measuring a tile once (`pipeline.geometry.measure`): the numbers equal their plain definitions, plan
stores them, and the template backend says the same from the stored numbers as from the tile.

The definitions the fast code must equal: median colour = `round(np.median(pixels, axis=0))`,
shape = `cv2.minAreaRect` of every pixel of the mask, COCO run lengths = pycocotools' decoder.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from test_template_backend import isaid_tile

from annotators.base import AnnotationContext
from annotators.template import TemplateBackend
from pipeline.core.params import BackendParams, PlanParams
from pipeline.geometry import masks, measure
from pipeline.stages.plan import plan_tile


def _reference_shape(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    ys, xs = np.nonzero(mask)
    corners = cv2.boxPoints(cv2.minAreaRect(np.column_stack([xs, ys]).astype(np.float32)))
    a, b = corners[1] - corners[0], corners[2] - corners[1]
    la, lb = float(np.hypot(*a)), float(np.hypot(*b))
    edge = a if la >= lb else b
    angle = math.degrees(math.atan2(float(edge[1]), float(edge[0]))) % 180.0
    return float(xs.mean()), float(ys.mean()), max(la, lb) + 1, min(la, lb) + 1, angle


def test_shape_and_colour_equal_their_definitions_on_every_real_instance():
    tile = isaid_tile()
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(tile.image_png, np.uint8),
                                      cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert len(tile.objects) > 30
    for obj in tile.objects:
        full = masks.decode(obj.mask)
        crop, x0, y0 = masks.decode_crop(obj.mask)
        cx, cy, long, short, angle = measure.mask_shape(crop)
        rcx, rcy, rlong, rshort, rangle = _reference_shape(full)
        assert (cx + x0, cy + y0) == pytest.approx((rcx, rcy), abs=1e-6)
        assert (long, short) == pytest.approx((rlong, rshort), abs=1e-3)
        if long / short > 1.2:  # the long axis is defined
            assert min(abs(angle - rangle), 180 - abs(angle - rangle)) < 1e-3
        pixels = image[full > 0]
        expected = tuple(int(round(v)) for v in np.median(pixels, axis=0))
        assert measure.median_colour(pixels) == expected


def test_run_lengths_equal_pycocotools_and_refuse_malformed_strings():
    rng = np.random.default_rng(7)
    for k in range(200):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if k % 4 == 0:
            m[:] = k % 8 == 0
        rle = mask_utils.encode(np.asfortranarray(m))
        counts = masks.run_lengths(rle["counts"].decode())
        # uncompressed counts written back by pycocotools give the same string
        again = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [h, w]}, h, w)
        assert again["counts"] == rle["counts"]
        assert int(counts.sum()) == h * w
        crop, x0, y0 = masks.decode_crop(masks.encode(m))
        if m.any():
            ys, xs = np.nonzero(m)
            assert (crop == m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]).all()
    for bad, why in (("a!b", "alphabet"), ("é", "alphabet"), ("P", "ends inside"),
                     ("0" + "o" * 13 + "0", "too long")):
        with pytest.raises(ValueError, match=why):
            masks.run_lengths(bad)


def _reference_verdict(rle) -> tuple[bool, bool]:
    """(valid, empty) the slow way: decode the full mask and encode it again."""
    try:
        pixels = masks.decode(rle)
    except ValueError:
        return False, False
    if masks.encode(pixels).counts != rle.counts:
        return False, False
    return True, not pixels.any()


def test_canonical_check_agrees_with_decoding_and_encoding_again():
    from schemas import RLE

    rng = np.random.default_rng(11)
    cases = []
    for k in range(150):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        m = (rng.random((h, w)) < rng.random() ** 2).astype(np.uint8)
        if k % 5 == 0:
            m[:] = k % 10 == 0
        good = masks.encode(m).counts
        runs = masks.run_lengths(good)
        cases.append((h, w, good))
        cases.append((h, w, masks.counts_string(runs) + "0"))  # an extra empty run
        if len(runs) > 2:
            short = runs.copy()
            short[-1] -= 1  # covers one pixel less than the frame
            cases.append((h, w, masks.counts_string(short)))
            gap = np.concatenate((runs[:1], [0], runs[1:]))  # a zero-length interior run
            cases.append((h, w, masks.counts_string(gap)))
    cases.append((2, 2, "U0"))  # 4 written with a needless continuation character
    for h, w, counts in cases:
        rle = RLE(size=[h, w], counts=counts)
        assert masks.is_canonical(rle) == _reference_verdict(rle), (h, w, counts)
    assert masks.is_canonical(RLE(size=[2, 2], counts="a!b")) == (False, False)


def test_counts_string_inverts_run_lengths_and_big_masks_crop_alike(monkeypatch):
    rng = np.random.default_rng(5)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(2, 100, 2))
        m = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, w + 1))] = 1
        m &= (rng.random((h, w)) < 0.9).astype(np.uint8)
        rle = masks.encode(m)
        assert masks.counts_string(masks.run_lengths(rle.counts)) == rle.counts
        whole = masks.decode_crop(rle)  # large masks are decoded whole, then cropped
        monkeypatch.setattr(masks, "BIG_MASK_SHARE", 0)  # every mask by its pixel indices
        indexed = masks.decode_crop(rle)
        monkeypatch.undo()
        assert whole[1:] == indexed[1:] and whole[0].dtype == indexed[0].dtype == np.uint8
        assert np.array_equal(whole[0], indexed[0])


def test_ground_cover_counts_a_uniform_tile_and_objects_per_cell():
    image = np.zeros((90, 120, 3), np.uint8)
    image[:] = (60, 140, 50)  # green vegetation
    tile = isaid_tile()  # any instance masks will do for the shapes; counts use a fresh one
    mask = np.zeros((90, 120), np.uint8)
    mask[:30, :40] = 1  # the whole top-left cell
    from pipeline.geometry.priors import InstanceMask
    inst = InstanceMask(1, "Small_Vehicle", int(mask.sum()), mask[:30, :40].copy(), 0, 0,
                        (20.0, 15.0))
    m = measure.measure_tile(image, [inst], tile.image_sha256, grid=3)
    step = measure.COVER_SAMPLE_STEP
    cell_pixels = (30 // step) * (40 // step)
    assert m.object_pixels == [cell_pixels] + [0] * 8
    green = m.cover_classes.index("green vegetation")
    assert [row[green] for row in m.ground_cover] == [0] + [cell_pixels] * 8
    assert sum(map(sum, m.ground_cover)) == 8 * cell_pixels
    assert m.objects[0].rgb == [60, 140, 50] and m.objects[0].area == 1200


def test_template_says_the_same_from_plan_measurements_as_from_the_tile():
    tile = isaid_tile()
    plan, requests = plan_tile(tile, PlanParams())
    assert plan.measurements is not None
    assert plan.measurements.image_sha256 == tile.image_sha256
    assert {o.object_id for o in plan.measurements.objects} == {o.object_id for o in tile.objects}
    backend = TemplateBackend(BackendParams())
    images = {plan.som_sha256: plan.som_png} if plan.som_png else {}
    from_tile = backend.annotate(requests, AnnotationContext(tiles={tile.tile_id: tile},
                                                             images=images))
    from_plan = backend.annotate(requests, AnnotationContext(tiles={},
                                                             plans={tile.tile_id: plan}))
    assert [r.status for r in from_plan] == ["ok"] * len(requests)
    assert [r.text for r in from_plan] == [r.text for r in from_tile]
    # a request about another image than the measured tile (or its marks) is refused
    stray = requests[0].model_copy(update={"image_sha256": "0" * 64, "request_id": "stray"})
    (refused,) = backend.annotate([stray], AnnotationContext(tiles={},
                                                              plans={tile.tile_id: plan}))
    assert refused.status == "failed" and "measured" in refused.error
