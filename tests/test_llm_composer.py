"""The LLM composer against the loopback server: a valid paragraph becomes a record whose
[SEG]s follow the order of appearance (masks reordered with them), every malformed answer falls
back to the deterministic record and is counted by reason."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from loopback_openai import LoopbackOpenAI, compose_answer, default_answer

from pipeline.core.params import Params
from pipeline.core.shards import list_shards, read_records
from pipeline.stages.annotate import run_annotate
from pipeline.stages.compose.llm import parse_composition
from pipeline.stages.compose.stage import run_compose
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare
from schemas import GroundedRecord

KEY_ENV = "GEOPIXELD_TEST_COMPOSER_KEY"
_IDS = re.compile(r"^\[(\d+)\] (.+?)(?: \(.+?\))?: ", re.M)


def make_params(root: Path, cache: Path, base_url: str, composer: str = "llm",
                composer_backend: str | None = None) -> Params:
    raw = Params().model_dump(mode="json")
    raw["data"].update(root=str(root), splits=["val"])
    raw["annotate"]["backend"].update(name="openai", model="gpt-4o-mini")
    raw["annotate"]["backend"]["openai"].update(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0, backoff_base_s=0.01,
        backoff_max_s=0.05, max_attempts=3, concurrency=8)
    raw["annotate"]["cache"]["path"] = str(cache)
    raw["compose"]["composer"] = composer
    if composer_backend:
        raw["compose"]["llm_backend"] = {"name": composer_backend, "model": "template-v1"}
    raw["runner"].update(local_scheduler="synchronous", workers=1)
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def built(tmp_path_factory, isaid_root):
    """Tiles, plan and the three passes' responses of the val split (loopback answers)."""
    os.environ[KEY_ENV] = "sk-test-composer"
    out = tmp_path_factory.mktemp("composer")
    with LoopbackOpenAI() as server:
        params = make_params(isaid_root, out / "cache.sqlite", server.base_url, "deterministic")
        run_prepare(params, out / "tiles")
        run_plan(params, out / "tiles", out / "plan")
        for kind in ("holistic", "instance", "cluster"):
            run_annotate(params, kind, out / "tiles", out / "plan", out / "responses" / kind)
        run_compose(params, out / "tiles", out / "plan", out / "responses", out / "det")
    return out, isaid_root


def records(folder: Path) -> dict[str, GroundedRecord]:
    return {r.tile_id: r for s in list_shards(folder) for r in read_records(s, GroundedRecord)}


def content(record: GroundedRecord) -> tuple:
    """What a record says (its provenance differs between compose settings)."""
    return record.caption, record.phrases


def compose_llm(built, answer, name: str, composer_backend: str | None = None):
    out, root = built
    with LoopbackOpenAI(answer=answer) as server:
        params = make_params(root, out / f"{name}.sqlite", server.base_url,
                             composer_backend=composer_backend)
        report = run_compose(params, out / "tiles", out / "plan", out / "responses", out / name)
    return report, records(out / name), server


def test_parse_composition_accepts_each_id_once_and_refuses_the_rest():
    ok, reason = parse_composition("The {1} is white. {2} , and { 3 } line the road.", 3)
    assert reason == "ok" and [p for p in ok if isinstance(p, int)] == [1, 2, 3]
    cases = {
        "": "empty",
        "The {1} and {2}.": "missing_id",
        "The {1}, {2}, {3} and again {2}.": "repeated_id",
        "The {1}, {2}, {3} and {4}.": "unknown_id",
        "The {0}, {1}, {2}.": "unknown_id",
        "The {1}, {2}, {3} {note}.": "stray_brace",
        "The {1}, {2} and [3] {3}.": "bracket_id",
        "The <p> {1} </p> [SEG], {2}, {3}.": "tags",
        "The {1}, {2}, {3} <b>bold</b>.": "tags",
    }
    for text, expected in cases.items():
        pieces, reason = parse_composition(text, 3)
        assert pieces is None and reason == expected, text


