"""The qa stage on a hand-built build folder whose answers are worked out below.

Three records on 64x64 tiles, a fourth tile dropped:
  A (val, template, accepted): "A red car. The <p> small vehicle-1 </p> [SEG] is a red car."
      59 chars, plain "A red car. The small vehicle-1 is a red car." 44 chars,
      words a red car the small vehicle is a red car (10), 2 sentences; one instance phrase
      (Small_Vehicle, 8x8 mask); its tile also holds a plane, never grounded.
  B (val, template, edited): "Ships wait. <p> a few ships </p> [SEG] are moored! Calm water?"
      62 chars, plain 47, words ships wait a few ships are moored calm water (9), 3 sentences;
      one cluster phrase of 3 ships (three 4x4 masks).
  D (train, openai, unreviewed): "The <p> small vehicle-1 </p> [SEG] is parked."
      45 chars, plain 30, words the small vehicle is parked (5), 1 sentence; one instance
      phrase (16x16 mask).
  C (val): dropped by compose, caption_too_short.
Words: 24 in all, 15 distinct -> distinct-1 = 0.625. Bigrams: A 9 (7 distinct), B 8 (new),
D 4 (only "is parked" new) -> 16 / 21 = 0.7619.
Five-grams: val A 6, B 5, all different, each in 1 of 2 captions (share 0.5 > 0.3: 11
frequent); train D 1 ("the small vehicle is parked", share 1.0).
Claims (the tiles are a flat grey 100): A's phrase is a small vehicle ("small vehicle", agrees)
said to be "red" (its pixels are grey: disagrees); B's "a few ships" (category agrees, vague
count of 3 agrees); D's "small vehicle" (agrees): 5 checked, 1 failed, in record A.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import BadRecordError, EmptyInputError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import Params, QAParams
from pipeline.core.shards import read_records, write_json, write_records
from pipeline.formats.html_report import PALETTE, caption_html, render_overlay
from pipeline.geometry import masks
from pipeline.geometry.claims import CLAIMS_FILE, CLAIMS_SCHEMA
from pipeline.stages.qa import GEOPIXELD_REFERENCE, PLOT_COLUMNS, PhraseFacts, run_qa
from schemas import (
    RLE,
    DroppedRecord,
    GroundedRecord,
    ObjectInstance,
    Phrase,
    Provenance,
    Response,
    Tile,
    Usage,
    Window,
)

SIZE = 64
VAL, TRAIN = "val-00000-of-00001.parquet", "train-00000-of-00001.parquet"
CAPTION_A = "A red car. The <p> small vehicle-1 </p> [SEG] is a red car."
CAPTION_B = "Ships wait. <p> a few ships </p> [SEG] are moored! Calm water?"
CAPTION_D = "The <p> small vehicle-1 </p> [SEG] is parked."


def box(y0: int, y1: int, x0: int, x1: int) -> RLE:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return masks.encode(mask)


def obj(object_id: int, category: str, rle: RLE) -> ObjectInstance:
    return ObjectInstance(object_id=object_id, category=category, bbox=masks.bbox(rle),
                          area=masks.area(rle), mask=rle)


def tile(tile_id: str, split: str, objects: list[ObjectInstance]) -> Tile:
    png = encode_png(np.full((SIZE, SIZE, 3), 100, np.uint8))
    return Tile(tile_id=tile_id, source="isaid", split=split, image_name=tile_id,
                window=Window(y0=0, y1=SIZE, x0=0, x1=SIZE), height=SIZE, width=SIZE,
                image_png=png, image_sha256=sha256(png), objects=objects)


def record(tile_id: str, split: str, caption: str, phrases: list[Phrase], backend: str,
           review: str) -> GroundedRecord:
    return GroundedRecord(
        record_id=tile_id, tile_id=tile_id, split=split, caption=caption, phrases=phrases,
        provenance=Provenance(backend=backend, model=f"{backend}-model", prompt_versions=["v1"],
                              params_hash="0" * 16, pipeline_version="0.1.0"),
        review=review)


def response(tile_id: str, kind: str, n: int, status: str = "ok", cached: bool = False) -> Response:
    return Response(request_id=f"{tile_id}-{kind}-{n}", tile_id=tile_id, kind=kind,
                    status=status, text="x", backend="template", model="m",
                    prompt_version="v1", usage=Usage(prompt_tokens=100, completion_tokens=20),
                    cost_usd=0.001, cached=cached)


@pytest.fixture()
def build(tmp_path: Path) -> Path:
    """tiles/, records/ (+ dropped/, report.json), responses/<kind>/, reviewed/report.json."""
    car, plane = box(0, 8, 0, 8), box(40, 60, 40, 60)
    ships = [box(0, 4, 0, 4), box(10, 14, 10, 14), box(20, 24, 20, 24)]
    parked = box(16, 32, 16, 32)
    write_records(tmp_path / "tiles" / VAL, [
        tile("A", "val", [obj(1001, "Small_Vehicle", car), obj(1002, "plane", plane)]),
        tile("B", "val", [obj(2001 + i, "ship", s) for i, s in enumerate(ships)]),
        tile("C", "val", [obj(3001, "Small_Vehicle", car)]),
    ], Tile)
    write_records(tmp_path / "tiles" / TRAIN,
                  [tile("D", "train", [obj(4001, "Small_Vehicle", parked)])], Tile)
    records = tmp_path / "records"
    write_records(records / VAL, [
        record("A", "val", CAPTION_A, [Phrase(text="small vehicle-1", kind="instance",
                                              category="Small_Vehicle", object_ids=[1001],
                                              mask=car)], "template", "accepted"),
        record("B", "val", CAPTION_B, [Phrase(text="a few ships", kind="cluster", category="ship",
                                              object_ids=[2001, 2002, 2003],
                                              mask=masks.union(ships))], "template", "edited"),
    ], GroundedRecord)
    write_records(records / TRAIN, [
        record("D", "train", CAPTION_D, [Phrase(text="small vehicle-1", kind="instance",
                                               category="Small_Vehicle", object_ids=[4001],
                                               mask=parked)], "openai", "unreviewed"),
    ], GroundedRecord)
    write_records(records / "dropped" / VAL, [DroppedRecord(
        tile_id="C", split="val", stage="compose", reason="caption_too_short")], DroppedRecord)
    write_records(records / "dropped" / TRAIN, [], DroppedRecord)
    write_json(records / "report.json",
               {"stage": "compose", "phrases_skipped": {"refused_text": 2}})

    responses = tmp_path / "responses"
    write_records(responses / "holistic" / VAL, [
        response("A", "holistic", 0), response("B", "holistic", 0),
        response("C", "holistic", 0, status="failed")], Response)
    write_records(responses / "instance" / VAL, [
        response("A", "instance", 0), response("A", "instance", 1, cached=True)], Response)
    write_records(responses / "cluster" / VAL, [response("B", "cluster", 0)], Response)
    write_records(responses / "holistic" / TRAIN, [response("D", "holistic", 0)], Response)
    write_records(responses / "instance" / TRAIN, [response("D", "instance", 0)], Response)
    write_records(responses / "cluster" / TRAIN, [], Response)
    write_json(responses / "instance" / "report.json", {"backend_stats": {
        "cleaning_refusals": {"too_short": 2}, "cleaning_fixes": {"mark_number": 1},
        "retries": {"429": 3}, "http_attempts": 10, "cache_hits": 1}})
    write_json(responses / "cluster" / "report.json", {"backend_stats": {
        "cleaning_refusals": {"too_short": 1}, "http_attempts": 2}})
    write_json(responses / "holistic" / "report.json", {"backend_stats": {}})
    write_json(tmp_path / "reviewed" / "report.json", {
        "stage": "review", "reviewed": 3, "accepted": 1, "rejected": 1, "edited": 1,
        "stale": 0, "edit_distance": {"mean": 12.5, "total": 25}, "decisions": "d.jsonl"})
    return tmp_path


def qa_params(**qa) -> Params:
    return Params(qa=QAParams(caption_bin_chars=20, tiles_per_page=2, **qa))


def run(build: Path, params: Params | None = None, **inputs) -> dict:
    """run_qa over `build` (all optional inputs unless overridden); returns qa.json."""
    given = {"tiles_dir": build / "tiles", "responses_dir": build / "responses",
             "review_dir": build / "reviewed"} | inputs
    run_qa(params or qa_params(), build / "records", build / "metrics" / "qa.json",
           build / "plots", build / "report", **given)
    return json.loads((build / "metrics" / "qa.json").read_text())


def test_metrics_known_answers(build):
    m = run(build)
    assert m["records"] == 3 and m["tiles"] == 4
    assert m["dropped"] == {"total": 1, "rate": 0.25, "by_reason": {"caption_too_short": 1},
                            "phrases_skipped": {"refused_text": 2}}
    assert m["caption"]["chars"] == {"mean": 55.3333, "median": 59.0, "p95": 61.7,
                                     "min": 45.0, "max": 62.0}
    assert m["caption"]["plain_chars"]["mean"] == 40.3333
    assert m["caption"]["words"] == {"mean": 8.0, "median": 9.0, "p95": 9.9, "min": 5.0,
                                     "max": 10.0}
    assert m["caption"]["sentences"] == {"mean": 2.0, "median": 2.0, "p95": 2.9, "min": 1.0,
                                         "max": 3.0}
    assert {k: m["vocabulary"][k] for k in ("size", "distinct_1", "distinct_2")} == {
        "size": 15, "distinct_1": 0.625, "distinct_2": 0.7619}
    assert m["categories"] == {"grounded": 2, "present": 3, "coverage": 0.6667}
    assert m["phrases"] == {
        "total": 3, "per_record_mean": 1.0, "instance": 2, "cluster": 1, "instance_share": 0.6667,
        "objects_per_phrase_mean": 1.6667, "objects_per_cluster_phrase_mean": 3.0,
        "seg_per_phrase": 1.0,
        "mask_area_share_mean": round((64 + 48 + 256) / 4096 / 3, 4)}
    assert m["objects"] == {"grounded": 5, "grounded_per_record_mean": 1.6667,
                            "in_record_tiles": 6, "grounded_share": 0.8333}
    assert m["backends"] == {"openai": 0.3333, "template": 0.6667}


def test_calls_tokens_cost_cleaning_and_review(build):
    m = run(build)
    a = m["annotate"]
    assert a["calls"] == {"holistic": 4, "instance": 3, "cluster": 1, "total": 8}
    assert a["calls_per_tile"]["total"] == 2.0
    # only the record tiles' calls: A 1+2, B 1+1, D 1+1
    assert a["calls_per_record"] == {"holistic": 1.0, "instance": 1.0, "cluster": 0.3333,
                                     "total": 2.3333}
    assert (a["failed_calls"], a["cached_calls"]) == (1, 1)
    assert a["tokens"] == {"prompt": 800, "completion": 160, "total": 960}
    assert a["tokens_per_record"]["total"] == 320.0  # all tokens, the dropped tile's included
    assert a["cost_usd"] == 0.008 and a["cost_usd_per_record"] == 0.002667
    c = m["cleaning"]
    assert c["refusals"] == {"too_short": 3} and c["refusals_total"] == 3
    assert c["fixes_total"] == 1 and c["retries"] == {"429": 3} and c["http_attempts"] == 12
    r = m["review"]
    assert r["exported"] == {"unreviewed": 1, "accepted": 1, "edited": 1}
    assert (r["reviewed"], r["accepted"], r["rejected"], r["edited"]) == (3, 1, 1, 1)
    assert r["edit_distance"] == {"mean": 12.5, "total": 25}
    assert "decisions" not in r and "stage" not in r


def test_by_split_mirrors_the_geopixeld_reference(build):
    m = run(build)
    assert m["by_split"]["val"] == {
        "records": 2, "phrases": 2, "instance_phrases": 1, "cluster_phrases": 1, "objects": 4,
        "caption_chars_mean": 60.5, "phrases_per_record": 1.0, "instance_share": 0.5,
        "objects_per_record": 2.0, "plain_caption_chars_mean": 45.5,
        "fivegrams_top": {"a few ships are moored": 0.5, "a red car the small": 0.5,
                          "car the small vehicle is": 0.5, "few ships are moored calm": 0.5,
                          "red car the small vehicle": 0.5},
        "frequent_fivegrams": 11,
        "calls_per_record": {"holistic": 1.0, "instance": 1.0, "cluster": 0.5, "total": 2.5}}
    assert m["by_split"]["train"]["caption_chars_mean"] == 45.0
    assert m["by_split"]["train"]["plain_caption_chars_mean"] == 30.0
    assert m["by_split"]["train"]["fivegrams_top"] == {"the small vehicle is parked": 1.0}
    assert m["by_split"]["train"]["frequent_fivegrams"] == 1
    # over all three captions: no five-gram is in two of them, so each is in a third
    vocabulary = m["vocabulary"]
    assert set(vocabulary["fivegrams_top"].values()) == {0.3333}
    assert len(vocabulary["fivegrams_top"]) == QAParams().fivegram_top
    assert vocabulary["frequent_fivegrams"] == 11 + 1  # > 30%: all of them
    ref = m["reference"]["geopixeld"]
    assert ref == GEOPIXELD_REFERENCE
    assert ref["train"]["caption_chars_mean"] == 740 and ref["test"]["caption_chars_mean"] == 647
    assert ref["train"]["phrases_per_record"] == 3.2043
    assert ref["train"]["calls_per_record"]["total"] == 4.2
    # every reference figure has an "ours" counterpart under the same key
    assert set(ref["train"]) <= set(m["by_split"]["val"])


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, tree


def test_every_leaf_of_qa_json_is_a_number(build):
    m = run(build)
    bad = [(k, v) for k, v in _leaves(m)
           if isinstance(v, bool) or not isinstance(v, (int, float))]
    assert bad == []
    assert len(list(_leaves(m))) > 80


def test_plot_files_are_well_formed(build):
    run(build)
    rows = {}
    for name, columns in PLOT_COLUMNS.items():
        with (build / "plots" / name).open() as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == columns
            rows[name] = list(reader)
    # captions of 59, 62 and 45 chars in bins of 20, from 0 with no gap
    assert [(int(r["chars"]), int(r["records"])) for r in rows["caption_length.csv"]] == [
        (0, 0), (20, 0), (40, 2), (60, 1)]
    assert rows["phrases_per_category.csv"] == [
        {"category": "Small_Vehicle", "phrases": "2", "instance": "2", "cluster": "0",
         "objects": "2"},
        {"category": "ship", "phrases": "1", "instance": "0", "cluster": "1", "objects": "3"}]
    assert rows["drop_reasons.csv"] == [{"reason": "caption_too_short", "tiles": "1"}]


def test_dvc_reads_the_metrics_and_plots_and_diffs_two_settings(build, venv_env):
    """`dvc metrics diff` between a committed qa.json and a changed one names what changed;
    `dvc plots show` parses every plot file."""
    repo = build / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=venv_env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    run_qa(qa_params(), build / "records", repo / "metrics" / "qa.json", repo / "plots",
           build / "report", tiles_dir=build / "tiles")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "first")
    # a second setting: D dropped too
    write_records(build / "records" / TRAIN, [], GroundedRecord)
    run_qa(qa_params(), build / "records", repo / "metrics" / "qa.json", repo / "plots",
           build / "report", tiles_dir=build / "tiles")
    diff = json.loads(sh("dvc", "metrics", "diff", "--json", "--targets",
                         "metrics/qa.json"))["metrics/qa.json"]
    assert diff["records"] == {"old": 3, "new": 2, "diff": -1}
    assert diff["caption.chars.mean"]["new"] == 60.5
    assert diff["backends.openai"]["old"] == 0.3333
    assert "reference.geopixeld.train.caption_chars_mean" not in diff  # unchanged
    shown = json.loads(sh("dvc", "plots", "show", "--json",
                          *(f"plots/{name}" for name in PLOT_COLUMNS)))["data"]
    for name, columns in PLOT_COLUMNS.items():
        values = shown[f"plots/{name}"][0]["content"]["data"]["values"]
        assert values and set(columns) <= set(values[0])


def test_without_tiles_or_responses_the_report_still_builds(build):
    m = run(build, tiles_dir=None, responses_dir=None, review_dir=None)
    assert "annotate" not in m and "present" not in m["categories"]
    assert m["tiles"] == 4  # records + drops
    assert "calls_per_record" not in m["by_split"]["val"]
    report = build / "report"
    assert sorted(p.name for p in (report / "tiles").iterdir()) == ["A.jpg", "B.jpg", "D.jpg"]
    assert (report / "page-0001.html").is_file() and (report / "page-0002.html").is_file()


def test_report_folder_layout_and_paging(build):
    run(build, params=qa_params(max_tiles=2))
    report = build / "report"
    facts = json.loads((report / "report.json").read_text())
    assert facts == {"stage": "qa", "shards": 2, "records": 3, "dropped": 1, "pages": 1,
                     "tiles_shown": 2, "claims_failed_records": 1}
    # shards in name order (train before val), records in shard order
    assert sorted(p.name for p in (report / "tiles").iterdir()) == ["A.jpg", "D.jpg"]
    index = (report / "data" / "index.js").read_text()
    assert index.startswith("window.QA_INDEX = ")
    data = json.loads(index[len("window.QA_INDEX = "):].rstrip().rstrip(";"))
    assert data["pages"] == ["page-0001.html"]
    assert data["facets"] == {"category": ["Small_Vehicle"], "backend": ["openai", "template"],
                              "model": ["openai-model", "template-model"],
                              "review": ["accepted", "unreviewed"], "split": ["train", "val"],
                              "claims": ["failed", "none failed"]}
    # A (a failed claim) before D, though D's shard comes first
    assert data["tiles"] == [["A", 0, [[0], [1], [1], [0], [1], [0]]],
                             ["D", 0, [[0], [0], [0], [1], [0], [1]]]]
    page = (report / "page-0001.html").read_text()
    assert 'data-tile="A"' in page and 'data-tile="B"' not in page
    assert {p.name for p in (report / "assets").iterdir()} == {"report.js", "report.css"}
    assert "caption_too_short" in (report / "drops.html").read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network


def test_overlay_fills_each_phrase_in_its_colour_small_on_top():
    grey = 100
    picture = np.full((SIZE, SIZE, 3), grey, np.uint8)
    big = Phrase(text="a few ships", kind="cluster", category="ship", object_ids=[1, 2],
                 mask=box(0, 48, 0, 48))
    small = Phrase(text="ship-1", kind="instance", category="ship", object_ids=[3],
                   mask=box(8, 24, 8, 24))
    params = QAParams(mask_alpha=0.5, contour_thickness=0, jpeg_quality=100, thumbnail_size=SIZE)
    # the small phrase comes first (colour 0) but is drawn last, over the big one (colour 1)
    jpeg, size = render_overlay(picture, [small, big], params)
    assert size == (SIZE, SIZE)
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB).astype(float)
    blend = lambda c: 0.5 * np.array(c) + 0.5 * grey  # noqa: E731
    assert np.abs(rgb[12:20, 12:20].mean((0, 1)) - blend(PALETTE[0])).max() < 6
    assert np.abs(rgb[30:44, 30:44].mean((0, 1)) - blend(PALETTE[1])).max() < 6
    assert np.abs(rgb[52:, 52:].mean((0, 1)) - grey).max() < 3


def test_overlay_thumbnail_keeps_the_aspect_and_refuses_a_mask_of_another_size():
    picture = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    params = QAParams(thumbnail_size=64)
    phrase = Phrase(text="ship-1", kind="instance", category="ship", object_ids=[1],
                    mask=masks.encode(np.ones((SIZE, 2 * SIZE), np.uint8)))
    assert render_overlay(picture, [phrase], params)[1] == (64, 32)
    wrong = phrase.model_copy(update={"mask": box(0, 4, 0, 4)})
    with pytest.raises(BadRecordError, match="64x64 mask on a 64x128 tile"):
        render_overlay(picture, [wrong], params, where="records/x.parquet")


def test_caption_html_colours_phrases_in_order_and_escapes_text():
    phrases = [PhraseFacts(text="car-1", kind="instance", category="Small_Vehicle", objects=1,
                           area_share=0.1),
               PhraseFacts(text="a few cars", kind="cluster", category="Small_Vehicle",
                           objects=2, area_share=0.1)]
    out = caption_html("Cars & vans. The <p> car-1 </p> [SEG] and <p> a few cars </p> [SEG] .",
                       phrases)
    assert out.startswith("Cars &amp; vans. The <mark class=\"phrase\" data-i=\"0\" "
                          "style=\"--c:230,25,75\"")
    assert ">car-1</mark>" in out and ">a few cars</mark>" in out
    assert 'style="--c:60,180,75" title="cluster · small vehicle · 2 objects"' in out
    assert out.count("[SEG]</span>") == 2 and "<p>" not in out


def test_missing_inputs_are_named(build):
    with pytest.raises(EmptyInputError, match="no record shards"):
        run_qa(qa_params(), build / "nothing", build / "m.json", build / "p", build / "r")
    (build / "tiles" / TRAIN).unlink()
    with pytest.raises(EmptyInputError) as err:
        run(build)
    assert err.value.path == str(build / "tiles" / TRAIN)
    assert not (build / "report").exists()  # nothing half-written


def test_a_record_whose_tile_is_missing_is_refused(build):
    tiles = read_records(build / "tiles" / VAL, Tile)
    write_records(build / "tiles" / VAL, tiles[1:], Tile)  # A's tile gone
    with pytest.raises(BadRecordError, match="names tile A"):
        run(build)


def test_claims_block_and_file_known_answers(build):
    m = run(build)
    assert m["claims"] == {
        "checked": 5, "agree": 0.8, "disagree": 1, "records_checked": 3,
        "records_with_failed": 1,
        "position": {"checked": 0, "agree": 0.0, "disagree": 0},
        "count": {"checked": 1, "agree": 1.0, "disagree": 0},
        "category": {"checked": 3, "agree": 1.0, "disagree": 0},
        "colour": {"checked": 1, "agree": 0.0, "disagree": 1},
        "size": {"checked": 0, "agree": 0.0, "disagree": 0}}
    table = pq.read_table(build / "report" / CLAIMS_FILE)
    assert table.schema.equals(CLAIMS_SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"geopixeld.record"] == b"CheckedClaim"
    rows = {(r["record_id"], r["type"]): r for r in table.to_pylist()}
    assert len(rows) == 5
    red = rows[("A", "colour")]
    assert (red["phrase"], red["phrase_text"], red["words"], red["verdict"]) == (
        0, "small vehicle-1", "red", "disagree")
    assert red["expected"].startswith("grey (median RGB 100, 100, 100)")
    assert rows[("B", "count")]["words"] == "a few ships"
    assert {r["verdict"] for k, r in rows.items() if k != ("A", "colour")} == {"agree"}


def test_without_tiles_claims_need_no_pixels(build):
    m = run(build, tiles_dir=None)
    # no pixels: the colour claim is not checked; category and count still are
    assert (m["claims"]["checked"], m["claims"]["colour"]["checked"],
            m["claims"]["records_with_failed"]) == (4, 0, 0)


def _tile_articles(html: str) -> list[tuple[str, list[str]]]:
    """(tile id, failed claims' texts) of each tile article of a report page, in page order."""
    from html.parser import HTMLParser

    class Articles(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self.claim = [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "article":
                self.found.append((attrs["data-tile"], []))
            elif tag == "li" and "claim" in (attrs.get("class") or "").split():
                self.claim = []

        def handle_endtag(self, tag):
            if tag == "li" and self.claim is not None:
                self.found[-1][1].append(" ".join("".join(self.claim).split()))
                self.claim = None

        def handle_data(self, data):
            if self.claim is not None:
                self.claim.append(data)

    parser = Articles()
    parser.feed(html)
    return parser.found


def test_report_lists_records_with_failed_claims_first_with_each_claim(build):
    run(build, params=qa_params())  # two tiles a page: A, then D, then B
    report = build / "report"
    first, second = ((report / f"page-000{i}.html").read_text() for i in (1, 2))
    articles = _tile_articles(first) + _tile_articles(second)
    assert [tile for tile, _ in articles] == ["A", "D", "B"]
    (_, failed), *rest = articles
    assert failed == [("small vehicle-1 colour: \u201cred\u201d \u2014 masks: grey "
                       "(median RGB 100, 100, 100)")]
    assert all(not f for _, f in rest)
    assert 'data-failed-claims="1"' in first and "all 1 claim agree" in first
    index = (report / "index.html").read_text()
    assert 'href="page-0001.html#claims=failed"' in index
    assert "<td>colour</td><td>1</td><td>0</td><td>1</td>" in index


def test_failed_claims_are_escaped_in_the_report(build):
    evil = "<b>evil</b>"
    records = read_records(build / "records" / TRAIN, GroundedRecord)
    phrase = records[0].phrases[0].model_copy(update={"category": evil})
    write_records(build / "records" / TRAIN,
                  [records[0].model_copy(update={"phrases": [phrase]})], GroundedRecord)
    m = run(build, params=qa_params())
    assert m["claims"]["category"] == {"checked": 3, "agree": 0.6667, "disagree": 1}
    page = (build / "report" / "page-0001.html").read_text()
    assert evil not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
