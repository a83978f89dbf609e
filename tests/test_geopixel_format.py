"""GeoPixel's released format: the real released sample round-trips; the loader contract holds."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import BadAnnotationError, UnsafePathError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import ExportParams
from pipeline.formats.geopixel_format import (
    guess_category,
    read_geopixel,
    samples_in_thousands,
    write_geopixel,
)
from pipeline.geometry import masks
from schemas import GroundedRecord, ObjectInstance, Phrase, Provenance, Tile, Window

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "geopixeld_sample"
# the human turn of the released sample: the one question GeoPixelD asks of every record
QUESTION = json.loads((SAMPLE / "GeoPixelD.json").read_text())[0]["conversations"][0]["value"]


def _polygon_counts(polygon_file: Path) -> list[int]:
    return [len(seg) for seg in json.loads(polygon_file.read_text())["polygons"]]


def test_released_sample_round_trips(tmp_path):
    original = read_geopixel(SAMPLE / "GeoPixelD.json", REPO)
    assert len(original) == 1
    record, tile = original[0]
    assert (record.tile_id, tile.height, tile.width) == ("P0224_0_800_0_800", 800, 800)
    assert [p.text for p in record.phrases] == [f"tennis court-{i}" for i in range(1, 5)]
    assert {p.category for p in record.phrases} == {"tennis_court"}
    assert record.provenance.backend == "geopixeld-release"
    assert tile.window == Window(y0=0, y1=800, x0=0, x1=800) and tile.image_name == "P0224"

    counts = write_geopixel(original, tmp_path, ExportParams(instruction=QUESTION))
    assert counts == {"GeoPixelD.json": 1}
    again = read_geopixel(tmp_path / "GeoPixelD.json", tmp_path)
    (record2, tile2), = again
    assert record2.caption == record.caption
    assert len(record2.phrases) == len(record.phrases) == record.caption.count("[SEG]")
    for before, after in zip(record.phrases, record2.phrases):
        assert masks.iou(before.mask, after.mask) >= 0.99
        assert masks.area(before.mask) > 1000
    assert (_polygon_counts(tmp_path / "train" / "P0224_0_800_0_800.json")
            == _polygon_counts(SAMPLE / "train" / "P0224_0_800_0_800.json"))
    assert (tmp_path / "data.txt").read_text() == "data/GeoPixelD/GeoPixelD.json 0.001\n"
    written = json.loads((tmp_path / "GeoPixelD.json").read_text())
    released = json.loads((SAMPLE / "GeoPixelD.json").read_text())
    assert written == released  # same list entry, byte-for-byte in content


def _write_release(root: Path, polygons: list, caption: str, *, key: str = "polygons",
                   item_key: str = "polygons") -> Path:
    """A one-sample release in `root` (GeoPixel repository layout) with a 40x60 image."""
    folder = root / "data" / "GeoPixelD" / "train"
    folder.mkdir(parents=True)
    (folder / "X1.png").write_bytes(encode_png(np.full((40, 60, 3), 90, np.uint8)))
    (folder / "X1.json").write_text(json.dumps({"id": 0, key: polygons}))
    item = {"id": 0, "conversations": [{"from": "human", "value": QUESTION},
                                       {"from": "bot", "value": caption}],
            "image": "data/GeoPixelD/train/X1.png", item_key: "data/GeoPixelD/train/X1.json"}
    listing = root / "data" / "GeoPixelD.json"
    listing.write_text(json.dumps([item]))
    return listing


def test_overlapping_polygons_fill_as_the_geopixel_loader(tmp_path):
    outer = [[0, 0], [20, 0], [20, 20], [0, 20]]
    inner = [[5, 5], [10, 5], [10, 10], [5, 10]]
    far = [[40, 30], [50, 30], [50, 35]]
    listing = _write_release(tmp_path, [[outer, inner], [far]],
                             "Two <p> small vehicles </p> [SEG] and a <p> ship-1 </p> [SEG] .")
    (record, tile), = read_geopixel(listing, tmp_path)
    expected = np.zeros((40, 60), np.uint8)
    for poly in (outer, inner):  # GeoPixel fills each polygon on its own: no even-odd hole
        cv2.fillPoly(expected, np.array([poly], dtype=np.int32), color=1)
    assert np.array_equal(masks.decode(record.phrases[0].mask), expected)
    assert record.phrases[0].kind == "cluster" and record.phrases[0].category == "Small_Vehicle"
    assert record.phrases[1].kind == "instance" and record.phrases[1].category == "ship"
    assert [o.object_id for o in tile.objects] == [1, 2, 3]
    assert record.phrases[0].object_ids == [1, 2] and record.phrases[1].object_ids == [3]


def test_inline_rle_segmentation_is_read(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "S1.png").write_bytes(encode_png(np.zeros((30, 30, 3), np.uint8)))
    mask = np.zeros((30, 30), np.uint8)
    mask[2:6, 2:6] = 1
    mask[20:25, 10:20] = 1
    rle = masks.encode(mask)
    item = {"id": 3, "conversations": [{"from": "human", "value": QUESTION},
                                       {"from": "bot", "value": "See <p> ships </p> [SEG] ."}],
            "image": "train/S1.png", "segmentation": [rle.model_dump()]}
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([item]))
    (record, tile), = read_geopixel(listing, tmp_path)
    assert np.array_equal(masks.decode(record.phrases[0].mask), mask)
    assert record.phrases[0].kind == "cluster" and len(tile.objects) == 2
    assert sorted(o.area for o in tile.objects) == [16, 50]


def test_seg_count_mismatch_names_the_polygon_file(tmp_path):
    square = [[1, 1], [5, 1], [5, 5]]
    listing = _write_release(tmp_path, [[square]],
                             "A <p> ship-1 </p> [SEG] and a <p> ship-2 </p> [SEG] .")
    with pytest.raises(BadAnnotationError) as err:
        read_geopixel(listing, tmp_path)
    assert err.value.path.endswith("X1.json")
    assert "1 masks for 2 [SEG]" in err.value.one_line()


def test_polygon_key_must_be_polygons(tmp_path):
    listing = _write_release(tmp_path, [[[[1, 1], [5, 1], [5, 5]]]], "A <p> ship </p> [SEG] .",
                             key="polygon")
    with pytest.raises(BadAnnotationError, match="'polygons'") as err:
        read_geopixel(listing, tmp_path)
    assert err.value.path.endswith("X1.json")


def test_list_item_spelled_polygon_is_refused(tmp_path):
    listing = _write_release(tmp_path, [[[[1, 1], [5, 1], [5, 5]]]], "A <p> ship </p> [SEG] .",
                             item_key="polygon")
    with pytest.raises(BadAnnotationError, match="spelled 'polygons'"):
        read_geopixel(listing, tmp_path)


def test_missing_image_is_named(tmp_path):
    listing = _write_release(tmp_path, [[[[1, 1], [5, 1], [5, 5]]]], "A <p> ship </p> [SEG] .")
    (tmp_path / "data" / "GeoPixelD" / "train" / "X1.png").unlink()
    with pytest.raises(BadAnnotationError, match="X1.png"):
        read_geopixel(listing, tmp_path)


def test_samples_in_thousands_read_back_exactly_by_geopixel():
    for count in range(0, 60_000):
        assert int(float(samples_in_thousands(count)) * 1000) == count
    assert samples_in_thousands(16_795) == "16.795"


def test_category_guessed_from_phrase_text():
    assert guess_category("tennis court-12") == "tennis_court"
    assert guess_category("small vehicles") == "Small_Vehicle"
    assert guess_category("Ground track field - 2") == "Ground_Track_Field"
    assert guess_category("parking lot") == "parking lot"


def test_unsafe_tile_id_writes_nothing(tmp_path):
    rle = masks.encode(np.ones((4, 4), np.uint8))
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    tile = Tile(tile_id="../evil", source="test", split="train", image_name="evil",
                window=Window(y0=0, y1=4, x0=0, x1=4), height=4, width=4, image_png=png,
                image_sha256=sha256(png),
                objects=[ObjectInstance(object_id=1, category="ship", bbox=[0, 0, 4, 4],
                                        area=16, mask=rle)])
    record = GroundedRecord(
        record_id="r", tile_id="../evil", split="train", caption="A <p> ship </p> [SEG] .",
        phrases=[Phrase(text="ship", kind="instance", category="ship", object_ids=[1],
                        mask=rle)],
        provenance=Provenance(backend="test", model="none", prompt_versions=[],
                              params_hash="x", pipeline_version="0"))
    out = tmp_path / "out"
    with pytest.raises(UnsafePathError):
        write_geopixel([(record, tile)], out, ExportParams())
    assert not out.exists() and not (tmp_path / "evil.png").exists()


# ---- a group's polygons are its members' ------------------------------------------------------

def _square(y0: int, x0: int, side: int = 6, size: tuple[int, int] = (20, 30)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[y0:y0 + side, x0:x0 + side] = 1
    return mask


def test_member_masks_are_used_only_when_they_make_up_the_phrase():
    a, b = masks.encode(_square(2, 2)), masks.encode(_square(2, 8))  # touching
    union = masks.union([a, b])
    assert masks.member_masks(union, [a, b]) == [a, b]
    assert masks.member_masks(a, [a]) == [a]
    assert masks.member_masks(union, [a, None]) == [union]  # a member the tile lacks
    assert masks.member_masks(union, [a]) == [union]  # members short of the mask
    assert masks.member_masks(union, []) == [union]
    other_size = masks.encode(_square(2, 2, size=(20, 31)))
    assert masks.member_masks(a, [other_size]) == [a]


def test_group_round_trips_with_its_members(tmp_path):
    """Written with one polygon per touching member, a group reads back as those members."""
    squares = [_square(2, 2), _square(2, 8), _square(8, 2)]
    png = encode_png(np.zeros((20, 30, 3), np.uint8))
    objects = [ObjectInstance(object_id=i + 1, category="Small_Vehicle",
                              bbox=masks.bbox(masks.encode(m)), area=int(m.sum()),
                              mask=masks.encode(m)) for i, m in enumerate(squares)]
    union = masks.union([o.mask for o in objects])
    assert len(masks.to_polygons(masks.decode(union))) == 1  # one blob as a union
    tile = Tile(tile_id="G1", source="test", split="train", image_name="G1",
                window=Window(y0=0, y1=20, x0=0, x1=30), height=20, width=30, image_png=png,
                image_sha256=sha256(png), objects=objects)
    record = GroundedRecord(
        record_id="train/G1", tile_id="G1", split="train",
        caption="Three <p> small vehicles </p> [SEG] .",
        phrases=[Phrase(text="small vehicles", kind="cluster", category="Small_Vehicle",
                        object_ids=[1, 2, 3], mask=union)],
        provenance=Provenance(backend="test", model="none", prompt_versions=[],
                              params_hash="x", pipeline_version="0"))
    write_geopixel([(record, tile)], tmp_path, ExportParams())
    assert _polygon_counts(tmp_path / "train" / "G1.json") == [3]
    (back, back_tile), = read_geopixel(tmp_path / "GeoPixelD.json", tmp_path)
    assert back.phrases[0].mask == union and back.phrases[0].object_ids == [1, 2, 3]
    assert [masks.decode(o.mask).tolist() for o in back_tile.objects] == [
        m.tolist() for m in squares]
    item, = json.loads((tmp_path / "GeoPixelD.json").read_text())
    assert item["conversations"][0]["value"] == ExportParams().instruction_for("train/G1").text
