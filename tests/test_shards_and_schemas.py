"""Record schemas and shard I/O: typed round trips, atomic writes, staged outputs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import UnsafePathError
from pipeline.core.shards import (
    list_shards,
    read_records,
    safe_join,
    safe_name,
    shard_name,
    staged_folder,
    write_records,
)
from pipeline.geometry import masks
from schemas import (
    SCHEMA_VERSION,
    GroundedRecord,
    ObjectInstance,
    Phrase,
    Provenance,
    Tile,
    Window,
    arrow_schema,
)


def _tile(tile_id: str = "P0001_0_800_0_800") -> Tile:
    m = np.zeros((8, 10), np.uint8)
    m[2:5, 3:7] = 1
    obj = ObjectInstance(object_id=1001, category="plane", bbox=[3, 2, 4, 3], area=12,
                         mask=masks.encode(m))
    return Tile(tile_id=tile_id, source="isaid", split="train", image_name="P0001",
                window=Window(y0=0, y1=8, x0=0, x1=10), height=8, width=10,
                image_png=b"\x89PNG fake", image_sha256="0" * 64, objects=[obj])


def test_tile_round_trip_through_parquet(tmp_path):
    path = tmp_path / shard_name("train", 0, 1)
    write_records(path, [_tile(), _tile("P0002")], Tile)
    back = read_records(path, Tile)
    assert back == [_tile(), _tile("P0002")]
    meta = pq.read_schema(path).metadata
    assert meta[b"geopixeld.record"] == b"Tile"
    assert meta[b"geopixeld.schema_version"] == SCHEMA_VERSION.encode()
    assert masks.decode(back[0].objects[0].mask).sum() == 12


def test_arrow_schema_follows_the_model():
    schema = arrow_schema(GroundedRecord)
    assert schema.names == list(GroundedRecord.model_fields)
    phrase = schema.field("phrases").type.value_type
    assert [f.name for f in phrase] == list(Phrase.model_fields)
    prov = schema.field("provenance").type
    assert {f.name for f in prov} == set(Provenance.model_fields)


def test_shard_names_and_listing(tmp_path):
    assert shard_name("val", 3, 12) == "val-00003-of-00012.parquet"
    for name in ["val-00000-of-00002.parquet", "val-00001-of-00002.parquet",
                 "train-00000-of-00001.parquet", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "val")] == [
        "val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert len(list_shards(tmp_path)) == 3


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x\\y", "a..b"])
def test_unsafe_names_are_refused(tmp_path, bad):
    with pytest.raises(UnsafePathError):
        safe_name(bad)


def test_safe_join_refuses_escape(tmp_path):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, "../outside.png")
    assert safe_join(tmp_path, "P0003_0_800_0_800.png").parent == tmp_path


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    with pytest.raises(AttributeError):
        write_records(path, [_tile(), object()], Tile)  # type: ignore[list-item]
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_keeps_previous_output_on_failure(tmp_path):
    out = tmp_path / "tiles"
    with staged_folder(out, stage="prepare") as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with staged_folder(out, stage="prepare") as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]
    with staged_folder(out, stage="prepare") as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [".geopixeld-stage.json", "b.txt"]


def test_decode_crop_equals_full_decode_on_random_and_edge_masks():
    rng = np.random.default_rng(0)
    cases = [np.zeros((40, 30), np.uint8), np.ones((40, 30), np.uint8)]
    for _ in range(40):
        m = (rng.random((rng.integers(1, 60), rng.integers(1, 60))) > rng.random()).astype(np.uint8)
        cases.append(m)
    blob = np.zeros((800, 800), np.uint8)
    blob[790:800, 0:5] = 1          # runs that wrap from one column to the next
    blob[0:3, 799] = 1
    cases.append(blob)
    for m in cases:
        crop, x0, y0 = masks.decode_crop(masks.encode(m))
        full = np.zeros_like(m)
        full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
        assert np.array_equal(full, m)
        if m.any():
            ys, xs = np.nonzero(m)
            assert (x0, y0) == (xs.min(), ys.min())
            assert crop.shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)


def test_staged_folder_removes_what_a_killed_run_left(tmp_path):
    out = tmp_path / "tiles"
    leftover = tmp_path / ".tiles.staging-abc123"
    leftover.mkdir()
    (leftover / "half.parquet").write_bytes(b"half")
    other = tmp_path / ".plan.staging-xyz"       # another stage's: not ours to remove
    other.mkdir()
    with staged_folder(out, stage="prepare") as staging:
        (staging / "a.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plan.staging-xyz", "tiles"]