def test_llm_paragraph_in_its_own_order_grounds_the_right_masks(built):
    out, _ = built
    deterministic = records(out / "det")

    def reversed_order(prompt: str, call: int) -> str:
        ids = [int(i) for i, _ in _IDS.findall(prompt)]
        return compose_answer(prompt, order=ids[::-1])

    report, composed, server = compose_llm(built, reversed_order, "rev")
    assert report["composer"] == "llm"
    assert report["llm"] == {"asked": len(deterministic), "composed": len(deterministic),
                             "fallbacks": {}}
    assert set(composed) == set(deterministic)
    for tile_id, record in composed.items():
        det = deterministic[tile_id]
        assert record.caption != det.caption
        assert record.caption.count("[SEG]") == len(record.phrases) == len(det.phrases)
        assert "{" not in record.caption
        # [SEG] order = order of appearance: instances came last-first, so clusters lead
        names = re.findall(r"<p> (.+?) </p> \[SEG\]", record.caption)
        assert names == [p.text for p in record.phrases]
        kinds = [p.kind for p in record.phrases]
        assert kinds == sorted(kinds)  # "cluster" < "instance": all clusters first
        # each phrase keeps its own mask and objects, whatever its new place
        by_objects = {tuple(p.object_ids): p for p in det.phrases}
        for p in record.phrases:
            assert by_objects[tuple(p.object_ids)].mask == p.mask
        # instance names count per category in order of appearance
        for category in {p.category for p in record.phrases if p.kind == "instance"}:
            numbers = [int(p.text.rsplit("-", 1)[1]) for p in record.phrases
                       if p.kind == "instance" and p.category == category]
            assert numbers == list(range(1, len(numbers) + 1))
        assert "openai" in record.provenance.backend
    prompt = next(iter(server.counters.answered_prompts))
    assert "Merge these annotations" in prompt and "[1] " in prompt
    assert all(s["images"] == [] for s in server.counters.seen)  # text only by default


def test_every_malformed_answer_falls_back_and_is_counted(built):
    out, _ = built
    deterministic = records(out / "det")
    bad = ["{1} only.", "{1} {1} twice and more {2} {3} {4} {5} {6} {7} {8} {9} {10}.",
           "<p> {1} </p> [SEG]", "I cannot help with that."]

    def scripted(prompt: str, call: int) -> str:
        h = int(_IDS.findall(prompt)[0][0]) + len(prompt)
        if h % 3 == 0:
            return default_answer(prompt) + " " + "Long words here. " * 200  # too long
        if h % 3 == 1:
            return bad[h % len(bad)]
        return default_answer(prompt)

    report, composed, _ = compose_llm(built, scripted, "bad")
    llm = report["llm"]
    assert llm["asked"] == len(deterministic) == llm["composed"] + sum(llm["fallbacks"].values())
    assert llm["composed"] >= 1 and llm["fallbacks"]
    assert set(llm["fallbacks"]) <= {"missing_id", "repeated_id", "tags",
                                     "record_caption_too_long"}
    assert set(composed) == set(deterministic)  # no tile lost: fallbacks kept theirs
    kept = [t for t, r in composed.items() if content(r) == content(deterministic[t])]
    assert len(kept) == sum(llm["fallbacks"].values())


def test_a_backend_that_cannot_compose_keeps_every_deterministic_record(built):
    out, _ = built
    report, composed, server = compose_llm(built, default_answer, "tmpl",
                                           composer_backend="template")
    assert server.counters.requests == 0
    assert report["llm"]["composed"] == 0
    assert report["llm"]["fallbacks"] == {"failed_response": report["records"]}
    deterministic = records(out / "det")
    assert {t: content(r) for t, r in composed.items()} == \
        {t: content(r) for t, r in deterministic.items()}
    assert json.loads((out / "tmpl" / "report.json").read_text())["composer"] == "llm"
