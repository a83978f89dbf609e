"""Batched-marks mode (`plan.batched_marks`): one structured-output call per patch describes every
marked object; fewer calls per patch than one call per mark, and compose grounds the same
objects. A backend that answers one mark per call gets the bundled questions instead. Either
way the annotate stage stores one instance response per mark, so compose reads one format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from loopback_openai import LoopbackOpenAI, default_answer

from annotators.answering import MARKS_MISSING, clean_marks_answer
from annotators.base import AnnotationContext
from annotators.cleaning import CleaningLimits
from annotators.openai_backend import OpenAIBackend
from pipeline.core.errors import BadShardError
from pipeline.core.params import Params
from pipeline.core.shards import list_shards, read_records, write_records
from pipeline.stages.annotate import per_mark_responses, run_annotate, split_batch_answer
from pipeline.stages.compose.stage import run_compose
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare
from schemas import GroundedRecord, Request, Response, TilePlan, Usage, arrow_schema

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


def responses_of(folder: Path) -> list[Response]:
    return [r for s in list_shards(folder) for r in read_records(s, Response)]


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


def answer_instances(built, mode: str, backend: str = "openai", answer=default_answer,
                     name: str | None = None):
    """Annotate the instance pass of one mode and compose it (in `out/<name>`, default
    `<mode>-<backend>`); returns the server, the annotate and compose reports and the records."""
    out, root, _ = built
    folder = out / (name or f"{mode}-{backend}")
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
    planned = requests_of(out / "batched" / "plan" / "requests" / "instance")
    batched = [r for r in planned if r.kind == "instance_batch"]
    assert {r.kind for r in per_mark} == {"instance"}
    assert {r.kind for r in planned} == {"instance", "instance_batch"}
    # the batched plan also holds the per-mark requests, the same as the per-mark plan's
    assert [r for r in planned if r.kind == "instance"] == per_mark
    assert all(r.bundles is None for r in per_mark)
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
    # the report counts requests asked: a batch, not the per-mark requests it bundles
    assert reports["batched"]["requests"]["instance"] == len(batched)
    # a batched request lists the per-mark requests it asks, by mark number
    by_id = {r.request_id: r for r in per_mark}
    for r in batched:
        bundled = [by_id[i] for i in r.bundles]
        assert [q.object_ids[0] for q in bundled] == r.object_ids
        assert [q.mark_number for q in bundled] == list(range(1, len(r.object_ids) + 1))
        assert {q.tile_id for q in bundled} == {r.tile_id}
    assert sorted(i for r in batched for i in r.bundles) == sorted(by_id)


@pytest.fixture(scope="module")
def openai_runs(built):
    """The instance pass of both modes answered by the openai backend, and composed."""
    return {mode: answer_instances(built, mode) for mode in ("per_mark", "batched")}


def test_batched_mode_makes_fewer_calls_per_patch_and_grounds_the_same_objects(openai_runs):
    sync_server, sync_report, sync_compose, sync_records = openai_runs["per_mark"]
    batch_server, batch_report, batch_compose, batch_records = openai_runs["batched"]
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


def test_annotate_stores_one_instance_response_per_mark_in_both_modes(built, openai_runs):
    """Compose reads one format: per-mark instance responses keyed by the per-mark request ids,
    whether the marks were asked one by one or in one call; a call's cost is stored once."""
    out, _, _ = built
    stored = {mode: responses_of(out / f"{mode}-openai" / "responses" / "instance")
              for mode in openai_runs}
    per_mark = requests_of(out / "per_mark" / "plan" / "requests" / "instance")
    batches = [r for r in requests_of(out / "batched" / "plan" / "requests" / "instance")
               if r.kind == "instance_batch"]
    for mode, responses in stored.items():
        assert [r.request_id for r in responses] == [q.request_id for q in per_mark], mode
        assert {(r.kind, r.status) for r in responses} == {("instance", "ok")}, mode
    assert all(r.batch_id is None for r in stored["per_mark"])
    by_id = {r.request_id: r for r in stored["batched"]}
    for batch in batches:
        marks = [by_id[i] for i in batch.bundles]
        assert {r.batch_id for r in marks} == {batch.request_id}
        # the call's usage, cost and attempts on its first mark only
        assert marks[0].usage.prompt_tokens > 0 and marks[0].cost_usd > 0
        assert marks[0].attempts == 1
        assert all(r.usage.prompt_tokens == r.usage.completion_tokens == r.attempts == 0
                   and r.cost_usd == 0.0 for r in marks[1:])
    # the report counts the calls asked and sums what was paid, as before the split
    report = openai_runs["batched"][1]
    assert report["requests"] == report["ok"] == len(batches)
    assert report["cost_usd"] == round(sum(r.cost_usd for r in stored["batched"]), 6) > 0
    assert report["tokens"]["prompt"] == sum(r.usage.prompt_tokens for r in stored["batched"])
    # compose never reads the plan's batch requests nor imports the plan stage
    code = ("import sys, pipeline.stages.compose.stage; "
            "assert 'pipeline.stages.plan' not in sys.modules, 'compose imports plan'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


def test_a_batch_answer_that_omits_a_mark_fails_that_mark_only(built, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-marks")
    out, _, _ = built

    def answer(prompt: str, call: int) -> str:  # every answer leaves out the last of 2+ marks
        full = json.loads(default_answer(prompt))
        if "marks" in full and len(full["marks"]) >= 2:
            full["marks"] = full["marks"][:-1]
        return json.dumps(full)

    _, report, composed, batch_records = answer_instances(built, "batched", answer=answer,
                                                          name="omitted")
    _, _, _, sync_records = answer_instances(built, "per_mark", name="omitted-per-mark")
    stored = {r.request_id: r for r in responses_of(out / "omitted" / "responses" / "instance")}
    batches = [r for r in requests_of(out / "batched" / "plan" / "requests" / "instance")
               if r.kind == "instance_batch"]
    left_out = {b.bundles[-1] for b in batches if len(b.bundles) >= 2}
    assert left_out
    for batch in batches:
        for n, rid in enumerate(batch.bundles, 1):
            r = stored[rid]
            if rid in left_out:
                assert r.status == "failed" and r.text == ""
                assert r.error == f"the batched-marks answer does not describe mark {n}"
            else:
                assert r.status == "ok" and r.text
    # the calls themselves were answered (partial answers are kept): nothing failed to report
    assert report["failed"] == 0 and report["ok"] == len(batches)
    # compose leaves out exactly those marks and grounds every other object
    assert composed["phrases_skipped"] == {"failed_response": len(left_out)}
    missing = {(b.tile_id, b.object_ids[-1]) for b in batches if b.bundles[-1] in left_out}
    assert set(batch_records) == set(sync_records)
    for tile_id, record in sync_records.items():
        def grounded(r):
            return {(p.kind, tuple(p.object_ids)) for p in r.phrases}
        expected = {(kind, ids) for kind, ids in grounded(record)
                    if not (kind == "instance" and (tile_id, ids[0]) in missing)}
        assert grounded(batch_records[tile_id]) == expected


def test_split_batch_answer_and_older_shards():
    marks = [Request(request_id=f"m{n}", tile_id="t", kind="instance", prompt=f"p{n}",
                     prompt_version="v1", image_sha256="s", object_ids=[n], mark_number=n)
             for n in (1, 2, 3)]
    batch = Request(request_id="b", tile_id="t", kind="instance_batch", prompt="p",
                    prompt_version="v1", image_sha256="s", object_ids=[1, 2, 3],
                    bundles=["m1", "m2", "m3"])
    failed = Response(request_id="b", tile_id="t", kind="instance_batch", status="failed",
                      error="HTTP 500", backend="openai", model="m", prompt_version="v1",
                      usage=Usage(prompt_tokens=7), cost_usd=0.5, attempts=3, cached=True)
    parts = split_batch_answer(batch, marks, failed)
    assert [(r.request_id, r.kind, r.status, r.error, r.batch_id) for r in parts] == [
        (f"m{n}", "instance", "failed", "HTTP 500", "b") for n in (1, 2, 3)]
    assert [(r.usage.prompt_tokens, r.cost_usd, r.attempts) for r in parts] == [
        (7, 0.5, 3), (0, 0, 0), (0, 0, 0)] and all(r.cached for r in parts)
    junk = failed.model_copy(update={"status": "ok", "error": None, "text": "not json"})
    assert {r.error for r in split_batch_answer(batch, marks, junk)} == {
        "the batched-marks answer is not a list of marks and descriptions"}
    ok = junk.model_copy(update={"text": json.dumps([{"mark": 2, "description": "A ship."}])})
    stored = per_mark_responses([*marks, batch], [ok])
    assert [(r.request_id, r.status, r.text) for r in stored] == [
        ("m1", "failed", ""), ("m2", "ok", "A ship."), ("m3", "failed", "")]
    # a batch of an older plan, which did not list its per-mark requests, is refused
    with pytest.raises(BadShardError, match="re-run plan"):
        per_mark_responses([batch.model_copy(update={"bundles": None})], [ok])


def test_shards_without_the_new_columns_still_read(tmp_path):
    """Response.batch_id and Request.bundles are optional: older shards read as None."""
    response = Response(request_id="r", tile_id="t", kind="instance", status="ok", text="A.",
                        backend="b", model="m", prompt_version="v1")
    request = Request(request_id="r", tile_id="t", kind="instance", prompt="p",
                      prompt_version="v1", image_sha256="s", object_ids=[1])
    for record, column in ((response, "batch_id"), (request, "bundles")):
        path = write_records(tmp_path / f"{column}.parquet", [record], type(record))
        table = pq.read_table(path)
        older = table.drop_columns([column]).replace_schema_metadata(
            arrow_schema(type(record)).metadata)
        pq.write_table(older, path)
        assert column not in pq.read_schema(path).names
        (back,) = read_records(path, type(record))
        assert back == record and getattr(back, column) is None
