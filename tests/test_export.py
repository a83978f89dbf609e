"""Export: Parquet that `datasets` loads, COCO that pycocotools loads, GeoPixel that its loader
accepts; byte-identical reruns; unsafe names refused before anything is written.

Records and tiles are made here by hand: 48x64 tiles with filled blobs as instances, one
instance phrase, one cluster phrase whose mask is the union of two disjoint blobs, and one
instance no phrase names (COCO still lists it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.core.errors import (
    BadAnnotationError,
    BadRecordError,
    DuplicateNameError,
    UnsafePathError,
)
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import ExportParams, Params, RunnerParams
from pipeline.core.shards import read_records, shard_name, write_records
from pipeline.formats.geopixel_format import read_geopixel
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_CATEGORY_IDS, category_ids
from pipeline.stages.export import EXPORT_SCHEMA, run_export
from schemas import RLE, GroundedRecord, ObjectInstance, Phrase, Provenance, Tile, Window

H, W = 48, 64
PROVENANCE = Provenance(backend="template", model="template-v1", prompt_versions=["v1"],
                        params_hash="0123456789abcdef", pipeline_version="0.1.0")


def _blob(shape: str, x: int, y: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    if shape == "court":
        mask[y:y + 12, x:x + 18] = 1
    elif shape == "car":
        cv2.ellipse(mask, (x, y), (4, 2), 30, 0, 360, 1, -1)
    else:  # "ship": a thin diagonal hull
        cv2.line(mask, (x, y), (x + 10, y + 6), 1, 2)
    return mask


def make_pair(tile_id: str, split: str, seed: int) -> tuple[GroundedRecord, Tile]:
    """A tile with four instances and a record grounding an instance and a two-car cluster."""
    rng = np.random.default_rng(seed)
    png = encode_png(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    shapes = {1001: ("court", "tennis_court", 2 + seed, 3), 1002: ("car", "Small_Vehicle", 40, 8),
              1003: ("car", "Small_Vehicle", 55, 30), 1004: ("ship", "ship", 5, 30)}
    objects = []
    for object_id, (shape, category, x, y) in shapes.items():
        rle = masks.encode(_blob(shape, x, y))
        objects.append(ObjectInstance(object_id=object_id, category=category,
                                      bbox=masks.bbox(rle), area=masks.area(rle), mask=rle))
    by_id = {o.object_id: o for o in objects}
    phrases = [
        Phrase(text="tennis court-1", kind="instance", category="tennis_court",
               object_ids=[1001], mask=by_id[1001].mask),
        Phrase(text="small vehicles", kind="cluster", category="Small_Vehicle",
               object_ids=[1002, 1003], mask=masks.union([by_id[1002].mask, by_id[1003].mask])),
    ]
    caption = (f"Tile {tile_id}: the <p> tennis court-1 </p> [SEG] at the top left is green, "
               "and <p> small vehicles </p> [SEG] are parked at the right.")
    tile = Tile(tile_id=tile_id, source="test", split=split, image_name=tile_id.split("_")[0],
                window=Window(y0=0, y1=H, x0=0, x1=W), height=H, width=W, image_png=png,
                image_sha256=sha256(png), objects=objects)
    record = GroundedRecord(record_id=f"{split}/{tile_id}", tile_id=tile_id, split=split,
                            caption=caption, phrases=phrases, provenance=PROVENANCE)
    return record, tile


def write_inputs(root: Path, shards: dict[str, list[tuple[GroundedRecord, Tile]]],
                 extra_tiles: dict[str, list[Tile]] | None = None) -> tuple[Path, Path]:
    """build/tiles and build/records shards, aligned by name."""
    tiles_dir, records_dir = root / "tiles", root / "records"
    for name, pairs in shards.items():
        write_records(records_dir / name, [r for r, _ in pairs], GroundedRecord)
        tiles = [t for _, t in pairs] + (extra_tiles or {}).get(name, [])
        write_records(tiles_dir / name, tiles, Tile)
    return tiles_dir, records_dir


def standard_inputs(root: Path) -> tuple[Path, Path]:
    """Train: 3 records over 2 input shards (+ a tile without record); val: 1 record."""
    train = [make_pair(f"P900{i}_0_{H}_0_{W}", "train", i) for i in range(3)]
    val = [make_pair(f"P9100_0_{H}_0_{W}", "val", 7)]
    lonely = make_pair(f"P9200_0_{H}_0_{W}", "train", 9)[1]
    return write_inputs(root, {shard_name("train", 0, 2): train[:2],
                               shard_name("train", 1, 2): train[2:],
                               shard_name("val", 0, 1): val},
                        extra_tiles={shard_name("train", 0, 2): [lonely]})


PARAMS = Params(export=ExportParams(records_per_shard=2),
                runner=RunnerParams(local_scheduler="threads", workers=2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiles_dir, records_dir = standard_inputs(root)
    report = run_export(PARAMS, tiles_dir, records_dir, root / "out")
    return root, report


def _all_records(root: Path) -> dict[str, GroundedRecord]:
    return {r.record_id: r for p in sorted((root / "records").glob("*.parquet"))
            for r in read_records(p, GroundedRecord)}


def _all_tiles(root: Path) -> dict[str, Tile]:
    return {t.tile_id: t for p in sorted((root / "tiles").glob("*.parquet"))
            for t in read_records(p, Tile)}


def test_layout_and_report(exported):
    root, report = exported
    out = root / "out"
    assert sorted(p.name for p in (out / "parquet").iterdir()) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
        "val-00000-of-00001.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in sorted((out / "parquet").iterdir())] \
        == [2, 1, 1]
    assert sorted(p.name for p in (out / "coco").iterdir()) == ["train.json", "val.json"]
    assert report["records"] == 4 and report["parquet"] == {"shards": 3, "rows": 4}
    assert report["splits"]["train"]["tiles"] == 3  # the tile without record is not exported
    assert report["splits"]["train"]["annotations"] == 12
    assert report["geopixel"]["lists"] == {"GeoPixelD.json": 3, "GeoPixelD_test.json": 1}
    assert json.loads((out / "report.json").read_text()) == report
    schema = pq.read_schema(out / "parquet" / "val-00000-of-00001.parquet")
    assert schema.equals(EXPORT_SCHEMA) and schema.metadata == EXPORT_SCHEMA.metadata


def _geopixel_loader(data_txt: Path, cwd: Path) -> list[dict]:
    """GeoPixel's data reading (train.py with --given_num True, data_mix.py), re-implemented."""
    samples = []
    for line in data_txt.read_text().splitlines():
        path, thousands = line.strip().split(" ")
        items = json.loads((cwd / path).read_text())
        assert int(float(thousands) * 1000) == len(items)
        for item in items:
            text = "".join(t["value"] for t in item["conversations"])
            image = Image.open(cwd / item["image"]).convert("RGB")
            w, h = image.size
            data = json.loads((cwd / item["polygons"]).read_text())
            loaded = []
            for polygon in data["polygons"]:
                mask = np.zeros((h, w), dtype=np.uint8)
                for poly in polygon:
                    assert len(poly) > 0 and len(poly[0]) == 2, "invalid multiple polygons"
                    cv2.fillPoly(mask, np.array([poly], dtype=np.int32), color=1)
                loaded.append(mask)
            assert len(loaded) == text.count("[SEG]")
            samples.append({"item": item, "masks": loaded, "polygons": data["polygons"],
                            "size": (h, w)})
    return samples


