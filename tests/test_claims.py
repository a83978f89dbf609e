"""Claims a caption makes about its grounded phrases, checked against the masks
(`pipeline.geometry.claims`).

A hand-made 300x300 tile measured by the real measuring code (`pipeline.geometry.measure`):
  car     object 1, Small_Vehicle, 10x6 px, red, top left cell (centroid 24.5, 22.5)
  ships   objects 11-13, ship, 20x10 px each, white, bottom right cell
  tank    object 20, storage_tank, 80x80 px (2.56 x its typical area: large), light grey, center
  cars    objects 31-34, Small_Vehicle, 10x6 px each, dark grey, in a column in the left cell
on a green-grey ground. The five small vehicles are peers of one size: each is medium-sized.
Captions that say what the tile shows agree claim by claim; one wrong word is flagged alone.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import GEOPIXELD_SAMPLE, ISAID

from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import Params, QAParams
from pipeline.core.shards import list_shards, read_records
from pipeline.geometry import masks
from pipeline.geometry.claims import CLAIM_TYPES, check_record, colour_fits, region_names, size_fits
from pipeline.geometry.measure import measure_tile
from pipeline.geometry.priors import instance_masks
from schemas import RLE, GroundedRecord, ObjectInstance, Phrase, Provenance, TilePlan

SIZE = 300
GROUND = (90, 110, 90)
# object id -> (category, x0, y0, x1, y1, RGB)
OBJECTS = {
    1: ("Small_Vehicle", 20, 20, 30, 26, (200, 30, 30)),
    11: ("ship", 210, 230, 230, 240, (240, 240, 240)),
    12: ("ship", 240, 230, 260, 240, (240, 240, 240)),
    13: ("ship", 270, 230, 290, 240, (240, 240, 240)),
    20: ("storage_tank", 110, 110, 190, 190, (190, 190, 190)),
    31: ("Small_Vehicle", 20, 120, 30, 126, (60, 60, 60)),
    32: ("Small_Vehicle", 20, 140, 30, 146, (60, 60, 60)),
    33: ("Small_Vehicle", 20, 160, 30, 166, (60, 60, 60)),
    34: ("Small_Vehicle", 20, 180, 30, 186, (60, 60, 60)),
}


def _mask(ids) -> RLE:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for i in ids:
        _, x0, y0, x1, y1, _ = OBJECTS[i]
        mask[y0:y1, x0:x1] = 1
    return masks.encode(mask)


@pytest.fixture(scope="module")
def measured():
    image = np.full((SIZE, SIZE, 3), GROUND, np.uint8)
    objects = []
    for i, (category, x0, y0, x1, y1, rgb) in OBJECTS.items():
        image[y0:y1, x0:x1] = rgb
        rle = _mask([i])
        objects.append(ObjectInstance(object_id=i, category=category, bbox=masks.bbox(rle),
                                      area=masks.area(rle), mask=rle))
    png = encode_png(image)
    return measure_tile(image, instance_masks("t", SIZE, SIZE, objects), sha256(png))


PHRASES = {
    "car": ("small vehicle-1", "instance", "Small_Vehicle", [1]),
    "ships": ("three ships", "cluster", "ship", [11, 12, 13]),
    "tank": ("storage tank-1", "instance", "storage_tank", [20]),
    "cars": ("four cars", "cluster", "Small_Vehicle", [31, 32, 33, 34]),
}
CORRECT = ("The red <p> small vehicle-1 </p> [SEG] is parked at the top left of the image. "
           "At the bottom right, <p> three ships </p> [SEG] are moored, all white in colour. "
           "The large <p> storage tank-1 </p> [SEG] in the center is light grey. "
           "On the left side, <p> four cars </p> [SEG] , dark grey, are parked in a row.")


def record(caption: str, *names: str, texts: dict[str, str] | None = None) -> GroundedRecord:
    """A record of `caption` whose phrases are `names` (keys of PHRASES), in caption order."""
    names = names or tuple(PHRASES)
    phrases = []
    for name in names:
        text, kind, category, ids = PHRASES[name]
        phrases.append(Phrase(text=(texts or {}).get(name, text), kind=kind, category=category,
                              object_ids=ids, mask=_mask(ids)))
    return GroundedRecord(record_id="r", tile_id="t", split="val", caption=caption,
                          phrases=phrases,
                          provenance=Provenance(backend="hand", model="hand", prompt_versions=["v"],
                                                params_hash="0" * 16, pipeline_version="0"))


def failed(claims) -> set[tuple[int, str, str]]:
    return {(c.phrase, c.type, c.words) for c in claims if c.verdict == "disagree"}


def test_a_caption_that_says_what_the_masks_show_agrees_on_every_claim(measured):
    claims = check_record(record(CORRECT), measured)
    assert failed(claims) == set()
    found = {(c.phrase, c.type, c.words) for c in claims}
    assert found == {
        (0, "category", "small vehicle"), (0, "colour", "red"),
        (0, "position", "at the top left of the image"),
        (1, "category", "ships"), (1, "count", "three ships"),
        (1, "position", "at the bottom right"), (1, "colour", "white"),
        (2, "category", "storage tank"), (2, "size", "large"), (2, "position", "in the center"),
        (2, "colour", "light grey"),
        (3, "category", "cars"), (3, "count", "four cars"), (3, "position", "on the left side"),
        (3, "colour", "dark grey")}
    # "small vehicle" is a category name, not a size claim
    assert not any(c.type == "size" and c.phrase == 0 for c in claims)


@pytest.mark.parametrize("wrong, right, flagged", [
    ("at the bottom right of the image", "at the top left of the image",
     (0, "position", "at the bottom right of the image")),
    ("On the right side,", "On the left side,", (3, "position", "on the right side")),
    ("five ships", "three ships", (1, "count", "five ships")),
    ("The blue <p>", "The red <p>", (0, "colour", "blue")),
    ("all black in colour", "all white in colour", (1, "colour", "black")),
    ("is dark red", "is light grey", (2, "colour", "dark red")),
    ("The small <p> storage", "The large <p> storage", (2, "size", "small")),
])
def test_one_wrong_word_is_flagged_alone(measured, wrong, right, flagged):
    caption = CORRECT.replace(right, wrong)
    texts = {"ships": "five ships"} if "five" in wrong else None
    assert failed(check_record(record(caption, texts=texts), measured)) == {flagged}


def test_a_wrong_category_word_is_flagged(measured):
    caption = CORRECT.replace("small vehicle-1", "truck-1")
    claims = check_record(record(caption, texts={"car": "truck-1"}), measured)
    assert failed(claims) == {(0, "category", "truck")}
    claim = next(c for c in claims if c.type == "category" and c.phrase == 0)
    assert claim.expected == "small vehicle"
    # synonyms and generic nouns agree; another class does not
    for text, verdict in [("car-1", "agree"), ("vehicle-1", "agree"), ("sedan", "agree"),
                          ("large vehicle-1", "disagree"), ("boat", "disagree")]:
        r = record(CORRECT.replace("small vehicle-1", text), texts={"car": text})
        got = [c.verdict for c in check_record(r, measured) if c.type == "category"
               and c.phrase == 0]
        assert got == [verdict], text


def test_size_words_against_the_category_size(measured):
    def size_verdicts(word: str) -> list[str]:
        caption = f"The {word} <p> small vehicle-1 </p> [SEG] is red."
        return [c.verdict for c in check_record(record(caption, "car"), measured)
                if c.type == "size"]

    # five equal small vehicles: each is medium-sized against the tile's median
    assert size_verdicts("medium-sized") == ["agree"]
    assert size_verdicts("huge") == ["disagree"]
    assert size_verdicts("tiny") == ["disagree"]
    assert size_verdicts("compact") == ["disagree"]
    # against the typical area (one tank): 2.56 x, large
    caption = "A <p> storage tank-1 </p> [SEG] , big and light grey, sits in the center."
    sizes = [c for c in check_record(record(caption, "tank"), measured) if c.type == "size"]
    assert [(c.words, c.verdict) for c in sizes] == [("big", "agree")]
    assert sizes[0].expected == "large (2.56 x the typical area)"
    assert size_fits("large", 1.3, 0.67, 1.5, 1.25) and not size_fits("large", 1.1, 0.67, 1.5, 1.25)


def test_words_that_are_no_claims_are_not_flagged(measured):
    caption = ("The <p> small vehicle-1 </p> [SEG] , left unused near a large building with a "
               "yellow roof on the right, is oriented diagonally from bottom left to top right "
               "next to two other cars, to the left of the road beside blue water, at right "
               "angles to a large number of small vehicles.")
    claims = check_record(record(caption, "car"), measured)
    assert [(c.type, c.words) for c in claims] == [("category", "small vehicle")]


def test_more_no_claims_approximate_counts_other_sets_and_orientation(measured):
    caption = ("The <p> storage tank-1 </p> [SEG] , one of the five storage tanks and one of "
               "several tanks, faces the top of the image, about two cars away from some "
               "twenty small vehicles.")
    claims = check_record(record(caption, "tank"), measured)
    assert [(c.type, c.words) for c in claims] == [("category", "storage tank")]


def test_wordings_of_the_template_and_of_models(measured):
    caption = ("Right of the midline, <p> three ships </p> [SEG] , two of them moored, are a mix "
               "of white and shades of grey. Left of the midline, <p> four cars </p> [SEG] , "
               "four of them, are in dark grey.")
    claims = check_record(record(caption, "ships", "cars"), measured)
    found = {(c.phrase, c.type, c.words): c.verdict for c in claims}
    assert found[(0, "position", "right of the midline")] == "agree"
    assert found[(1, "position", "left of the midline")] == "agree"
    assert found[(1, "count", "four of them")] == "agree"
    assert (0, "count", "two of them") not in found  # a part of the group, not its count
    assert found[(0, "colour", "white and shades of grey")] == "disagree"  # no member is grey
    assert found[(1, "colour", "dark grey")] == "agree"
    across = ("Across the right part, <p> three ships </p> [SEG] , three strong, are white; a "
              "net is stretched across the center.")
    found = {(c.type, c.words): c.verdict
             for c in check_record(record(across, "ships"), measured) if c.type != "category"}
    assert found == {("count", "three ships"): "agree", ("count", "three strong"): "agree",
                     ("position", "across the right part"): "agree", ("colour", "white"): "agree"}
    wrong = caption.replace("Left of the midline", "Right of the midline")
    assert failed(check_record(record(wrong, "ships", "cars"), measured)) == {
        (0, "colour", "white and shades of grey"), (1, "position", "right of the midline")}


def test_coordinated_phrases_share_their_clause_and_each_is_checked(measured):
    caption = ("The <p> small vehicle-1 </p> [SEG] and <p> storage tank-1 </p> [SEG] at the "
               "top left are parked.")
    claims = check_record(record(caption, "car", "tank"), measured)
    positions = {c.phrase: c.verdict for c in claims if c.type == "position"}
    assert positions == {0: "agree", 1: "disagree"}


def test_two_clauses_of_one_sentence_keep_their_own_words(measured):
    caption = ("The red <p> small vehicle-1 </p> [SEG] sits at the top left, while the white "
               "<p> three ships </p> [SEG] wait at the bottom right.")
    claims = check_record(record(caption, "car", "ships"), measured)
    assert failed(claims) == set()
    assert {(c.phrase, c.words) for c in claims if c.type in ("colour", "position")} == {
        (0, "red"), (0, "at the top left"), (1, "white"), (1, "at the bottom right")}


def test_group_region_words_name_the_planners_regions():
    assert region_names(["left"]) == {"left", "left side"}
    assert region_names(["upper", "left", "corner"]) == {"top left"}
    assert region_names(["top", "half"]) == {"top", "top half"}
    assert region_names(["centre"]) == {"center"}
    assert region_names(["center", "left"]) == {"left"}


def test_colour_tolerance():
    tol = QAParams().claim_colour_delta_e
    assert colour_fits("grey", (60, 60, 60), tol)          # 'grey' fits 'dark grey'
    assert colour_fits("black", (60, 60, 60), tol)         # a neighbouring grey, within delta E
    assert not colour_fits("white", (128, 128, 128), tol)
    assert colour_fits("light grey", (215, 215, 215), tol)  # silver / light grey / white
    assert not colour_fits("red", (60, 60, 60), tol)
    assert colour_fits("yellow", (200, 170, 60), tol)      # a school bus's median colour
    assert not colour_fits("blue", (200, 170, 60), tol)


def test_groups_agree_by_share_and_lists_need_each_colour(measured):
    def colour(words: str) -> str:
        caption = f"On the left side, <p> four cars </p> [SEG] are {words}."
        return next(c.verdict for c in check_record(record(caption, "cars"), measured)
                    if c.type == "colour")

    assert colour("mostly dark grey") == "agree"
    assert colour("dark grey and black") == "agree"
    assert colour("dark grey and red") == "disagree"  # no member is red
    assert colour("red") == "disagree"


def test_without_measurements_category_count_and_instance_positions_are_checked():
    claims = check_record(record(CORRECT), None)
    assert {c.type for c in claims} == {"category", "count", "position"}
    assert {c.phrase for c in claims if c.type == "position"} == {0, 2}  # single instances
    assert failed(claims) == set()
    wrong = CORRECT.replace("at the top left of", "at the bottom of")
    assert failed(check_record(record(wrong), None)) == {
        (0, "position", "at the bottom of the image")}


def test_the_released_geopixeld_sample_agrees():
    """GeoPixelD's own caption ("tennis court-1 at right", three courts "situated at the bottom
    right of the image") against its polygons, no pixels."""
    data = json.loads((GEOPIXELD_SAMPLE / "train" / "P0224_0_800_0_800.json").read_text())
    caption = data["gcg_description"]
    texts = re.findall(r"<p> (.*?) </p>", caption)
    phrases = [Phrase(text=t, kind="instance", category="tennis_court", object_ids=[i],
                      mask=masks.encode(masks.from_polygons(polys, 800, 800)))
               for i, (t, polys) in enumerate(zip(texts, data["polygons"], strict=True))]
    r = GroundedRecord(record_id="g", tile_id="g", split="train", caption=caption,
                       phrases=phrases, provenance=record(CORRECT).provenance)
    claims = check_record(r, None)
    assert failed(claims) == set()
    assert Counter(c.type for c in claims) == {"category": 4, "position": 4}
    # "a net stretched across the center" is about the court's net: no claim
    assert not any("center" in c.words for c in claims)


