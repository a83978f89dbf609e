"""Batched-marks mode (`plan.batched_marks`): one structured-output call per patch describes every
marked object; fewer calls per patch than one call per mark, and compose grounds the same
objects. A backend that answers one mark per call gets the bundled questions instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from loopback_openai import LoopbackOpenAI, default_answer

from annotators.base import AnnotationContext
from annotators.cleaning import CleaningLimits
from annotators.openai_backend import MARKS_MISSING, OpenAIBackend, clean_marks_answer
from pipeline.core.params import Params
from pipeline.core.shards import list_shards, read_records
from pipeline.stages.annotate import run_annotate
from pipeline.stages.compose.stage import run_compose
from pipeline.stages.plan import mark_requests, run_plan
from pipeline.stages.prepare import run_prepare
from schemas import GroundedRecord, Request, Tile, TilePlan

KEY_ENV = "GEOPIXELD_TEST_MARKS_KEY"


def make_params(root: Path, cache: Path, base_url: str, batched: bool,
                backend: str = "openai") -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"].update(root=str(root), splits=["val"])
    raw["plan"]["batched_marks"] = batched
    raw["annotate"]["backend"].update(name=backend,
                                      model="gpt-4o-mini" if backend == "openai" else "template-v1")
    raw["annotate"]["backend"]["openai"].update(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0, backoff_base_s=0.01,
        backoff_max_s=0.05, max_attempts=3, concurrency=8)
    raw["annotate"]["cache"]["path"] = str(cache)
    raw["runner"].update(local_scheduler="synchronous", workers=1)
    return Params.model_validate(raw)


def records(folder: Path) -> dict[str, GroundedRecord]:
    return {r.tile_id: r for s in list_shards(folder) for r in read_records(s, GroundedRecord)}


def requests_of(folder: Path) -> list[Request]:
    return [r for s in list_shards(folder) for r in read_records(s, Request)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, isaid_root):
    """Val tiles planned both ways; holistic and cluster answers (the same in both modes)."""
    os.environ[KEY_ENV] = "sk-test-marks"
    out = tmp_path_factory.mktemp("marks")
    with LoopbackOpenAI() as server:
        params = {mode: make_params(isaid_root, out / "cache.sqlite", server.base_url,
                                    mode == "batched") for mode in ("per_mark", "batched")}
        run_prepare(params["per_mark"], out / "tiles")
        plan_reports = {mode: run_plan(p, out / "tiles", out / mode / "plan")
                        for mode, p in params.items()}
        for kind in ("holistic", "cluster"):
            run_annotate(params["per_mark"], kind, out / "tiles", out / "per_mark" / "plan",
                         out / "shared" / kind)
    return out, isaid_root, plan_reports


def answer_instances(built, mode: str, backend: str = "openai", answer=default_answer):
    """Annotate the instance pass of one mode and compose it; returns the server, the annotate
    and compose reports and the records."""
    out, root, _ = built
    folder = out / f"{mode}-{backend}"
    responses = folder / "responses"
    with LoopbackOpenAI(answer=answer) as server:
        params = make_params(root, folder / "cache.sqlite", server.base_url, mode == "batched",
                             backend)
        report = run_annotate(params, "instance", out / "tiles", out / mode / "plan",
                              responses / "instance")
    for kind in ("holistic", "cluster"):
        (responses / kind).symlink_to(out / "shared" / kind)
    composed = run_compose(params, out / "tiles", out / mode / "plan", responses,
                           folder / "records")
    return server, report, composed, records(folder / "records")


def test_plan_emits_one_batched_request_per_marked_tile(built):
    out, _, reports = built
    per_mark = requests_of(out / "per_mark" / "plan" / "requests" / "instance")
    batched = requests_of(out / "batched" / "plan" / "requests" / "instance")
    assert {r.kind for r in per_mark} == {"instance"} and {r.kind for r in batched} == {
        "instance_batch"}
    assert len({r.tile_id for r in per_mark}) == len(batched) < len(per_mark)
    assert sorted(i for r in batched for i in r.object_ids) == sorted(
        r.object_ids[0] for r in per_mark)
    for r in batched:
        assert r.prompt.count("\nMark ") == len(r.object_ids)
        assert "Do not mention the marked number" in r.prompt
    # both reports give calls per tile for both modes; the batched mode needs fewer
    assert reports["batched"]["calls_per_tile"] == reports["per_mark"]["calls_per_tile"]
    calls = reports["batched"]["calls_per_tile"]
    assert calls["batched_marks"] < calls["per_mark"]
    assert reports["batched"]["batched_marks"] and not reports["per_mark"]["batched_marks"]
    assert reports["batched"]["requests"]["instance"] == len(batched)
    # split back, a batched request asks exactly the per-mark questions
    tiles = {t.tile_id: t for s in list_shards(out / "tiles") for t in read_records(s, Tile)}
    plans = {p.tile_id: p for s in list_shards(out / "batched" / "plan" / "tiles")
             for p in read_records(s, TilePlan)}
    again = [q for r in batched for q in mark_requests(tiles[r.tile_id], plans[r.tile_id], "v1")]
    assert sorted(q.request_id for q in again) == sorted(r.request_id for r in per_mark)


def test_batched_mode_makes_fewer_calls_per_patch_and_grounds_the_same_objects(built):
    sync_server, sync_report, sync_compose, sync_records = answer_instances(built, "per_mark")
    batch_server, batch_report, batch_compose, batch_records = answer_instances(built, "batched")
    tiles = sync_report["tiles"]
    assert tiles == batch_report["tiles"] > 0
    # calls per patch, from the server's own counter and from the annotate report
    assert batch_server.counters.requests / tiles < sync_server.counters.requests / tiles
    assert batch_report["calls_per_tile"] < sync_report["calls_per_tile"]
    assert batch_report["calls"] == batch_server.counters.requests
    assert batch_report["requests_per_tile"] < sync_report["requests_per_tile"]
    # sent with structured output, and a larger token budget
    seen = batch_server.counters.seen
    assert seen and all(s["response_format"] == "marks" and s["max_tokens"] == 1024 for s in seen)
    assert all(s["response_format"] is None for s in sync_server.counters.seen)
    # compose reads the per-mark descriptions out of the batched answers
    assert set(batch_records) == set(sync_records)
    for tile_id, record in batch_records.items():
        def grounded(r):
            return sorted((p.kind, tuple(p.object_ids)) for p in r.phrases)
        assert grounded(record) == grounded(sync_records[tile_id])
    assert batch_compose["phrases"] == sync_compose["phrases"]
    assert batch_compose["phrases_skipped"] == sync_compose["phrases_skipped"] == {}


def test_one_mark_per_call_backend_answers_batched_requests_the_same(built):
    _, sync_report, _, sync_records = answer_instances(built, "per_mark", backend="template")
    _, batch_report, _, batch_records = answer_instances(built, "batched", backend="template")
    # the template backend asks the bundled questions: same calls, same words
    assert batch_report["calls"] == sync_report["calls"]
    assert {t: (r.caption, r.phrases) for t, r in batch_records.items()} == \
        {t: (r.caption, r.phrases) for t, r in sync_records.items()}


def test_partial_batched_answer_is_asked_again_and_the_fullest_kept(built, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-marks")
    out, root, _ = built
    batched = [r for r in requests_of(out / "batched" / "plan" / "requests" / "instance")
               if len(r.object_ids) >= 2]
    plans = {p.tile_id: p for s in list_shards(out / "batched" / "plan" / "tiles")
             for p in read_records(s, TilePlan)}
    images = {p.som_sha256: p.som_png for p in plans.values() if p.som_sha256}

    def answer(prompt: str, call: int) -> str:
        full = json.loads(default_answer(prompt))
        return json.dumps({"marks": full["marks"][:1]}) if call == 0 else json.dumps(full)

    with LoopbackOpenAI(answer=answer) as server:
        params = make_params(root, out / "partial.sqlite", server.base_url, True)
        backend = OpenAIBackend(params.annotate.backend)
        (response,) = backend.annotate(batched[:1], AnnotationContext(tiles={}, images=images))
    described = json.loads(response.text)
    assert response.status == "ok" and response.attempts == 2
    assert [d["mark"] for d in described] == list(range(1, len(batched[0].object_ids) + 1))
    assert backend.stats.cleaning_refusals == {MARKS_MISSING: 1}


def test_batched_answer_cleaning():
    request = Request(request_id="r", tile_id="t", kind="instance_batch", prompt="p",
                      prompt_version="v1", image_sha256="s", object_ids=[7, 8, 9])
    limits = CleaningLimits()
    good = clean_marks_answer(json.dumps({"marks": [
        {"mark": 2, "description": "Sure! The ship marked with number 2 is white."},
        {"mark": 1, "description": "A red ship moored at the pier."},
        {"mark": 3, "description": "A small grey ship."}]}), request, limits)
    assert good.ok and MARKS_MISSING not in good.fixes
    assert json.loads(good.text) == [
        {"mark": 1, "description": "A red ship moored at the pier."},
        {"mark": 2, "description": "The ship is white."},
        {"mark": 3, "description": "A small grey ship."}]
    fenced = f"```json\n{json.dumps([{'mark': '1', 'description': 'A red ship moored.'}])}\n```"
    partial = clean_marks_answer(fenced, request, limits)
    assert partial.ok and MARKS_MISSING in partial.fixes
    refused = {
        "not json at all": "junk",
        json.dumps({"marks": [{"mark": 4, "description": "A red ship moored."}]}): "junk",
        json.dumps([{"mark": 1, "description": "A."},
                    {"mark": 1, "description": "B c d."}]): "junk",
        json.dumps([{"mark": 1}]): "junk",
        json.dumps([{"mark": 1, "description": "<p> ship </p> [SEG] is red."}]): "tags",
        json.dumps({"marks": []}): "empty",
    }
    for text, reason in refused.items():
        cleaned = clean_marks_answer(text, request, limits)
        assert not cleaned.ok and cleaned.reason == reason, text
    # one refused description among good ones: kept as a partial answer
    mixed = clean_marks_answer(json.dumps([
        {"mark": 1, "description": "A red ship moored."},
        {"mark": 2, "description": "I cannot see that object."}]), request, limits)
    assert mixed.ok and [d["mark"] for d in json.loads(mixed.text)] == [1]