def test_geopixel_layout_passes_the_loader_contract(exported, tmp_path):
    root, _ = exported
    geopixel_repo = tmp_path / "GeoPixel"  # as a user installs it: data/GeoPixelD + data.txt
    shutil.copytree(root / "out" / "geopixel", geopixel_repo / "data" / "GeoPixelD")
    shutil.copy(geopixel_repo / "data" / "GeoPixelD" / "data.txt", geopixel_repo / "data.txt")
    samples = _geopixel_loader(geopixel_repo / "data.txt", geopixel_repo)
    records = _all_records(root)
    assert len(samples) == 3 and [s["item"]["id"] for s in samples] == [0, 1, 2]
    for sample in samples:
        tile_id = Path(sample["item"]["image"]).stem
        record = records[f"train/{tile_id}"]
        assert sample["item"]["conversations"][1]["value"] == record.caption
        assert sample["size"] == (H, W)
        for mask, phrase in zip(sample["masks"], record.phrases):
            assert np.array_equal(mask, masks.decode(phrase.mask))
        assert [len(p) for p in sample["polygons"]] == [1, 2]  # the cluster: two blobs
    # the val split went to the layout's test folder, in its own list
    test_list = json.loads((geopixel_repo / "data/GeoPixelD/GeoPixelD_test.json").read_text())
    assert [e["image"] for e in test_list] == [f"data/GeoPixelD/test/P9100_0_{H}_0_{W}.png"]
    # and our own reader takes the installed layout back
    pairs = read_geopixel(geopixel_repo / "data/GeoPixelD/GeoPixelD.json", geopixel_repo)
    assert sorted(r.caption for r, _ in pairs) == sorted(
        r.caption for r in records.values() if r.split == "train")