# ---------------------------------------------------------------------------------------------
# The template backend's own captions on the bundled samples


@pytest.fixture(scope="module")
def template_build(tmp_path_factory) -> Path:
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.compose.stage import run_compose
    from pipeline.stages.plan import run_plan
    from pipeline.stages.prepare import run_prepare

    out = tmp_path_factory.mktemp("claims-build")
    params = Params.model_validate({"data": {"root": str(ISAID)},
                                    "annotate": {"cache": {"enabled": False}}})
    run_prepare(params, out / "tiles")
    run_plan(params, out / "tiles", out / "plan")
    for kind in ("holistic", "instance", "cluster"):
        run_annotate(params, kind, out / "tiles", out / "plan", out / "responses" / kind)
    run_compose(params, out / "tiles", out / "plan", out / "responses", out / "records")
    return out


def test_the_template_backends_captions_agree_with_their_masks(template_build):
    plans = {p.tile_id: p for path in list_shards(template_build / "plan" / "tiles")
             for p in read_records(path, TilePlan)}
    records = [r for path in list_shards(template_build / "records")
               for r in read_records(path, GroundedRecord)]
    assert len(records) >= 10
    claims = [c for r in records for c in check_record(r, plans[r.tile_id].measurements)]
    by_type = {t: [c for c in claims if c.type == t] for t in CLAIM_TYPES}
    disagree = [c for c in claims if c.verdict == "disagree"]
    for kind in ("position", "count", "category"):
        checked = by_type[kind]
        assert len(checked) >= 20, kind
        agree = sum(c.verdict == "agree" for c in checked) / len(checked)
        assert agree >= 0.99, (kind, [c for c in disagree if c.type == kind])
    # every phrase's category is claimed; the colours and sizes are the template's own
    # measured words (a miss here is a wording the checker reads wrongly: look at it)
    assert len(by_type["category"]) == sum(len(r.phrases) for r in records)
    for kind in ("colour", "size"):
        checked = by_type[kind]
        assert checked and sum(c.verdict == "agree" for c in checked) / len(checked) >= 0.95, (
            kind, [c for c in disagree if c.type == kind])


