"""The local scheduler: shards in fork-server worker processes by default, errors of any shard
raised after every shard settled, threads for a backend that holds a model in memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_template_backend import isaid_tile

from annotators.base import Backend, local_scheduler_for
from pipeline.core.errors import BadMaskError
from pipeline.core.params import Params
from pipeline.core.runner import map_shards
from pipeline.core.shards import read_records, write_records
from pipeline.formats.geopixel_format import sample_json
from pipeline.geometry import masks
from schemas import TilePlan


def _pid_and_square(n: int) -> tuple[int, int]:
    return os.getpid(), n * n


def _fail_on_three(item: tuple[int, Path]) -> int:
    n, folder = item
    if n == 3:
        raise BadMaskError("three is refused", folder / "three.png")
    (folder / f"{n}.done").write_text("ok")
    return n


def test_default_runs_shards_in_other_processes_in_item_order():
    assert Params().runner.local_scheduler == "processes"
    results = map_shards(_pid_and_square, list(range(6)), label="t",
                         local_scheduler="processes", workers=2)
    assert [sq for _, sq in results] == [n * n for n in range(6)]
    pids = {pid for pid, _ in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def _pid_and_cwd(n: int) -> tuple[int, str]:
    return os.getpid(), os.getcwd()


def test_workers_serve_the_next_map_until_the_working_directory_changes(tmp_path, monkeypatch):
    first = map_shards(_pid_and_cwd, list(range(6)), label="t", local_scheduler="processes",
                       workers=2)
    again = map_shards(_pid_and_cwd, list(range(4)), label="t", local_scheduler="processes",
                       workers=2)
    assert {pid for pid, _ in again} <= {pid for pid, _ in first}  # the same workers
    monkeypatch.chdir(tmp_path)
    moved = map_shards(_pid_and_cwd, list(range(4)), label="t", local_scheduler="processes",
                       workers=2)
    assert {cwd for _, cwd in moved} == {str(tmp_path)}  # fresh workers, in the new directory
    assert not {pid for pid, _ in moved} & {pid for pid, _ in first}


def test_a_failing_shard_raises_its_own_error_after_the_others_finished(tmp_path):
    with pytest.raises(BadMaskError, match="three is refused") as caught:
        map_shards(_fail_on_three, [(n, tmp_path) for n in range(6)], label="t",
                   local_scheduler="processes", workers=2)
    assert str(caught.value.path) == str(tmp_path / "three.png")
    assert sorted(p.name for p in tmp_path.glob("*.done")) == [f"{n}.done" for n in
                                                              (0, 1, 2, 4, 5)]


def test_backend_holding_a_model_runs_in_threads():
    class Loaded(Backend):
        loads_model = True

        def annotate(self, requests, context):
            return []

    class Remote(Loaded):
        loads_model = False

    assert local_scheduler_for(Loaded(), "processes") == "threads"
    assert local_scheduler_for(Loaded(), "synchronous") == "synchronous"
    assert local_scheduler_for(Remote(), "processes") == "processes"


def test_skipped_image_bytes_are_not_read(tmp_path):
    plan = TilePlan(tile_id="t", split="val", positions=[], marks=[], clusters=[],
                    unplanned_object_ids=[], som_png=b"\x89PNG...", som_sha256="ab")
    write_records(tmp_path / "p.parquet", [plan], TilePlan)
    (full,) = read_records(tmp_path / "p.parquet", TilePlan)
    (light,) = read_records(tmp_path / "p.parquet", TilePlan, skip_bytes=("som_png",))
    assert full.som_png == b"\x89PNG..." and light.som_png is None
    assert light.som_sha256 == "ab"
    with pytest.raises(ValueError, match="not a binary field"):
        read_records(tmp_path / "p.parquet", TilePlan, skip_bytes=("tile_id",))


def test_polygon_file_text_is_what_json_dumps_writes():
    tile = isaid_tile()
    from schemas import GroundedRecord, Phrase, Provenance
    phrases = [Phrase(text=f"o-{k}", kind="instance", category=o.category,
                      object_ids=[o.object_id], mask=o.mask)
               for k, o in enumerate(tile.objects[:5])]
    phrases.append(Phrase(text="all", kind="cluster", category="x",
                          object_ids=[o.object_id for o in tile.objects],
                          mask=masks.union([o.mask for o in tile.objects])))
    record = GroundedRecord(record_id="r", tile_id=tile.tile_id, split="val",
                            caption='A "quoted" caption, with commas. <p> o-0 </p> [SEG]',
                            phrases=phrases,
                            provenance=Provenance(backend="b", model="m", prompt_versions=[],
                                                  params_hash="h", pipeline_version="0"))
    text = sample_json(4, "data/x.png", record)
    expected = json.dumps({"id": 4, "img": "data/x.png", "gcg_description": record.caption,
                           "polygons": [masks.to_polygons(masks.decode(p.mask))
                                        for p in phrases]})
    assert text == expected