def test_coco_links_phrases_to_instances(exported):
    root, _ = exported
    tiles = _all_tiles(root)
    rows = {r["record_id"]: r for p in sorted((root / "out" / "parquet").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    for split in ("train", "val"):
        coco = COCO(str(root / "out" / "coco" / f"{split}.json"))
        # iSAID's 15 categories with iSAID's own ids, present or not
        assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
            i: name for name, i in ISAID_CATEGORY_IDS.items()}
        for ann in coco.loadAnns(coco.getAnnIds()):
            image = coco.loadImgs(ann["image_id"])[0]
            obj = {o.object_id: o for o in tiles[image["tile_id"]].objects}[ann["object_id"]]
            assert np.array_equal(coco.annToMask(ann), masks.decode(obj.mask))
            assert coco.loadCats(ann["category_id"])[0]["name"] == obj.category
        captions = coco.dataset["captions"]
        assert len(captions) == len(coco.getImgIds())
        for caption in captions:
            row = rows[caption["record_id"]]
            assert caption["caption"] == row["caption"]
            assert len(caption["phrases"]) == caption["caption"].count("[SEG]") == 2
            for phrase in caption["phrases"]:
                anns = coco.loadAnns(phrase["annotation_ids"])
                assert {a["image_id"] for a in anns} == {caption["image_id"]}
                union = np.any([coco.annToMask(a) for a in anns], axis=0)
                expected = masks.decode(RLE.model_validate(row["masks"][phrase["seg_index"]]))
                assert np.array_equal(union, expected)
            assert [len(p["annotation_ids"]) for p in caption["phrases"]] == [1, 2]
            # one annotation per member, in the phrase's object id order
            assert [[a["object_id"] for a in coco.loadAnns(p["annotation_ids"])]
                    for p in caption["phrases"]] == row["object_ids"]


def test_datasets_loads_parquet_with_images(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    datasets = pytest.importorskip("datasets")
    root, _ = exported
    files = sorted(str(p) for p in (root / "out" / "parquet").glob("train-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    # every column is typed by our metadata, none re-guessed from Arrow
    meta = json.loads(EXPORT_SCHEMA.metadata[b"huggingface"])["info"]["features"]
    assert datasets.Features.from_dict(meta).arrow_schema.equals(
        EXPORT_SCHEMA.remove_metadata())
    records = _all_records(root)
    assert len(ds) == 3
    for row in ds:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (W, H)
        record = records[row["record_id"]]
        assert row["caption"] == record.caption
        assert row["object_ids"] == [[1001], [1002, 1003]]
        assert row["provenance"]["backend"] == "template"
        tile = _all_tiles(root)[row["tile_id"]]
        assert np.array_equal(np.asarray(row["image"]), cv2.cvtColor(
            cv2.imdecode(np.frombuffer(tile.image_png, np.uint8), cv2.IMREAD_COLOR),
            cv2.COLOR_BGR2RGB))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_export_is_byte_identical_on_rerun(exported, tmp_path):
    root, _ = exported
    run_export(PARAMS, root / "tiles", root / "records", tmp_path / "again")
    first, second = _tree(root / "out"), _tree(tmp_path / "again")
    assert len(first) > 10 and first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_unsafe_tile_id_is_refused_before_writing(tmp_path):
    record, tile = make_pair("P9300_0_48_0_64", "train", 1)
    record = record.model_copy(update={"tile_id": "../evil"})
    tile = tile.model_copy(update={"tile_id": "../evil"})
    tiles_dir, records_dir = write_inputs(tmp_path / "in",
                                          {shard_name("train", 0, 1): [(record, tile)]})
    out = tmp_path / "build" / "export"
    with pytest.raises(UnsafePathError):
        run_export(PARAMS, tiles_dir, records_dir, out)
    assert not (tmp_path / "build").exists() or list((tmp_path / "build").iterdir()) == []
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "build" / "evil.png").exists()


def _seg_mismatch(pair):
    record, tile = pair
    return record.model_copy(update={"caption": record.caption + " A <p> x </p> [SEG] ."}), tile


def _tile_absent(pair):
    record, tile = pair
    return record, tile.model_copy(update={"tile_id": "P0000_0_48_0_64"})


def _unknown_instance(pair):
    record, tile = pair
    phrase = record.phrases[0].model_copy(update={"object_ids": [4242]})
    return record.model_copy(update={"phrases": [phrase, record.phrases[1]]}), tile


@pytest.mark.parametrize("spoil, error, message", [
    (_seg_mismatch, BadRecordError, "3 \\[SEG\\] tokens but 2 phrases"),
    (_tile_absent, BadRecordError, "absent from train-00000-of-00001.parquet"),
    (_unknown_instance, BadRecordError, "instances \\[4242\\] absent"),
])
def test_bad_record_refuses_the_whole_export(tmp_path, spoil, error, message):
    good = make_pair("P9400_0_48_0_64", "train", 2)
    bad = spoil(make_pair("P9401_0_48_0_64", "train", 3))
    tiles_dir, records_dir = write_inputs(tmp_path / "in",
                                          {shard_name("train", 0, 1): [good, bad]})
    with pytest.raises(error, match=message):
        run_export(PARAMS, tiles_dir, records_dir, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_two_records_of_one_tile_are_refused(tmp_path):
    pair = make_pair("P9500_0_48_0_64", "train", 4)
    again = (pair[0].model_copy(update={"record_id": "another"}), pair[1])
    tiles_dir, records_dir = write_inputs(tmp_path / "in", {shard_name("train", 0, 1): [pair]})
    write_records(records_dir / shard_name("train", 0, 1), [pair[0], again[0]], GroundedRecord)
    with pytest.raises(DuplicateNameError, match="two records"):
        run_export(PARAMS, tiles_dir, records_dir, tmp_path / "out")


def test_released_sample_through_export_is_byte_identical(tmp_path):
    """Import the real release, export it: its polygon file and list come back byte for byte."""
    sample = Path(__file__).resolve().parent.parent / "data" / "geopixeld_sample"
    pairs = read_geopixel(sample / "GeoPixelD.json", sample)
    tiles_dir, records_dir = write_inputs(tmp_path / "in", {shard_name("train", 0, 1): pairs})
    question = json.loads((sample / "GeoPixelD.json").read_text())[0]["conversations"][0]["value"]
    report = run_export(Params(export=ExportParams(instruction=question)), tiles_dir,
                        records_dir, tmp_path / "out")
    assert report["splits"]["train"]["annotations"] == 4
    out = tmp_path / "out" / "geopixel"
    name = "train/P0224_0_800_0_800.json"
    assert (out / name).read_bytes() == (sample / name).read_bytes()
    assert json.loads((out / "GeoPixelD.json").read_text()) == json.loads(
        (sample / "GeoPixelD.json").read_text())


# ---- a group's members stay apart; the instruction each record asks; fixed category ids -------

def _instance(object_id: int, category: str, mask: np.ndarray) -> ObjectInstance:
    rle = masks.encode(mask)
    return ObjectInstance(object_id=object_id, category=category, bbox=masks.bbox(rle),
                          area=masks.area(rle), mask=rle)


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def touching_group_pair(tile_id: str = f"P9600_0_{H}_0_{W}") -> tuple[GroundedRecord, Tile]:
    """Three vehicles parked bumper to bumper (their union is one blob) and a fourth in two
    parts (a vehicle the tile's edge or a tree cuts in two), grounded as one group, plus the
    first vehicle alone as an instance phrase."""
    parts = _rect(30, 34, 40, 44) | _rect(30, 34, 50, 54)
    objects = [_instance(2001, "Small_Vehicle", _rect(10, 16, 10, 16)),
               _instance(2002, "Small_Vehicle", _rect(10, 16, 16, 22)),
               _instance(2003, "Small_Vehicle", _rect(10, 16, 22, 28)),
               _instance(2004, "Small_Vehicle", parts)]
    group = [o.object_id for o in objects]
    phrases = [
        Phrase(text="small vehicles", kind="cluster", category="Small_Vehicle",
               object_ids=group, mask=masks.union([o.mask for o in objects])),
        Phrase(text="small vehicle-1", kind="instance", category="Small_Vehicle",
               object_ids=[2001], mask=objects[0].mask),
    ]
    png = encode_png(np.full((H, W, 3), 80, np.uint8))
    tile = Tile(tile_id=tile_id, source="test", split="train", image_name=tile_id.split("_")[0],
                window=Window(y0=0, y1=H, x0=0, x1=W), height=H, width=W, image_png=png,
                image_sha256=sha256(png), objects=objects)
    record = GroundedRecord(
        record_id=f"train/{tile_id}", tile_id=tile_id, split="train",
        caption="Four <p> small vehicles </p> [SEG] , the first <p> small vehicle-1 </p> [SEG] .",
        phrases=phrases, provenance=PROVENANCE)
    return record, tile


def test_group_of_touching_instances_keeps_one_polygon_per_member(tmp_path):
    record, tile = touching_group_pair()
    tiles_dir, records_dir = write_inputs(tmp_path / "in",
                                          {shard_name("train", 0, 1): [(record, tile)]})
    run_export(PARAMS, tiles_dir, records_dir, tmp_path / "out")
    out = tmp_path / "out"
    by_id = {o.object_id: masks.decode(o.mask) for o in tile.objects}
    group_mask = masks.decode(record.phrases[0].mask)
    # the union's outline would give 3 polygons (one blob + the two parts of 2004)
    assert len(masks.to_polygons(group_mask)) == 3

    polygons = json.loads((out / "geopixel" / "train" / f"{tile.tile_id}.json").read_text(
        ))["polygons"]
    assert [len(p) for p in polygons] == [5, 1]  # 1 + 1 + 1 + 2 parts; the instance as before
    assert polygons[1] == masks.to_polygons(by_id[2001])
    for polys, phrase in zip(polygons, record.phrases):  # GeoPixel's loader fills them all
        assert np.array_equal(masks.from_polygons(polys, H, W), masks.decode(phrase.mask))

    row, = pq.read_table(out / "parquet" / "train-00000-of-00001.parquet").to_pylist()
    members = row["phrase_polygons"][0]
    assert [len(m) for m in members] == [1, 1, 1, 2] and row["object_ids"][0] == [2001, 2002,
                                                                                  2003, 2004]
    for member, object_id in zip(members, row["object_ids"][0]):
        assert np.array_equal(masks.from_polygons(member, H, W), by_id[object_id])
    # flattened, a phrase's members are exactly its GeoPixel polygons
    assert [[poly for m in phrase for poly in m] for phrase in row["phrase_polygons"]] \
        == polygons
    assert RLE.model_validate(row["masks"][0]) == record.phrases[0].mask  # still the union

    coco = COCO(str(out / "coco" / "train.json"))
    phrase = coco.dataset["captions"][0]["phrases"][0]
    anns = coco.loadAnns(phrase["annotation_ids"])
    assert [a["object_id"] for a in anns] == [2001, 2002, 2003, 2004]
    for ann in anns:
        assert np.array_equal(coco.annToMask(ann), by_id[ann["object_id"]])


def test_phrase_whose_members_do_not_make_its_mask_keeps_its_outline(tmp_path):
    """A phrase whose mask is not its members' union (an edited phrase) is traced from its
    mask, so that GeoPixel's fill still gives the phrase's own mask."""
    record, tile = touching_group_pair()
    edited = record.phrases[0].model_copy(update={"object_ids": [2001, 2002]})
    record = record.model_copy(update={"phrases": [edited, record.phrases[1]]})
    tiles_dir, records_dir = write_inputs(tmp_path / "in",
                                          {shard_name("train", 0, 1): [(record, tile)]})
    run_export(PARAMS, tiles_dir, records_dir, tmp_path / "out")
    polygons = json.loads((tmp_path / "out" / "geopixel" / "train" / f"{tile.tile_id}.json"
                           ).read_text())["polygons"]
    assert polygons[0] == masks.to_polygons(masks.decode(edited.mask))
    row, = pq.read_table(tmp_path / "out" / "parquet").to_pylist()
    assert row["phrase_polygons"][0] == [polygons[0]]  # one entry: the mask's own contours


def test_every_record_asks_its_own_instruction(exported):
    root, _ = exported
    out = root / "out"
    asked = {}
    for listing in ("GeoPixelD.json", "GeoPixelD_test.json"):
        for item in json.loads((out / "geopixel" / listing).read_text()):
            asked[Path(item["image"]).stem] = item["conversations"][0]["value"]
    rows = [r for p in sorted((out / "parquet").glob("*.parquet"))
            for r in pq.read_table(p, columns=["record_id", "tile_id", "instruction",
                                               "instruction_id"]).to_pylist()]
    assert len(rows) == len(asked) == 4
    for row in rows:
        chosen = PARAMS.export.instruction_for(row["record_id"])
        assert (row["instruction"], row["instruction_id"]) == (chosen.text, chosen.id)
        assert row["instruction_id"].startswith("v1/")
        assert asked[row["tile_id"]] == chosen.text
    coco = json.loads((out / "coco" / "train.json").read_text())
    for caption in coco["captions"]:
        assert caption["instruction"] == PARAMS.export.instruction_for(caption["record_id"]).text


def test_fixed_instruction_is_asked_by_every_record(tmp_path):
    tiles_dir, records_dir = standard_inputs(tmp_path / "in")
    params = Params(export=ExportParams(instruction=5), runner=PARAMS.runner)
    run_export(params, tiles_dir, records_dir, tmp_path / "out")
    items = json.loads((tmp_path / "out" / "geopixel" / "GeoPixelD.json").read_text())
    rows = pq.read_table(tmp_path / "out" / "parquet",
                         columns=["instruction", "instruction_id"]).to_pylist()
    assert {i["conversations"][0]["value"] for i in items} == {r["instruction"] for r in rows} \
        == {params.export.instruction_for("any").text}
    assert {r["instruction_id"] for r in rows} == {"v1/05"}


def _coco_category_ids(root: Path, categories: dict[int, str],
                       given: dict[int, int] | None = None) -> dict[str, int]:
    """Export one record whose tile's instances have `categories` (and the source category ids
    `given`); the COCO name -> id."""
    record, tile = make_pair(f"P9700_0_{H}_0_{W}", "train", 1)
    given = given or {}
    objects = [o.model_copy(update={"category": categories.get(o.object_id, o.category),
                                    "category_id": given.get(o.object_id)})
               for o in tile.objects]
    tile = tile.model_copy(update={"objects": objects})
    tiles_dir, records_dir = write_inputs(root / "in",
                                          {shard_name("train", 0, 1): [(record, tile)]})
    run_export(PARAMS, tiles_dir, records_dir, root / "out")
    coco = json.loads((root / "out" / "coco" / "train.json").read_text())
    ids = {c["name"]: c["id"] for c in coco["categories"]}
    for ann in coco["annotations"]:  # annotations use the listed ids
        assert ann["category_id"] == ids[{o.object_id: o.category for o in objects}[
            ann["object_id"]]]
    return ids


def test_category_ids_are_isaids_whatever_categories_a_build_holds(tmp_path):
    without_plane = _coco_category_ids(tmp_path / "a", {1004: "storage_tank"})
    with_plane = _coco_category_ids(tmp_path / "b", {1004: "storage_tank", 1003: "plane"})
    assert without_plane["storage_tank"] == with_plane["storage_tank"] == 2
    assert with_plane["plane"] == 14
    # the iSAID devkit's label ids (labels.py: 1 ship ... 15 Harbor)
    assert ISAID_CATEGORY_IDS == {
        "ship": 1, "storage_tank": 2, "baseball_diamond": 3, "tennis_court": 4,
        "basketball_court": 5, "Ground_Track_Field": 6, "Bridge": 7, "Large_Vehicle": 8,
        "Small_Vehicle": 9, "Helicopter": 10, "Swimming_pool": 11, "Roundabout": 12,
        "Soccer_ball_field": 13, "plane": 14, "Harbor": 15}
    assert without_plane == with_plane == ISAID_CATEGORY_IDS


def test_category_ids_the_source_gives_are_kept(tmp_path):
    """A COCO label file's own ids (here 7 building, 3 plane) pass through to the export."""
    ids = _coco_category_ids(tmp_path / "a", {1001: "building", 1002: "building", 1003: "plane",
                                              1004: "plane"},
                             {1001: 7, 1002: 7, 1003: 3, 1004: 3})
    assert ids == {"building": 7, "plane": 3}


def test_category_ids_the_sources_disagree_on_are_refused(tmp_path):
    with pytest.raises(BadAnnotationError, match="category 'plane' has two ids"):
        _coco_category_ids(tmp_path / "a", {1003: "plane", 1004: "plane"}, {1003: 3, 1004: 4})
    assert not (tmp_path / "a" / "out").exists()  # nothing half-written
    with pytest.raises(BadAnnotationError, match="category id 3 names two categories"):
        _coco_category_ids(tmp_path / "b", {1003: "plane", 1004: "ship"}, {1003: 3, 1004: 3})


def test_other_categories_follow_isaids():
    assert category_ids([("building", None), ("ship", None), ("object", None)]) == {
        **ISAID_CATEGORY_IDS, "building": 16, "object": 17}
    # no iSAID category: none listed
    assert category_ids([("building", None)]) == {"building": 16}
    assert category_ids([]) == {}
    # iSAID's own ids, given by the iSAID source, still list all 15
    assert category_ids([("ship", 1), ("roof", None)]) == {**ISAID_CATEGORY_IDS, "roof": 16}
    # ids a label file gives: kept; the unnamed ones come after the largest
    assert category_ids([("building", 40), ("tree", 2), ("object", None)]) == {
        "building": 40, "tree": 2, "object": 41}
    # an iSAID name under another id (a file numbered its own way): the file's id, and
    # iSAID's table is not mixed in
    assert category_ids([("ship", 3), ("plane", None)]) == {"ship": 3, "plane": 16}
    # a class code 0 is no COCO id: treated as none given
    assert category_ids([("0", 0)]) == {"0": 16}


def test_bundled_samples_group_phrases_keep_every_member(built_workspace):
    """On the real iSAID samples (`geopixeld build`): no group phrase has fewer polygons than
    members (touching vehicles used to merge: 34 vehicles as 23 polygons in P0004)."""
    export = built_workspace / "build" / "export"
    groups = 0
    for path in sorted((export / "parquet").glob("*.parquet")):
        for row in pq.read_table(path, columns=["tile_id", "object_ids", "masks",
                                                "phrase_polygons"]).to_pylist():
            polygons = json.loads((export / "geopixel" / "test" / f"{row['tile_id']}.json"
                                   ).read_text())["polygons"]
            for ids, members, polys, rle in zip(row["object_ids"], row["phrase_polygons"],
                                                polygons, row["masks"]):
                assert len(polys) >= len(ids) and len(members) == len(ids)
                # GeoPixel's fill covers the mask, and no more than its outline did (holes)
                mask = masks.decode(RLE.model_validate(rle))
                filled = masks.from_polygons(polys, *mask.shape)
                outline = masks.from_polygons(masks.to_polygons(mask), *mask.shape)
                assert (filled >= mask).all() and (filled <= outline).all()
                groups += len(ids) > 1
    assert groups >= 10
