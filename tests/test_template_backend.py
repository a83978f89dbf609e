"""The offline template backend and the measured attributes behind its words.

Tiles are built from the real iSAID sample P0003 (val): the builder below decodes the image and
its id/colour masks the devkit way and crops one 800x800 window. It stands in for the prepare
stage so that these tests do not depend on it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotators import attributes as attr
from annotators.base import AnnotationContext, Backend, get_backend
from annotators.template import ARRANGEMENT_WORDS, ORIENTATION_WORDS, TemplateBackend
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import BackendParams
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_COLOUR_TO_CATEGORY, plural, readable
from schemas import ObjectInstance, Request, Tile, Window

ISAID_VAL = Path(__file__).resolve().parents[1] / "data" / "isaid" / "val" / "images"


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _scalar(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@lru_cache(maxsize=None)
def isaid_tile(image: str = "P0003", y0: int = 0, x0: int = 0, size: int = 800) -> Tile:
    """A Tile cut from a real iSAID val image: id = R + 256 G + 65536 B (>= 1000), category =
    smallest colour value under the instance, looked up in the devkit palette."""
    window = Window(y0=y0, y1=y0 + size, x0=x0, x1=x0 + size)
    crop = (slice(y0, y0 + size), slice(x0, x0 + size))
    pixels = _rgb(ISAID_VAL / f"{image}.png")[crop]
    ids = _scalar(_rgb(ISAID_VAL / f"{image}_instance_id_RGB.png")[crop])
    colours = _scalar(_rgb(ISAID_VAL / f"{image}_instance_color_RGB.png")[crop])
    objects = []
    for object_id in np.unique(ids):
        if object_id < 1000:
            continue
        mask = (ids == object_id).astype(np.uint8)
        rle = masks.encode(mask)
        category = ISAID_COLOUR_TO_CATEGORY[int(colours[mask > 0].min())]
        objects.append(ObjectInstance(object_id=int(object_id), category=category,
                                      bbox=masks.bbox(rle), area=int(mask.sum()), mask=rle))
    return make_tile(pixels, objects, f"{image}_{y0}_{y0 + size}_{x0}_{x0 + size}", window)


def make_tile(pixels: np.ndarray, objects: list[ObjectInstance], tile_id: str,
              window: Window | None = None) -> Tile:
    png = encode_png(pixels)
    height, width = pixels.shape[:2]
    return Tile(tile_id=tile_id, source="isaid", split="val", image_name=tile_id.split("_")[0],
                window=window or Window(y0=0, y1=height, x0=0, x1=width), height=height,
                width=width, image_png=png, image_sha256=sha256(png), objects=objects)


def instance(object_id: int, category: str, mask: np.ndarray) -> ObjectInstance:
    rle = masks.encode(mask.astype(np.uint8))
    return ObjectInstance(object_id=object_id, category=category, bbox=masks.bbox(rle),
                          area=int(mask.sum()), mask=rle)


def request(tile: Tile, kind: str, request_id: str, object_ids: list[int] = (),
            category: str | None = None, position: str | None = None,
            mark_number: int | None = None) -> Request:
    return Request(request_id=request_id, tile_id=tile.tile_id, kind=kind, prompt="(prompt)",
                   prompt_version="v1", image_sha256=tile.image_sha256,
                   object_ids=list(object_ids), category=category, position=position,
                   mark_number=mark_number)


def annotate(tiles: list[Tile], requests: list[Request], **params) -> list:
    backend = TemplateBackend(BackendParams(**params))
    return backend.annotate(requests, AnnotationContext(tiles={t.tile_id: t for t in tiles}))


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def assert_clean(text: str) -> None:
    """No mark numbers (no digits at all), no phrase tags."""
    assert not re.search(r"\d", text), text
    for tag in ("<p>", "</p>", "[SEG]", "#"):
        assert tag not in text, text


def rectangle(shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


# ---------------------------------------------------------------------------------------------


def test_holistic_is_four_sentences_with_measured_counts():
    tile = isaid_tile()
    counts: dict[str, int] = {}
    for o in tile.objects:
        counts[o.category] = counts.get(o.category, 0) + 1
    main = max(counts, key=counts.get)
    reqs = [request(tile, "holistic", f"{tile.tile_id}/holistic/{k}") for k in range(6)]
    for response in annotate([tile], reqs):
        assert response.status == "ok"
        assert len(sentences(response.text)) == 4, response.text
        assert f"{attr.number_word(counts[main])} {plural(main)}" in response.text
        assert_clean(response.text)


def test_holistic_of_an_empty_tile_describes_only_the_ground():
    real = isaid_tile()
    bare = real.model_copy(update={"tile_id": "bare_0_800_0_800", "objects": []})
    green = make_tile(np.full((200, 300, 3), (60, 140, 50), dtype=np.uint8), [],
                      "green_0_200_0_300")
    for t, cover in ((bare, "grey paved surfaces"), (green, "green vegetation")):
        (response,) = annotate([t], [request(t, "holistic", f"{t.tile_id}/holistic")])
        assert response.status == "ok"
        assert len(sentences(response.text)) == 4, response.text
        assert cover in response.text.lower(), response.text
        for category in ISAID_COLOUR_TO_CATEGORY.values():
            assert readable(category) not in response.text.lower()
        assert_clean(response.text)


def test_instance_names_its_category_and_its_measured_colour():
    tile = isaid_tile()
    measure = attr.measure_tile(tile)
    reqs = [request(tile, "instance", f"i{k}", [o.object_id], o.category, mark_number=k + 1)
            for k, o in enumerate(tile.objects[:8])]
    for req, response in zip(reqs, annotate([tile], reqs)):
        assert response.status == "ok"
        assert readable(req.category) in response.text
        assert measure.objects[req.object_ids[0]].colour in response.text.lower()
        assert len(sentences(response.text)) == 1
        assert_clean(response.text)


def test_painted_red_object_is_called_red():
    tile = isaid_tile()
    target = next(o for o in tile.objects if o.category == "Large_Vehicle")
    pixels = cv2.cvtColor(cv2.imdecode(np.frombuffer(tile.image_png, np.uint8),
                                       cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    pixels[masks.decode(target.mask) > 0] = (255, 0, 0)
    painted = make_tile(pixels, list(tile.objects), "painted_0_800_0_800")
    (response,) = annotate([painted], [request(painted, "instance", "red", [target.object_id],
                                               target.category, "top", mark_number=7)])
    assert re.search(r"\bred\b", response.text.lower()), response.text
    assert "large vehicle" in response.text


def test_colour_palette():
    assert attr.colour_name((255, 0, 0)) == "red"
    assert attr.colour_name((250, 250, 250)) == "white"
    assert attr.colour_name((10, 10, 10)) == "black"
    assert attr.colour_name((128, 128, 128)) == "grey"
    assert attr.colour_name((30, 160, 40)) == "green"
    assert attr.colour_name((20, 80, 30)) == "dark green"
    assert attr.colour_name((30, 60, 200)) == "blue"
    assert attr.colour_name((212, 196, 128)) == "yellow"   # a P0003 school bus
    assert attr.colour_name((120, 70, 30)) == "brown"


@pytest.mark.parametrize("box, words", [
    ((100, 200, 180, 214), "oriented horizontally"),
    ((300, 100, 314, 180), "oriented vertically"),
])
def test_orientation_of_synthetic_rectangles(box, words):
    """The measured orientation, said in one of its wordings whenever an answer states one
    (an instance answer states its colour and at most one more attribute), never another."""
    pixels = np.full((400, 400, 3), 90, dtype=np.uint8)
    obj = instance(5000, "Large_Vehicle", rectangle((400, 400), *box))
    t = make_tile(pixels, [obj], "synthetic_0_400_0_400")
    assert attr.orientation_words(attr.mask_shape(rectangle((400, 400), *box))) == words
    texts = [annotate([t], [request(t, "instance", "r", [5000], "Large_Vehicle")],
                      seed=seed)[0].text for seed in range(12)]
    said = [any(w in text for w in ORIENTATION_WORDS[words]) for text in texts]
    assert any(said), texts
    others = [w for k, ws in ORIENTATION_WORDS.items() if k != words for w in ws]
    assert not any(w in text for text in texts for w in others), texts


def test_orientation_of_diagonals_and_round_shapes():
    diagonal = np.zeros((200, 200), np.uint8)
    cv2.line(diagonal, (20, 20), (150, 150), 1, thickness=9)
    assert attr.orientation_words(attr.mask_shape(diagonal)) == \
        "oriented diagonally from top left to bottom right"
    rising = np.zeros((200, 200), np.uint8)
    cv2.line(rising, (20, 150), (150, 20), 1, thickness=9)
    assert attr.orientation_words(attr.mask_shape(rising)) == \
        "oriented diagonally from bottom left to top right"
    disc = np.zeros((200, 200), np.uint8)
    cv2.circle(disc, (100, 100), 40, 1, thickness=-1)
    assert attr.orientation_words(attr.mask_shape(disc)) is None


def test_cluster_states_the_exact_member_count():
    tile = isaid_tile()
    vehicles = [o.object_id for o in tile.objects if o.category == "Large_Vehicle"][:7]
    reqs = [request(tile, "cluster", f"c{k}", vehicles, "Large_Vehicle", "left side")
            for k in range(4)]
    for response in annotate([tile], reqs):
        assert response.status == "ok"
        assert "seven large vehicles" in response.text.lower(), response.text
        assert len(sentences(response.text)) == 1
        assert_clean(response.text)


def test_cluster_arrangement_in_a_row_and_scattered():
    shape = (400, 600)
    row = [instance(1000 + k, "Small_Vehicle", rectangle(shape, 40 + 20 * k, 50, 52 + 20 * k, 75))
           for k in range(6)]  # upright cars, 12 px wide, 20 px apart: parked side by side
    spread = [instance(2000 + k, "Small_Vehicle", rectangle(shape, x, y, x + 10, y + 10))
              for k, (x, y) in enumerate([(20, 200), (300, 380), (560, 210), (150, 330)])]
    t = make_tile(np.full(shape + (3,), 100, np.uint8), row + spread, "rows_0_400_0_600")
    measure = attr.measure_tile(t)
    assert attr.group_arrangement([measure.objects[o.object_id].shape for o in row],
                                  [o.area for o in row], "Small_Vehicle") == \
        "parked side by side in a row"
    assert attr.group_arrangement([measure.objects[o.object_id].shape for o in spread],
                                  [o.area for o in spread], "Small_Vehicle") == "scattered"
    # a cluster answer states its count and its arrangement or its colours: over several
    # requests both arrangements are said, each only in its own wordings
    said = {"row": [], "spread": []}
    for k in range(8):
        row_text, spread_text = (r.text.lower() for r in annotate([t], [
            request(t, "cluster", f"row{k}", [o.object_id for o in row], "Small_Vehicle",
                    "top"),
            request(t, "cluster", f"spread{k}", [o.object_id for o in spread],
                    "Small_Vehicle")]))
        assert "six small vehicles" in row_text, row_text
        assert "four small vehicles" in spread_text, spread_text
        said["row"].append(row_text)
        said["spread"].append(spread_text)
    for key, canonical in (("row", "parked side by side in a row"), ("spread", "scattered")):
        own = ARRANGEMENT_WORDS[canonical]
        assert any(any(w in text for w in own) for text in said[key]), said[key]
        other = "scattered" if key == "row" else "parked side by side in a row"
        assert not any(w in text for text in said[key] for w in ARRANGEMENT_WORDS[other]
                       if w not in own), said[key]


def test_texts_are_deterministic_and_seeded():
    tile = isaid_tile()
    reqs = [request(tile, "holistic", "h")] + [
        request(tile, "instance", f"i{k}", [o.object_id], o.category, mark_number=k + 1)
        for k, o in enumerate(tile.objects)]
    first, second = annotate([tile], reqs), annotate([tile], reqs)
    assert [r.text for r in first] == [r.text for r in second]
    assert [r.model_dump() for r in first] == [r.model_dump() for r in second]
    reseeded = annotate([tile], reqs, seed=1)
    assert [r.text for r in reseeded] != [r.text for r in first]


def test_wording_varies_across_objects():
    shape = (500, 500)
    objects = [instance(3000 + k, "Small_Vehicle",
                        rectangle(shape, 20 + 110 * (k % 4), 20 + 95 * (k // 4),
                                  50 + 110 * (k % 4), 35 + 95 * (k // 4)))
               for k in range(20)]
    t = make_tile(np.full(shape + (3,), 150, np.uint8), objects, "many_0_500_0_500")
    responses = annotate([t], [request(t, "instance", f"{t.tile_id}/instance/{k}",
                                       [o.object_id], "Small_Vehicle", mark_number=k + 1)
                               for k, o in enumerate(objects)])
    openings = {" ".join(r.text.split()[:2]) for r in responses}
    assert len(openings) >= 3, openings
    for r in responses:
        assert_clean(r.text)


def test_responses_name_the_template_backend():
    tile = isaid_tile()
    o = tile.objects[0]
    reqs = [request(tile, "holistic", "h"), request(tile, "instance", "i", [o.object_id],
                                                    o.category, mark_number=3)]
    for response in annotate([tile], reqs, model="template-test"):
        assert (response.backend, response.model) == ("template", "template-test")
        assert response.prompt_version == "v1"
        assert response.attempts == 1 and response.cost_usd == 0.0
        assert response.usage.prompt_tokens == response.usage.completion_tokens == 0
        assert response.latency_s >= 0.0


def test_missing_inputs_fail_their_request_only():
    tile = isaid_tile()
    ghost = request(tile, "holistic", "ghost").model_copy(update={"tile_id": "P9999_0_800_0_800"})
    lost = request(tile, "instance", "lost", [123], "ship", mark_number=2)
    unseen = request(tile, "instance", "unseen", [tile.objects[0].object_id],
                     tile.objects[0].category).model_copy(update={"image_sha256": "0" * 64})
    fine = request(tile, "holistic", "fine")
    responses = annotate([tile], [ghost, lost, unseen, fine])
    assert [r.request_id for r in responses] == ["ghost", "lost", "unseen", "fine"]
    assert [r.status for r in responses] == ["failed", "failed", "failed", "ok"]
    assert "P9999_0_800_0_800" in responses[0].error
    assert "123" in responses[1].error
    assert responses[0].text == "" and responses[0].backend == "template"


def test_registry_builds_the_template_backend():
    backend = get_backend(BackendParams(name="template", model="template-v1"))
    assert isinstance(backend, TemplateBackend) and isinstance(backend, Backend)
    assert backend.name == "template" and backend.model == "template-v1"


def test_number_words():
    assert attr.number_word(7) == "seven"
    assert attr.number_word(31) == "thirty-one"
    assert attr.number_word(105) == "one hundred and five"
    assert attr.number_word(2014) == "two thousand and fourteen"


def test_mask_of_another_size_fails_the_tile_requests():
    pixels = np.full((100, 100, 3), 120, np.uint8)
    wrong = instance(4000, "ship", rectangle((50, 50), 10, 10, 30, 20))  # 50x50 mask
    t = make_tile(pixels, [wrong], "wrong_0_100_0_100")
    (response,) = annotate([t], [request(t, "holistic", "h")])
    assert response.status == "failed"
    assert "wrong_0_100_0_100" in response.error and "50x50" in response.error


def test_paired_count_equals_pairwise_side_by_side():
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 5, 40):
        for _ in range(20):
            shapes = [attr.Shape(cx=float(rng.uniform(0, 200)), cy=float(rng.uniform(0, 200)),
                                 long=float(rng.uniform(2, 40)), short=float(rng.uniform(1, 15)),
                                 angle=float(rng.choice([0.0, 5.0, 90.0, rng.uniform(0, 180)])))
                      for _ in range(n)]
            expected = sum(any(attr.side_by_side(a, b) for j, b in enumerate(shapes) if j != i)
                           for i, a in enumerate(shapes))
            assert attr.paired_count(shapes) == expected
