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

from pipeline.core.errors import BadRecordError, DuplicateNameError, UnsafePathError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import ExportParams, Params, RunnerParams
from pipeline.core.shards import read_records, shard_name, write_records
from pipeline.formats.geopixel_format import read_geopixel
from pipeline.geometry import masks
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
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
            "Small_Vehicle", "ship", "tennis_court"]
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
    report = run_export(Params(), tiles_dir, records_dir, tmp_path / "out")
    assert report["splits"]["train"]["annotations"] == 4
    out = tmp_path / "out" / "geopixel"
    name = "train/P0224_0_800_0_800.json"
    assert (out / name).read_bytes() == (sample / name).read_bytes()
    assert json.loads((out / "GeoPixelD.json").read_text()) == json.loads(
        (sample / "GeoPixelD.json").read_text())
