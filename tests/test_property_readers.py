"""Property tests of the readers of user files (issue 13, class C): whatever the polygons,
RLE masks, JSON text or GeoJSON features, the readers either refuse them with one of the
project's errors (GeoPixelDError) or return geometry whose masks have the image's size, and
they stay within a bounded time (hypothesis deadline) and memory (an address-space limit on a
child process; masks are never larger than the image)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from pipeline.core.errors import GeoPixelDError
from pipeline.core.params import ImageryParams
from pipeline.core.user_files import MAX_JSON_DEPTH, parse_json
from pipeline.geometry import checks as geometry
from pipeline.geometry import masks
from pipeline.sources.label_sources import geojson_scene_labels, parse_dota, rasterize, read_geojson
from schemas import Window

REPO = Path(__file__).resolve().parent.parent
# modest: the whole file runs in well under a minute; no example database is written.
# PROPERTY_EXAMPLES=5000 searches harder (and lifts the deadline) when changing the readers.
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "150"))
PROPERTY = settings(max_examples=EXAMPLES, database=None,
                    deadline=timedelta(seconds=5) if EXAMPLES <= 150 else None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ---------------------------------------------------------------------------------

# numbers a user file may hold: ordinary pixels, far ones, huge ints, NaN and infinities
numbers = st.one_of(
    st.integers(-20, 120), st.floats(-20, 120),
    st.floats(-1e12, 1e12), st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-2 ** 80, 2 ** 80), st.sampled_from([1e8, 1e9, -1e15, 2.0 ** 53, 2.0 ** 53 + 2]))
scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=4), numbers)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)
coordinate = st.one_of(numbers, numbers, numbers, numbers, junk)  # mostly numbers
sizes = st.tuples(st.integers(1, 48), st.integers(1, 48))


REFUSED = object()


def only_project_errors(call, *args, **kwargs):
    """`call(...)`, or REFUSED when it raised one of the project's errors (anything else
    fails the test)."""
    try:
        return call(*args, **kwargs)
    except GeoPixelDError as exc:
        line = exc.one_line()
        assert line and "\n" not in line
        return REFUSED


# ---- polygons -----------------------------------------------------------------------------------

def flat_polygon(values, min_points=3, max_points=8):
    """A flat [x1, y1, x2, y2, ...] polygon of `values`."""
    return st.lists(st.tuples(values, values), min_size=min_points, max_size=max_points).map(
        lambda pts: [v for pt in pts for v in pt])


finite = st.one_of(st.integers(-20, 120), st.floats(-20, 120), st.floats(-1e12, 1e12),
                   st.sampled_from([1e8, 1e9, -1e15, 2.0 ** 53]))
segmentations = st.one_of(
    st.lists(st.lists(coordinate, max_size=14), max_size=4),
    st.lists(st.lists(numbers, min_size=6, max_size=14), min_size=1, max_size=3),
    st.lists(flat_polygon(finite), min_size=1, max_size=3),
    st.lists(flat_polygon(finite), min_size=1, max_size=3),
    junk)


@PROPERTY
@given(seg=segmentations, size=sizes)
def test_any_coco_polygon_is_refused_or_rasterised_at_image_size(seg, size):
    height, width = size
    checked = only_project_errors(geometry.coco_segmentation, seg, height, width,
                                  "annotation 1", Path("coco.json"))
    if checked is REFUSED:
        return
    mask = mask_utils.decode(geometry.coco_rle(checked, height, width))
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1}
    if isinstance(checked, list):  # every coordinate handed to pycocotools is in the frame
        x0, y0, x1, y1 = geometry.clip_frame(height, width)
        for poly in checked:
            assert len(poly) >= 6 and len(poly) % 2 == 0
            assert x0 <= min(poly[0::2]) and max(poly[0::2]) <= x1
            assert y0 <= min(poly[1::2]) and max(poly[1::2]) <= y1


in_image = st.integers(1, 48).flatmap(lambda side: st.tuples(
    st.just(side), st.lists(flat_polygon(st.floats(-side, 2 * side)), min_size=1,
                            max_size=3)))


@PROPERTY
@given(case=in_image)
def test_polygons_within_the_frame_are_passed_on_untouched(case):
    side, polygons = case
    checked = geometry.coco_segmentation(polygons, side, side, "a", None)
    assert len(checked) == len(polygons) and all(a is b for a, b in zip(checked, polygons))
    ours = mask_utils.decode(geometry.coco_rle(checked, side, side))
    theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, side, side)))
    assert np.array_equal(ours, theirs)


far = flat_polygon(st.floats(-5000, 5000), max_points=6)


@PROPERTY
@given(poly=far, size=sizes)
def test_clipping_keeps_the_region_inside_the_image(poly, size):
    """Against pycocotools on the unclipped polygon (safe at these magnitudes): the same mask
    up to the rounding of the vertices the cut adds, a pixel here and there along a cut edge."""
    height, width = size
    checked = geometry.coco_segmentation([poly], height, width, "a", None)
    ours = mask_utils.decode(geometry.coco_rle(checked, height, width))
    theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], height, width)))
    edges = len(poly) // 2
    assert int(np.abs(ours.astype(int) - theirs).sum()) <= edges * (height + width) // 4 + edges


@PROPERTY
@given(points=st.one_of(st.lists(st.lists(coordinate, max_size=3), max_size=8), junk),
       size=sizes)
def test_any_geopixel_polygon_is_refused_or_filled_at_image_size(points, size):
    height, width = size
    mask = only_project_errors(geometry.fill_polygon, points, height, width, "polygons[0][0]",
                               Path("X1.json"))
    assert mask is REFUSED or (mask.shape == (height, width) and mask.dtype == np.uint8)


# ---- RLE ----------------------------------------------------------------------------------------

rle_counts = st.one_of(
    st.lists(st.one_of(st.integers(0, 600), st.integers(-5, 2 ** 70), st.booleans(), junk),
             max_size=8),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=127), max_size=12),
    st.text(max_size=6), junk)
rle_sizes = st.one_of(st.lists(st.integers(1, 24), min_size=2, max_size=2),
                      st.lists(st.one_of(st.integers(-2 ** 70, 2 ** 70), junk), max_size=3), junk)


@PROPERTY
@given(size=rle_sizes, counts=rle_counts, expect=st.booleans())
def test_any_rle_is_refused_or_decodes_to_its_size(size, counts, expect):
    value = {"size": size, "counts": counts}
    height, width = (size if expect and isinstance(size, list) and len(size) == 2
                     and all(geometry.is_int(v) for v in size) else (None, None))
    checked = only_project_errors(geometry.check_rle, value, height, width, "mask 0",
                                  Path("p.json"))
    if checked is REFUSED:
        return
    h, w = checked["size"]
    assert h * w <= geometry.MAX_FRAME_PIXELS
    if h * w > 1 << 16:  # valid but big (a frame of up to 2**32 pixels): not decoded here
        return
    mask = mask_utils.decode(geometry.coco_rle(checked, h, w))
    assert mask.shape == (h, w)


@PROPERTY
@given(mask=st.integers(1, 20).flatmap(lambda h: st.integers(1, 20).flatmap(
    lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
        lambda bits: np.array(bits, np.uint8).reshape(h, w)))))
def test_every_real_rle_is_accepted(mask):
    """What pycocotools writes, compressed or not, always passes the check unchanged."""
    h, w = mask.shape
    rle = masks.encode(mask)
    checked = geometry.check_rle({"size": [h, w], "counts": rle.counts}, h, w, "m", None)
    assert np.array_equal(mask_utils.decode(geometry.coco_rle(checked, h, w)), mask)
    flat = mask.ravel(order="F")  # uncompressed COCO RLE: column-major runs, zeros first
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    runs = [0] + runs if flat[0] else runs
    decoded = mask_utils.decode(geometry.coco_rle(
        geometry.check_rle({"size": [h, w], "counts": runs}, h, w, "m", None), h, w))
    assert np.array_equal(decoded, mask)


# ---- the JSON reader ----------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 100, 2 ** 100),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
              st.sampled_from(["\ud800", "a\udfffb", "\U0001f600"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=20)


def _nonfinite_or_surrogate(value) -> bool:
    if isinstance(value, float):
        return not np.isfinite(value)
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(_nonfinite_or_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_nonfinite_or_surrogate(k) or _nonfinite_or_surrogate(v)
                   for k, v in value.items())
    return False


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@PROPERTY
@given(value=json_values, wrap=st.integers(0, 2 * MAX_JSON_DEPTH))
def test_parse_json_returns_the_value_or_refuses_what_is_not_plain_json(value, wrap):
    for _ in range(wrap):
        value = [value]
    text = json.dumps(value)  # NaN/Infinity tokens, \ud800 escapes as Python writes them
    got = only_project_errors(parse_json, text, "test file", Path("t.json"))
    refused = _nonfinite_or_surrogate(value) or _depth(value) > MAX_JSON_DEPTH
    assert (got is REFUSED) == refused
    if got is not REFUSED:
        assert got == value


@PROPERTY
@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=60),
                      st.integers(0, 3000).map(lambda n: "[" * n + "]" * n),
                      st.integers(0, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
                      st.sampled_from(["1e400", "[-1e999]", "NaN", "[Infinity]", "1" * 5000,
                                       '"\\ud800"', "\ufeff[1]", "[1,]", "{'a': 1}"])))
def test_parse_json_never_raises_anything_but_a_project_error(text):
    got = only_project_errors(parse_json, text, "test file", Path("t.json"))
    if got is not REFUSED:
        json.dumps(got, allow_nan=False).encode("utf-8")  # plain, finite, encodable
        assert _depth(got) <= MAX_JSON_DEPTH


# ---- GeoJSON ------------------------------------------------------------------------------------

UTM = "EPSG:32633"
ORIGIN = (500000.0, 4200000.0)
TRANSFORM = (0.5, 0.0, ORIGIN[0], 0.0, -0.5, ORIGIN[1])
map_numbers = st.one_of(st.floats(ORIGIN[0] - 40, ORIGIN[0] + 40),
                        st.floats(ORIGIN[1] - 40, ORIGIN[1] + 40), numbers)
position = st.one_of(st.tuples(map_numbers, map_numbers).map(list),
                     st.lists(st.one_of(map_numbers, junk), max_size=4))
ring = st.lists(position, max_size=7)
polygon_coordinates = st.lists(ring, max_size=2)
near = st.tuples(st.floats(ORIGIN[0] - 40, ORIGIN[0] + 40), st.floats(ORIGIN[1] - 40,
                                                                       ORIGIN[1] + 40))
closed_ring = st.lists(near.map(list), min_size=3, max_size=6).map(lambda r: r + [r[0]])
good_features = st.fixed_dictionaries({
    "type": st.just("Feature"),
    "geometry": st.one_of(
        st.fixed_dictionaries({"type": st.just("Polygon"),
                               "coordinates": st.lists(closed_ring, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"type": st.just("MultiPolygon"), "coordinates": st.lists(
            st.lists(closed_ring, min_size=1, max_size=2), min_size=1, max_size=2)})),
    "properties": st.fixed_dictionaries({"category": st.one_of(
        st.text(max_size=8), st.integers(-5, 5), st.none())}),
    "id": st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1), st.text(max_size=3))})
hostile_features = st.fixed_dictionaries({
    "type": st.one_of(st.just("Feature"), st.just("Feature"), junk),
    "geometry": st.one_of(
        st.none(), junk,
        st.fixed_dictionaries({
            "type": st.sampled_from(["Polygon", "Polygon", "MultiPolygon", "Point", "Circle",
                                     "", 5, None]),
            "coordinates": st.one_of(polygon_coordinates, st.lists(polygon_coordinates,
                                                                   max_size=2), junk)})),
    "properties": st.one_of(st.none(), st.fixed_dictionaries({"category": junk}), junk),
    "id": st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), junk)})


@PROPERTY
@given(items=st.lists(st.one_of(good_features, good_features, hostile_features), max_size=4))
def test_any_geojson_is_refused_or_gives_image_sized_masks(items):
    collection = {"type": "FeatureCollection", "features": items,
                  "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.geojson"
        path.write_text(json.dumps(collection))  # NaN and Infinity written as Python does
        counts: Counter = Counter()
        geo = only_project_errors(read_geojson, path, ImageryParams(), counts)
        if geo is REFUSED:
            return
        for feature in geo.features:
            assert geometry.INT64_MIN <= feature.object_id <= geometry.INT64_MAX
            assert isinstance(feature.category, str)
            assert feature.category_id is None or geometry.is_int(feature.category_id)
        labels = only_project_errors(geojson_scene_labels, geo, "s", UTM, TRANSFORM, 48, 40,
                                     counts)
    for label in [] if labels is REFUSED else labels:
        mask = rasterize(label.geometry, Window(y0=0, y1=48, x0=0, x1=40))
        assert mask.shape == (48, 40)


@PROPERTY
@given(lines=st.lists(st.one_of(
    st.lists(st.one_of(map_numbers.map(str), st.text(max_size=4)), min_size=8, max_size=10).map(
        " ".join),
    st.text(max_size=30)), max_size=5))
def test_any_dota_text_is_refused_or_parsed(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        labels = only_project_errors(parse_dota, path, ImageryParams(), Counter())
    for label in [] if labels is REFUSED else labels:
        assert np.isfinite(label.geometry.bounds).all()


# ---- bounded memory ------------------------------------------------------------------------------

BOUNDED = """
import numpy as np
from pycocotools import mask as mask_utils
from pipeline.geometry import checks as geometry
from pipeline.core.errors import BadAnnotationError
rng = np.random.default_rng(0)
nasty = [[[0, 0, 1e9, 0, 1e9, 1e9]], [[0, 0, 1e8, 0, 1e8, 1e8]],
         [[-1e15, -1e15, 1e15, -1e15, 0, 1e15]], [[0, 0, 2.0 ** 53, 0, 0, 2.0 ** 53]],
         [[0, 0, 800, 800] * 200_000], [[5, 5, 9, 5, 9, 9]] * 20_000]
