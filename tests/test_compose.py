"""Compose: the deterministic composer, [SEG] <-> mask alignment, drops, and the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import BadRecordError, EmptyInputError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import ComposeParams, Params
from pipeline.core.shards import read_records, shard_name, write_records
from pipeline.core.validate import validate_record
from pipeline.geometry import masks
from pipeline.stages.compose.grounding import tile_provenance
from pipeline.stages.compose.stage import compose_tile, run_compose
from pipeline.stages.compose.wording import compose
from schemas import (
    Cluster,
    DroppedRecord,
    GroundedRecord,
    Mark,
    ObjectInstance,
    Provenance,
    Request,
    Response,
    Tile,
    TilePlan,
    Window,
)

SIZE = 64
PROVENANCE = Provenance(backend="template", model="template-v1", prompt_versions=["v1"],
                        params_hash="0" * 16, pipeline_version="test")

# A GeoPixelD-like scene: one tennis court at the right, three alike at the bottom right, and a
# cluster of small vehicles at the left side. (object id, category, rows, columns, position)
SCENE = [
    (1001, "tennis_court", (20, 30), (50, 62), "right"),
    (1002, "tennis_court", (50, 60), (40, 46), "bottom right"),
    (1003, "tennis_court", (50, 60), (48, 54), "bottom right"),
    (1004, "tennis_court", (50, 60), (56, 62), "bottom right"),
    (1005, "Small_Vehicle", (10, 14), (2, 6), "left"),
    (1006, "Small_Vehicle", (20, 24), (2, 6), "left"),
    (1007, "Small_Vehicle", (30, 34), (3, 7), "left"),
]
HOLISTIC = "The image is an aerial view of a tennis court complex.\nThe courts are empty."
TEXTS = {
    1001: "The tennis court at the right is a standard hard court with white boundary lines.",
    1002: "The tennis court features the standard dimensions and markings.",
    1003: "The tennis court features the standard dimensions and markings.",
    1004: "The tennis court features the standard dimensions and markings.",
    "c1": "A few small vehicles are parked along the left edge.",
}
# The composer words positions several ways, chosen per tile (compose.seed, tile id): this is
# the wording compose.seed 0 gives this tile.
GOLDEN = (
    "The image is an aerial view of a tennis court complex. The courts are empty. "
    "The <p> tennis court-1 </p> [SEG] toward the right is a standard hard court with white "
    "boundary lines. "
    "Toward the bottom right, the <p> tennis court-2 </p> [SEG] , <p> tennis court-3 </p> "
    "[SEG] , and <p> tennis court-4 </p> [SEG] feature the standard dimensions and markings. "
    "On the left flank, <p> a few small vehicles </p> [SEG] are parked along the left edge.")


def rect(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return m


def make_tile(tile_id: str = "P0001_0_64_0_64", split: str = "train") -> Tile:
    png = encode_png(np.zeros((SIZE, SIZE, 3), np.uint8))
    objects = []
    for oid, cat, rows, cols, _ in SCENE:
        mask = masks.encode(rect(rows, cols))
        objects.append(ObjectInstance(object_id=oid, category=cat, bbox=masks.bbox(mask),
                                      area=masks.area(mask), mask=mask))
    return Tile(tile_id=tile_id, source="test", split=split, image_name=tile_id.split("_")[0],
                window=Window(y0=0, y1=SIZE, x0=0, x1=SIZE), height=SIZE, width=SIZE,
                image_png=png, image_sha256=sha256(png), objects=objects)


def make_plan(tile: Tile) -> TilePlan:
    marks = [Mark(object_id=oid, number=n, x=0, y=0, box=[0, 0, 1, 1])
             for n, (oid, *_) in enumerate(SCENE[:4], start=1)]
    cluster = Cluster(cluster_id="c1", category="Small_Vehicle", grid="1x2", region="left side",
                      cluster_info="a few", object_ids=[1005, 1006, 1007])
    return TilePlan(tile_id=tile.tile_id, split=tile.split, positions=[s[4] for s in SCENE],
                    marks=marks, clusters=[cluster], unplanned_object_ids=[])


def make_requests(tile: Tile) -> list[Request]:
    common = dict(tile_id=tile.tile_id, prompt="...", prompt_version="v1",
                  image_sha256=tile.image_sha256)
    reqs = [Request(request_id=f"{tile.tile_id}/holistic", kind="holistic", object_ids=[],
                    **common)]
    for n, (oid, cat, _, _, pos) in enumerate(SCENE[:4], start=1):
        reqs.append(Request(request_id=f"{tile.tile_id}/instance/{n:02d}", kind="instance",
                            object_ids=[oid], category=cat, position=pos, mark_number=n,
                            **common))
    reqs.append(Request(request_id=f"{tile.tile_id}/cluster/c1", kind="cluster",
                        object_ids=[1005, 1006, 1007], category="Small_Vehicle",
                        position="left side", cluster_id="c1", **common))
    return reqs


def answer(req: Request, text: str | None = None, status: str = "ok",
           backend: str = "template") -> Response:
    key = req.object_ids[0] if req.kind == "instance" else req.cluster_id
    if text is None:
        text = HOLISTIC if req.kind == "holistic" else TEXTS[key]
    return Response(request_id=req.request_id, tile_id=req.tile_id, kind=req.kind,
                    status=status, text=text if status == "ok" else "",
                    error=None if status == "ok" else "HTTP 500", backend=backend,
                    model=f"{backend}-model", prompt_version=req.prompt_version)


def scene(**overrides: tuple[str | None, str]):
    """Tile, plan, requests and responses; overrides: request suffix -> (text, status)."""
    tile = make_tile()
    reqs = make_requests(tile)
    resps = []
    for r in reqs:
        suffix = r.request_id.split("/", 1)[1].replace("/", "_")
        text, status = overrides.get(suffix, (None, "ok"))
        resps.append(answer(r, text, status))
    return tile, make_plan(tile), reqs, resps


def test_golden_caption_in_geopixeld_style():
    tile, plan, reqs, resps = scene()
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert isinstance(record, GroundedRecord)
    assert record.caption == GOLDEN
    assert [p.text for p in record.phrases] == [
        "tennis court-1", "tennis court-2", "tennis court-3", "tennis court-4",
        "a few small vehicles"]
    assert [p.kind for p in record.phrases] == ["instance"] * 4 + ["cluster"]
    assert record.record_id == tile.tile_id and record.provenance == PROVENANCE
    assert validate_record(record, ComposeParams(), (SIZE, SIZE)) == []


def test_ith_seg_owns_ith_mask_and_cluster_mask_is_union_of_members():
    tile, plan, reqs, resps = scene()
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    shapes = {oid: rect(rows, cols) for oid, _, rows, cols, _ in SCENE}
    assert record.caption.count("[SEG]") == len(record.phrases) == 5
    for phrase, expected_ids in zip(record.phrases, [[1001], [1002], [1003], [1004],
                                                      [1005, 1006, 1007]]):
        assert phrase.object_ids == expected_ids
        expected = np.zeros((SIZE, SIZE), np.uint8)
        for oid in expected_ids:
            expected |= shapes[oid]
        assert np.array_equal(masks.decode(phrase.mask), expected)
    # The text between the i-th tags is the i-th phrase.
    inner = [part.split(" </p>")[0] for part in record.caption.split("<p> ")[1:]]
    assert inner == [p.text for p in record.phrases]


def test_grouping_needs_same_description_and_can_be_turned_off():
    tile, plan, reqs, resps = scene(**{"instance_03": (
        "The tennis court has a green surface.", "ok")})
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert ("Toward the bottom right, the <p> tennis court-2 </p> [SEG] and <p> tennis court-3 "
            "</p> [SEG] feature the standard dimensions and markings. "
            "The <p> tennis court-4 </p> [SEG] at the bottom right has a green surface."
            ) in record.caption
    assert [p.object_ids for p in record.phrases][:4] == [[1001], [1002], [1004], [1003]]

    tile, plan, reqs, resps = scene()
    apart = compose_tile(tile, plan, reqs, resps, ComposeParams(group_instances=False),
                         PROVENANCE)
    assert " , " not in apart.caption
    assert ("The <p> tennis court-3 </p> [SEG] at the bottom right features the standard "
            "dimensions and markings.") in apart.caption
    assert apart.caption.count("[SEG]") == 5


def test_only_identical_descriptions_share_a_sentence():
    """Alike is not enough: a sentence given to several phrases must be true of each."""
    for variant in ("The tennis court features the standard dimensions and Markings.",
                    "The tennis court features the standard dimensions and markings!",
                    "The tennis court features  the standard dimensions, and markings."):
        tile, plan, reqs, resps = scene(instance_03=(variant, "ok"))
        record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
        shared = next(s for s in record.caption.split(". ") if "tennis court-2" in s)
        assert "tennis court-3" in shared and "tennis court-4" not in shared, record.caption
    tile, plan, reqs, resps = scene(instance_02=("The tennis court is dark grey.", "ok"),
                                    instance_03=("The tennis court is dark blue.", "ok"),
                                    instance_04=("The tennis court is dark grey.", "ok"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    sentences = [s for s in record.caption.split(". ") if "tennis court-" in s]
    grey = next(s for s in sentences if "dark grey" in s)
    blue = next(s for s in sentences if "dark blue" in s)
    assert grey.count("[SEG]") == 2 and blue.count("[SEG]") == 1, record.caption
    assert [p.object_ids for p in record.phrases][1:4] == [[1002], [1004], [1003]]


@pytest.mark.parametrize("holistic, moved", [
    ("The image shows tennis courts. This could be a recreational facility.",
     "This could be a recreational facility."),
    ("Courts and cars. They are empty. Perhaps this is a school. The site may be a club.",
     "Perhaps this is a school. The site may be a club."),
    ("Tennis courts. It could be a club.", ""),          # "it" would seem to mean an object
    ("This could be a club. Tennis courts are seen.", ""),  # not at the end: not moved
    ("This could be a club.", ""),                        # the whole answer stays first
])
def test_hedged_reading_of_the_scene_closes_the_paragraph(holistic, moved):
    tile, plan, reqs, resps = scene(holistic=(holistic, "ok"))
    caption = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE).caption
    kept = holistic[:len(holistic) - len(moved)].strip()
    assert caption.startswith(kept), caption
    if moved:
        assert caption.endswith(" " + moved), caption
        assert caption.count(moved) == 1
    else:
        assert caption.endswith("left edge."), caption


def test_composer_wording_is_stable_true_and_varied():
    """Same tile, same caption; across tiles and seeds the composer says the cluster's region
    in several ways, each one of `leads(region)`, and a kept count in its own words."""
    from pipeline.stages.compose.wording import leads

    captions = {}
    for seed in range(4):
        for i in range(6):
            tile, plan, reqs, resps = renamed_scene(
                f"P{i:04d}_0_64_0_64", cluster_c1=("Three small vehicles are parked.", "ok"))
            params = ComposeParams(seed=seed)
            caption = compose_tile(tile, plan, reqs, resps, params, PROVENANCE).caption
            assert caption == compose_tile(tile, plan, reqs, resps, params, PROVENANCE).caption
            captions[seed, i] = caption
    openings = set()
    for caption in captions.values():
        last = caption[caption.rindex(". ") + 2:]
        opening = last.split(",")[0]
        assert opening[0].lower() + opening[1:] in leads("left side"), last
        assert "three" in last and "<p> a few small vehicles </p> [SEG]" in last, last
        openings.add(opening)
    assert len(openings) >= 4, openings
    assert len(set(captions.values())) >= 12


def test_failed_instance_response_leaves_its_phrase_out_and_is_counted():
    tile, plan, reqs, resps = scene(instance_03=(None, "failed"))
    result = compose(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    record = result.record
    assert isinstance(record, GroundedRecord)
    assert result.skipped == {"failed_response": 1}
    assert [p.object_ids for p in record.phrases] == [[1001], [1002], [1004], [1005, 1006, 1007]]
    assert [p.text for p in record.phrases][:3] == [
        "tennis court-1", "tennis court-2", "tennis court-3"]
    assert record.caption.count("[SEG]") == 4
    assert "tennis court-4" not in record.caption


def test_missing_response_is_counted():
    tile, plan, reqs, resps = scene()
    result = compose(tile, plan, reqs, [r for r in resps if not r.request_id.endswith("c1")],
                     ComposeParams(), PROVENANCE)
    assert result.skipped == {"missing_response": 1}
    assert all(p.kind == "instance" for p in result.record.phrases)


def test_empty_answer_is_counted_and_a_request_for_an_unknown_object_is_refused():
    tile, plan, reqs, resps = scene(instance_01=(' "" ', "ok"))
    result = compose(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert result.skipped == {"empty_text": 1}
    reqs[2] = reqs[2].model_copy(update={"object_ids": [9999]})
    with pytest.raises(BadRecordError, match="object 9999, not in the tile"):
        compose(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)


def test_failed_holistic_drops_the_tile():
    tile, plan, reqs, resps = scene(holistic=(None, "failed"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert isinstance(record, DroppedRecord)
    assert (record.reason, record.stage, record.tile_id) == ("holistic_failed", "compose",
                                                             tile.tile_id)


def test_no_grounded_phrase_drops_unless_allowed():
    failed = {k: (None, "failed") for k in
              ["instance_01", "instance_02", "instance_03", "instance_04", "cluster_c1"]}
    tile, plan, reqs, resps = scene(**failed)
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert isinstance(record, DroppedRecord) and record.reason == "no_phrases"
    kept = compose_tile(tile, plan, reqs, resps, ComposeParams(require_phrases=False), PROVENANCE)
    assert isinstance(kept, GroundedRecord)
    assert kept.phrases == [] and "[SEG]" not in kept.caption


@pytest.mark.parametrize("text", [
    "The tennis court [SEG] is green.",
    "The tennis court <p> is </p> green.",
    "A <b>green</b> tennis court.",
])
def test_injected_tag_in_annotator_text_skips_that_phrase(text):
    tile, plan, reqs, resps = scene(instance_01=(text, "ok"))
    result = compose(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert result.skipped == {"injected_tag": 1}
    assert isinstance(result.record, GroundedRecord)
    assert 1001 not in [oid for p in result.record.phrases for oid in p.object_ids]
    assert result.record.caption.count("[SEG]") == len(result.record.phrases) == 4


def test_injected_tag_in_holistic_drops_the_tile():
    tile, plan, reqs, resps = scene(holistic=("An aerial view [SEG] of courts.", "ok"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert isinstance(record, DroppedRecord) and record.reason == "injected_tag"


@pytest.mark.parametrize("text", [
    "The tennis court marked with number 3 is green.",
    "The tennis court #3 is green.",
    "The tennis court (3) is green.",
])
def test_leaked_mark_number_drops_the_record(text):
    tile, plan, reqs, resps = scene(instance_01=(text, "ok"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert isinstance(record, DroppedRecord)
    assert record.reason == "leaked_mark" and "leaked_mark" in record.detail.split(",")


def test_too_long_caption_drops_with_every_reason_in_detail():
    tile, plan, reqs, resps = scene(instance_01=("The tennis court marked 3 is green.", "ok"))
    record = compose_tile(tile, plan, reqs, resps,
                          ComposeParams(max_caption_chars=100, max_phrases=2), PROVENANCE)
    assert isinstance(record, DroppedRecord)
    assert record.reason == "leaked_mark"
    assert record.detail.split(",") == ["leaked_mark", "too_many_phrases", "caption_too_long"]


def test_weaving_keeps_the_annotators_words():
    tile, plan, reqs, resps = scene(
        instance_01=("A white hull with a red deck.", "ok"),
        instance_02=("1. The tennis court, partly shaded, is located at the bottom right", "ok"),
        cluster_c1=("Cars parked in rows", "ok"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(group_instances=False),
                          PROVENANCE)
    assert ("The <p> tennis court-1 </p> [SEG] toward the right: a white hull with a red deck."
            in record.caption)
    assert ("The <p> tennis court-2 </p> [SEG] , partly shaded, is located at the bottom "
            "right.") in record.caption
    assert record.caption.endswith(
        "On the left flank, there are <p> a few small vehicles </p> [SEG]: Cars parked in rows.")


def test_weaving_keeps_adjectives_and_exact_counts_and_states_the_position_once():
    tile, plan, reqs, resps = scene(
        instance_01=("Seen at the right, a large white tennis court is surrounded by trees.",
                     "ok"),
        cluster_c1=("There are three small vehicles, parked in a row at the left side of the "
                    "image.", "ok"))
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert ("The large white <p> tennis court-1 </p> [SEG] toward the right is surrounded by "
            "trees.") in record.caption
    assert record.caption.endswith(
        "On the left flank, <p> a few small vehicles </p> [SEG] , three all told, parked in a "
        "row.")


def test_compose_is_deterministic_and_ignores_other_tiles_responses():
    tile, plan, reqs, resps = scene()
    other = [r.model_copy(update={"tile_id": "elsewhere", "text": "noise"}) for r in resps]
    a = compose_tile(tile, plan, reqs, resps + other, ComposeParams(), PROVENANCE)
    b = compose_tile(tile, plan, list(reversed(reqs)), other + list(reversed(resps)),
                     ComposeParams(), PROVENANCE)
    assert a == b and a.caption == GOLDEN


def test_order_follows_marks_and_plan_not_request_ids():
    tile, plan, reqs, resps = scene()
    # Real request ids are content hashes: give them an order unrelated to the marks.
    rename = {r.request_id: f"{tile.tile_id}/{9 - i:02d}" for i, r in enumerate(reqs)}
    reqs = [r.model_copy(update={"request_id": rename[r.request_id]}) for r in reqs]
    resps = [r.model_copy(update={"request_id": rename[r.request_id]}) for r in resps]
    record = compose_tile(tile, plan, reqs, resps, ComposeParams(), PROVENANCE)
    assert record.caption == GOLDEN


def test_provenance_joins_mixed_backends():
    tile, _, reqs, resps = scene()
    resps[1] = answer(reqs[1], backend="openai")
    prov = tile_provenance(Params(), reqs, resps)
    assert prov.backend == "openai+template"
    assert prov.model == "openai-model+template-model"
    assert prov.prompt_versions == ["v1"]
    assert len(prov.params_hash) == 16


# ---------------------------------------------------------------------------------------------
# The stage, over shards on disk


def renamed_scene(tid: str, **overrides: tuple[str | None, str]):
    """`scene` with the tile id `tid`."""
    tile, plan, r, a = scene(**overrides)

    def moved(x):
        return x.model_copy(update={"tile_id": tid,
                                    "request_id": x.request_id.replace(plan.tile_id, tid)})
    return (tile.model_copy(update={"tile_id": tid}), plan.model_copy(update={"tile_id": tid}),
            [moved(x) for x in r], [moved(x) for x in a])


def write_stage_inputs(root: Path, shards: dict[str, list[dict]]) -> tuple[Path, Path, Path]:
    """shards: shard name -> one override dict per tile (see `scene`)."""
    tiles_dir, plan_dir, resp_dir = root / "tiles", root / "plan", root / "responses"
    for name, tiles in shards.items():
        all_tiles, plans, reqs, resps = [], [], [], []
        for i, overrides in enumerate(tiles):
            tile, plan, r, a = renamed_scene(f"P{name[6:11]}_{i}_64_0_64", **overrides)
            all_tiles.append(tile)
            plans.append(plan)
            reqs += r
            resps += a
        write_records(tiles_dir / name, all_tiles, Tile)
        write_records(plan_dir / "tiles" / name, plans, TilePlan)
        for kind in ("holistic", "instance", "cluster"):
            write_records(plan_dir / "requests" / kind / name,
                          [r for r in reqs if r.kind == kind], Request)
            write_records(resp_dir / kind / name, [r for r in resps if r.kind == kind], Response)
    return tiles_dir, plan_dir, resp_dir


SHARDS = {
    shard_name("train", 0, 2): [
        {},
        {"instance_02": (None, "failed")},
        {"holistic": (None, "failed")},
    ],
    shard_name("train", 1, 2): [
        {"instance_01": ("The tennis court marked with number 3 is green.", "ok")},
        {"instance_04": ("The tennis court <p> x </p> [SEG] is green.", "ok")},
        {"holistic": ("An aerial view. " * 200, "ok")},
        {k: (None, "failed") for k in
         ["instance_01", "instance_02", "instance_03", "instance_04", "cluster_c1"]},
    ],
}


def test_run_compose_writes_aligned_shards_and_counts_every_reason(tmp_path):
    tiles_dir, plan_dir, resp_dir = write_stage_inputs(tmp_path / "in", SHARDS)
    out = tmp_path / "records"
    report = run_compose(Params(), tiles_dir, plan_dir, resp_dir, out)

    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(SHARDS)
    assert sorted(p.name for p in (out / "dropped").glob("*.parquet")) == sorted(SHARDS)
    assert report["tiles"] == 7 and report["records"] == 3 and report["shards"] == 2
    assert report["dropped"] == {"caption_too_long": 1, "holistic_failed": 1,
                                 "leaked_mark": 1, "no_phrases": 1}
    assert report["phrases_skipped"] == {"failed_response": 6, "injected_tag": 1}
    assert report["phrases"] == {"instance": 4 + 3 + 3, "cluster": 3}
    records = [r for name in sorted(SHARDS) for r in read_records(out / name, GroundedRecord)]
    assert report["mean_caption_chars"] == round(
        sum(len(r.caption) for r in records) / len(records), 1)
    # the stage writes what compose_tile makes of the same tile (its wording follows its id)
    tile, plan, reqs, resps = renamed_scene(records[0].tile_id)
    assert records[0].caption == compose_tile(tile, plan, reqs, resps, ComposeParams(),
                                              PROVENANCE).caption
    assert records[0].provenance.backend == "template"
    assert records[0].provenance.params_hash == tile_provenance(Params(), [], []).params_hash
    dropped = read_records(out / "dropped" / sorted(SHARDS)[1], DroppedRecord)
    assert [d.reason for d in dropped] == ["leaked_mark", "caption_too_long", "no_phrases"]
    assert (out / "report.json").is_file()


def test_run_compose_is_byte_identical_across_runs(tmp_path):
    tiles_dir, plan_dir, resp_dir = write_stage_inputs(tmp_path / "in", SHARDS)
    run_compose(Params(), tiles_dir, plan_dir, resp_dir, tmp_path / "a")
    run_compose(Params(), tiles_dir, plan_dir, resp_dir, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert len(files) == 6  # 2 shards, 2 dropped shards, report.json and the stage marker
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_run_compose_names_a_missing_input_shard(tmp_path):
    tiles_dir, plan_dir, resp_dir = write_stage_inputs(tmp_path / "in", SHARDS)
    missing = resp_dir / "cluster" / sorted(SHARDS)[1]
    missing.unlink()
    with pytest.raises(EmptyInputError) as err:
        run_compose(Params(), tiles_dir, plan_dir, resp_dir, tmp_path / "out")
    assert str(missing) in err.value.one_line()
    assert not (tmp_path / "out").exists()