def test_stored_claims_read_back_and_another_file_is_refused(tmp_path):
    from pipeline.core.errors import BadShardError
    from pipeline.core.shards import write_records
    from pipeline.geometry.claims import Claim, RecordClaims, claim_rows, read_claims, write_claims
    from schemas import DroppedRecord

    wrong = Claim(phrase=1, type="count", words="three", expected="2", verdict="disagree")
    right = Claim(phrase=0, type="colour", words="white", expected="white", verdict="agree")
    rows = claim_rows(RecordClaims(record_id="r1", tile_id="t1", split="val",
                                   phrase_texts=("a ship", "ships"), claims=(right, wrong)))
    assert [r.phrase_text for r in rows] == ["a ship", "ships"]
    write_claims(tmp_path / "claims.parquet", rows)
    assert read_claims(tmp_path / "claims.parquet") == {"r1": [right, wrong]}
    write_records(tmp_path / "other.parquet", [DroppedRecord(
        tile_id="t", split="val", stage="compose", reason="x")], DroppedRecord)
    with pytest.raises(BadShardError, match="holds DroppedRecord records"):
        read_claims(tmp_path / "other.parquet")


def test_qa_checks_claims_against_the_measurements_plan_stored(template_build, tmp_path):
    """The qa stage reads each tile's measurements from its plan (not measuring it again): a
    plan whose colour of one instance is changed to pure red turns that instance's colour claim
    into a failed one."""
    from pipeline.core.shards import write_records
    from pipeline.geometry.claims import CLAIMS_FILE, read_claims
    from pipeline.stages.qa import run_qa

    params = Params.model_validate({"data": {"root": str(ISAID)}})
    plan = tmp_path / "plan"
    shutil.copytree(template_build / "plan", plan)

    def qa(name: str) -> dict:
        out = tmp_path / name
        run_qa(params, template_build / "records", out / "qa.json", out / "plots",
               out / "report", tiles_dir=template_build / "tiles", plan_dir=plan)
        return read_claims(out / "report" / CLAIMS_FILE)

    before = qa("before")
    records = {r.record_id: r for path in list_shards(template_build / "records")
               for r in read_records(path, GroundedRecord)}
    record_id, claim = next((rid, c) for rid, claims in before.items() for c in claims
                            if c.type == "colour" and c.verdict == "agree"
                            and records[rid].phrases[c.phrase].kind == "instance")
    record = records[record_id]
    (object_id,) = record.phrases[claim.phrase].object_ids
    shard = next(p for p in list_shards(plan / "tiles")
                 if any(t.tile_id == record.tile_id for t in read_records(p, TilePlan)))
    plans = read_records(shard, TilePlan)
    changed = []
    for p in plans:
        if p.tile_id == record.tile_id:
            objects = [o.model_copy(update={"rgb": [255, 0, 0]}) if o.object_id == object_id
                       else o for o in p.measurements.objects]
            p = p.model_copy(update={"measurements": p.measurements.model_copy(
                update={"objects": objects})})
        changed.append(p)
    write_records(shard, changed, TilePlan)

    after = qa("after")
    flipped = [c for c in after[record_id] if c.phrase == claim.phrase and c.type == "colour"]
    assert [c.verdict for c in flipped] == ["disagree"]
    assert "255, 0, 0" in flipped[0].expected
    others = {k: v for k, v in after.items() if k != record_id}
    assert others == {k: v for k, v in before.items() if k != record_id}