nasty += [[rng.uniform(-1e13, 1e13, 2 * int(rng.integers(3, 40))).tolist()] for _ in range(200)]
for seg in nasty:
    try:
        checked = geometry.coco_segmentation(seg, 800, 800, "a", None)
    except BadAnnotationError:
        continue
    assert mask_utils.decode(geometry.coco_rle(checked, 800, 800)).shape == (800, 800)
print("ok")
"""


def test_far_and_long_polygons_rasterise_within_a_small_address_space():
    """The nastiest polygons (1e9, 1e15, 2**53 vertices; 800k points; 20k polygons; random
    far ones) in a child limited to 1.5 GB of address space: pycocotools alone needed ~12 GB
    for one 1e8 vertex."""
    limit = 1536 << 20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", BOUNDED], cwd=REPO, capture_output=True,
                          text=True, timeout=120, preexec_fn=cap,
                          env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1",
                               "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("value, expected", [(2 ** 63 - 1, 2 ** 63 - 1), (-2 ** 63, -2 ** 63)])
def test_object_ids_at_the_int64_limits_are_kept(value, expected):
    assert geometry.object_id(value, "a", None) == expected
    with pytest.raises(GeoPixelDError, match="64-bit"):
        geometry.object_id(value + (1 if value > 0 else -1), "a", None)
