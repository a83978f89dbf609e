"""The review stage: a decisions file with accept / reject / edit / stale / invalid-edit /
unknown entries gives exactly the expected records, drops, report and export.

Records and tiles are made here by hand: 48x64 tiles, one instance phrase (a rectangle) and
one cluster phrase (the union of two blobs) per record, in two shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import BadDecisionsError, BadRecordError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import Params
from pipeline.core.shards import read_records, shard_name, write_records
from pipeline.formats.review_view import caption_html, load_records, overlay, phrase_colour
from pipeline.geometry import masks
from pipeline.stages.export import run_export
from pipeline.stages.review import (
    append_decisions,
    decide,
    edit_distance,
    load_decisions,
    pending,
    rename_phrase,
    review_hash,
    run_review,
)
from schemas import (
    DroppedRecord,
    GroundedRecord,
    ObjectInstance,
    Phrase,
    Provenance,
    ReviewDecision,
    Tile,
    Window,
)

H, W = 48, 64
PROVENANCE = Provenance(backend="template", model="template-v1", prompt_versions=["v1"],
                        params_hash="0123456789abcdef", pipeline_version="0.1.0")
# record name -> shard; A accept, B reject, C edit, D stale, E invalid edit, F no decision,
# G edit then accept of the edited text, H accept then reject (a later line overrides)
SHARDS = {0: "ABCD", 1: "EFGH"}


def make_pair(name: str, seed: int) -> tuple[GroundedRecord, Tile]:
    tile_id = f"P{seed:04d}_0_{H}_0_{W}"
    rng = np.random.default_rng(seed)
    png = encode_png(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    court, car1, car2 = (np.zeros((H, W), np.uint8) for _ in range(3))
    court[2:14, 2 + seed % 5:20 + seed % 5] = 1
    car1[30:34, 40:46] = 1
    car2[38:42, 50:56] = 1
    objects = [ObjectInstance(object_id=oid, category=cat, bbox=masks.bbox(rle),
                              area=masks.area(rle), mask=rle)
               for oid, cat, rle in [(1, "tennis_court", masks.encode(court)),
                                     (2, "Small_Vehicle", masks.encode(car1)),
                                     (3, "Small_Vehicle", masks.encode(car2))]]
    phrases = [Phrase(text="tennis court-1", kind="instance", category="tennis_court",
                      object_ids=[1], mask=objects[0].mask),
               Phrase(text="small vehicles", kind="cluster", category="Small_Vehicle",
                      object_ids=[2, 3], mask=masks.union([objects[1].mask, objects[2].mask]))]
    caption = (f"Scene {name}: the <p> tennis court-1 </p> [SEG] at the top left is green, "
               "and <p> small vehicles </p> [SEG] are parked at the right.")
    tile = Tile(tile_id=tile_id, source="test", split="val", image_name=tile_id[:5],
                window=Window(y0=0, y1=H, x0=0, x1=W), height=H, width=W, image_png=png,
                image_sha256=sha256(png), objects=objects)
    return GroundedRecord(record_id=f"val/{tile_id}", tile_id=tile_id, split="val",
                          caption=caption, phrases=phrases, provenance=PROVENANCE), tile


@pytest.fixture()
def build(tmp_path: Path) -> dict:
    """records/ and tiles/ shards of records A..H, and a decisions file about them."""
    records: dict[str, GroundedRecord] = {}
    for i, letters in SHARDS.items():
        pairs = [make_pair(letter, ord(letter)) for letter in letters]
        name = shard_name("val", i, len(SHARDS))
        write_records(tmp_path / "records" / name, [r for r, _ in pairs], GroundedRecord)
        write_records(tmp_path / "tiles" / name, [t for _, t in pairs], Tile)
        records.update({letter: r for letter, (r, _) in zip(letters, pairs)})
    r = records
    c_caption = r["C"].caption.replace("<p> tennis court-1 </p>", "<p> tennis court </p>") \
        .replace("is green", "is very green")                                  # distance 2 + 5
    g_caption = r["G"].caption + " Quiet scene."                               # distance 13
    g_edit = decide(r["G"], "edit", caption=g_caption, reviewer="bob")
    g_edited = r["G"].model_copy(update={"caption": g_caption})
    older = r["D"].model_copy(update={"caption": r["D"].caption.replace("green", "red")})
    invalid = ReviewDecision(  # the second grounding lost its [SEG]
        record_id=r["E"].record_id, content_sha256=review_hash(r["E"]), decision="edit",
        caption=r["E"].caption.replace("</p> [SEG] are", "</p> are"), reviewer="bob")
    decisions = [
        decide(r["A"], "accept", reviewer="ann"),                                      # line 1
        decide(r["B"], "reject", reviewer="ann", note="caption names the wrong court"),  # 2
        decide(r["C"], "edit", caption=c_caption, reviewer="ann"),                     # 3
        decide(older, "accept", reviewer="ann"),                                       # 4 stale
        invalid,                                                                       # 5
        g_edit,                                                                        # 6
        decide(g_edited, "accept", reviewer="ann"),                                    # 7
        decide(r["H"], "accept", reviewer="ann"),                                      # 8
        decide(r["H"], "reject", reviewer="bob", note="duplicate tile"),               # 9
        ReviewDecision(record_id="val/P9999_0_48_0_64", content_sha256="0" * 64,
                       decision="accept", reviewer="ann"),                             # 10
    ]
    path = append_decisions(tmp_path / "reviews" / "decisions.jsonl", decisions)
    return {"root": tmp_path, "records": r, "decisions": path, "c_caption": c_caption,
            "g_caption": g_caption}


def _params(export_unreviewed: bool) -> Params:
    return Params.model_validate({"review": {"export_unreviewed": export_unreviewed},
                                  "runner": {"local_scheduler": "synchronous"}})


def _out(folder: Path) -> tuple[list[GroundedRecord], list[DroppedRecord]]:
    kept = [r for i in SHARDS for r in read_records(folder / shard_name("val", i, 2), GroundedRecord)]
    dropped = [d for i in SHARDS
               for d in read_records(folder / "dropped" / shard_name("val", i, 2), DroppedRecord)]
    return kept, dropped


def test_decisions_give_exactly_the_expected_records_report_and_export(build, capsys):
    root, r = build["root"], build["records"]
    report = run_review(_params(True), root / "records", build["decisions"], root / "reviewed")

    kept, dropped = _out(root / "reviewed")
    got = {rec.record_id: (rec.review, rec.caption) for rec in kept}
    assert got == {
        r["A"].record_id: ("accepted", r["A"].caption),
        r["C"].record_id: ("edited", build["c_caption"]),
        r["D"].record_id: ("unreviewed", r["D"].caption),
        r["E"].record_id: ("unreviewed", r["E"].caption),
        r["F"].record_id: ("unreviewed", r["F"].caption),
        r["G"].record_id: ("edited", build["g_caption"]),
    }
    edited_c = next(rec for rec in kept if rec.record_id == r["C"].record_id)
    assert [p.text for p in edited_c.phrases] == ["tennis court", "small vehicles"]
    assert edited_c.phrases[0].mask == r["C"].phrases[0].mask
    assert sorted((d.tile_id, d.reason, d.detail) for d in dropped) == [
        (r["B"].tile_id, "rejected_by_reviewer", "ann: caption names the wrong court"),
        (r["H"].tile_id, "rejected_by_reviewer", "bob: duplicate tile")]

    counts = {k: v for k, v in report.items() if k not in ("details", "decisions_file")}
    assert counts == {
        "stage": "review", "shards": 2, "decisions": 10, "records": 8, "records_out": 6,
        "reviewed": 5, "accepted": 1, "edited": 2, "rejected": 2, "applied": 7, "stale": 1,
        "invalid_edit": 1, "unknown": 1, "unreviewed_passed": 3, "unreviewed_held": 0,
        "edit_distance_total": 20, "edit_distance_mean": 10.0, "reviewers": {"ann": 5, "bob": 2}}
    outcome = {d["line"]: d["outcome"] for d in report["details"]}
    assert outcome == {1: "applied", 2: "applied", 3: "applied", 4: "stale", 5: "invalid_edit",
                       6: "applied", 7: "applied", 8: "applied", 9: "applied", 10: "unknown"}
    invalid = report["details"][4]
    assert invalid["record_id"] == r["E"].record_id
    assert invalid["reasons"] == ["seg_not_after_tag", "seg_count_mismatch", "stray_tag"]
    assert json.loads((root / "reviewed" / "report.json").read_text()) == report
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 3 and "decisions.jsonl:5: invalid_edit: edit of" in warnings[1]

    run_export(_params(True), root / "tiles", root / "reviewed", root / "export")
    rows = pq.read_table(root / "export" / "parquet",
                         columns=["record_id", "review", "caption", "phrases"]).to_pylist()
    assert {row["record_id"]: (row["review"], row["caption"]) for row in rows} == got
    coco = json.loads((root / "export" / "coco" / "val.json").read_text())
    assert {c["record_id"]: c["review"] for c in coco["captions"]} == \
        {rid: review for rid, (review, _) in got.items()}
    # What the notebook reads back from the export hashes like what review wrote.
    assert {x.record_id: review_hash(x) for x in load_records(root / "export" / "parquet")} == \
        {x.record_id: review_hash(x) for x in kept}


def test_unreviewed_records_are_held_back_when_asked(build):
    root, r = build["root"], build["records"]
    report = run_review(_params(False), root / "records", build["decisions"], root / "reviewed")
    kept, dropped = _out(root / "reviewed")
    assert sorted(rec.record_id for rec in kept) == sorted(
        r[x].record_id for x in "ACG")
    assert sorted((d.tile_id, d.reason) for d in dropped) == sorted(
        [(r[x].tile_id, "unreviewed") for x in "DEF"]
        + [(r[x].tile_id, "rejected_by_reviewer") for x in "BH"])
    assert (report["unreviewed_passed"], report["unreviewed_held"], report["records_out"]) == \
        (0, 3, 3)


def test_no_decisions_file_passes_every_record_unreviewed(build):
    root = build["root"]
    report = run_review(_params(True), root / "records", root / "absent.jsonl", root / "reviewed")
    kept, dropped = _out(root / "reviewed")
    assert [rec.review for rec in kept] == ["unreviewed"] * 8 and dropped == []
    assert (report["decisions"], report["reviewed"], report["unreviewed_passed"]) == (0, 0, 8)


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2 is not valid JSON"),
    ('{"record_id": "x", "content_sha256": "ab", "decision": "maybe"}', "line 2: decision"),
    ('{"record_id": "x", "content_sha256": "ab", "decision": "edit"}', "line 2: a caption"),
])
def test_malformed_decisions_line_names_file_and_line(build, line, problem):
    path = build["decisions"]
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + line + "\n")
    with pytest.raises(BadDecisionsError) as err:
        run_review(_params(True), build["root"] / "records", path, build["root"] / "reviewed")
    assert err.value.one_line().startswith(f"bad decisions: {path}: {problem}")
    assert not (build["root"] / "reviewed").exists()


def test_bad_edits_are_refused_at_decision_time(build):
    a = build["records"]["A"]
    swapped = a.caption.replace("tennis court-1", "@").replace("small vehicles", "tennis court-1") \
        .replace("@", "small vehicles")
    with pytest.raises(BadRecordError, match="phrase_moved"):
        decide(a, "edit", caption=swapped)
    with pytest.raises(BadRecordError, match="phrase_text_mismatch"):
        decide(a, "edit", caption=a.caption.replace("<p> tennis court-1 </p>",
                                                    "<p>tennis court-1</p>"))
    with pytest.raises(BadRecordError, match=r"1 \[SEG\] and 2 <p> for 2 masks"):
        decide(a, "edit", caption=a.caption.replace("</p> [SEG] at", "</p> at"))
    with pytest.raises(BadRecordError, match="caption goes with 'edit' only"):
        decide(a, "accept", caption=a.caption)


def test_pending_and_append_keep_earlier_lines(build):
    path, r = build["decisions"], build["records"]
    path.write_text(path.read_text().rstrip("\n"))  # a file someone saved without a last newline
    append_decisions(path, [decide(r["F"], "accept", reviewer="cy")])
    decisions = load_decisions(path)
    assert len(decisions) == 11 and decisions[-1].record_id == r["F"].record_id
    # D's decision is stale (another caption): D is still to review, like nothing else here.
    assert [x.record_id for x in pending(r.values(), decisions)] == [r["D"].record_id]


def test_edit_distance_on_known_pairs():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("The ship is white.", "The large ship is white!") == 7
    assert edit_distance("same", "same") == 0


def test_overlay_and_caption_share_phrase_colours(build):
    a = build["records"]["A"]
    tile = make_pair("A", ord("A"))[1]
    image = np.asarray(overlay(a, tile.image_png, opacity=1.0))
    court = masks.decode(a.phrases[0].mask).astype(bool)
    colour = phrase_colour(0).lstrip("#")
    assert (image[court] == [int(colour[i:i + 2], 16) for i in (0, 2, 4)]).all()
    text = caption_html(a)
    assert f"background:{phrase_colour(0)}" in text and f"background:{phrase_colour(1)}" in text
    assert "&lt;p&gt;" not in text and "[SEG]</" not in text and "tennis court-1<sub>0</sub>" in text


def test_rename_phrase_rewords_one_grounding(build):
    a = build["records"]["A"]
    caption = rename_phrase(a, 1, "parked cars")
    assert caption == a.caption.replace("<p> small vehicles </p>", "<p> parked cars </p>")
    assert decide(a, "edit", caption=caption).caption == caption
