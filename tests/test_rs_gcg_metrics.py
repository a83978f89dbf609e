"""RS-GCG metrics on hand-built 64x64 masks whose IoUs are known exactly."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from finetune.evaluate import (
    BagOfWordsEncoder,
    GTItem,
    PredItem,
    evaluate_gcg,
    load_ground_truth,
    load_predictions,
    plain_caption,
    run_evaluate,
)
from pipeline.core.errors import BadAnnotationError, BadMaskError, EmptyInputError
from pipeline.core.shards import shard_name, write_records
from pipeline.geometry import masks
from schemas import GroundedRecord, Phrase, Provenance

SIZE = 64
ENCODER = BagOfWordsEncoder()


def box(x0: int, y0: int, w: int, h: int, size: int = SIZE):
    """RLE of the axis-aligned rectangle [x0, x0 + w) x [y0, y0 + h)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0:y0 + h, x0:x0 + w] = 1
    return masks.encode(mask)


def square(x0: int, y0: int):
    return box(x0, y0, 20, 20)


GT = [
    GTItem("tile-a", "The <p> tennis court </p> [SEG] is next to a <p> swimming pool </p> [SEG] .",
           [("tennis court", square(0, 0)), ("swimming pool", square(30, 30))]),
    GTItem("tile-b", "Two <p> storage tanks </p> [SEG] stand beside a <p> harbor </p> [SEG] .",
           [("storage tanks", square(5, 5)), ("harbor", square(40, 0))]),
]


def perfect_predictions() -> list[PredItem]:
    return [PredItem(g.record_id, g.caption, [t for t, _ in g.phrases], [m for _, m in g.phrases])
            for g in GT]


def evaluate(predictions, ground_truth=GT, **kwargs) -> dict:
    return evaluate_gcg(ground_truth, predictions, ENCODER, captions=False, **kwargs)


def test_perfect_predictions_score_one():
    result = evaluate(perfect_predictions())
    for name in ("ap50", "miou", "miou_glamm", "recall", "recall_glamm"):
        assert result[name] == pytest.approx(1.0), name
    assert result["counts"]["gt_phrases"] == 4
    assert result["counts"]["matched"] == 4


@pytest.mark.parametrize("shift, iou, recalled", [(5, 0.6, True), (10, 1 / 3, False)])
def test_shifted_mask_has_known_iou(shift, iou, recalled):
    # 20x20 squares shifted by s px: intersection 20 (20 - s), union 20 (20 + s)
    gt = [GTItem("tile", "a <p> tennis court </p> [SEG]", [("tennis court", square(10, 10))])]
    pred = [PredItem("tile", "a tennis court", ["tennis court"], [square(10 + shift, 10)])]
    result = evaluate(pred, gt)
    assert result["miou"] == pytest.approx(iou, abs=1e-6)
    assert result["miou_glamm"] == pytest.approx(iou, abs=1e-6)
    assert result["recall"] == (1.0 if recalled else 0.0)
    assert result["ap50"] == pytest.approx(1.0 if recalled else 0.0)


def test_missing_phrase_lowers_recall_by_one_over_n():
    pred = perfect_predictions()
    pred[1] = PredItem("tile-b", pred[1].caption, ["storage tanks"], [pred[1].masks[0]])
    result = evaluate(pred)
    assert result["recall"] == pytest.approx(1.0 - 1 / 4)
    assert result["miou"] == pytest.approx(3 / 4)  # the unpaired ground-truth mask counts 0
    assert result["miou_glamm"] == pytest.approx(1.0)  # GLaMM averages paired masks only


def test_image_without_prediction_counts_as_empty():
    result = evaluate(perfect_predictions()[:1])
    assert result["counts"]["missing_predictions"] == 1
    assert result["recall"] == pytest.approx(0.5)
    assert result["miou"] == pytest.approx(0.5)


def test_duplicate_predictions_do_not_double_count():
    pred = [PredItem(p.record_id, p.caption, [*p.phrases, *p.phrases], [*p.masks, *p.masks])
            for p in perfect_predictions()]
    result = evaluate(pred)
    assert result["counts"]["matched"] == 4
    assert result["recall"] == pytest.approx(1.0)
    assert result["miou"] == pytest.approx(1.0)
    assert 0.0 < result["ap50"] <= 1.0


def test_phrase_text_mismatch_is_not_recalled_even_with_perfect_mask():
    pred = [PredItem(p.record_id, p.caption, ["small vehicle"] * len(p.phrases), p.masks)
            for p in perfect_predictions()]
    result = evaluate(pred)
    assert result["recall"] == 0.0
    assert result["recall_glamm"] == 0.0
    assert result["miou"] == pytest.approx(1.0)  # masks alone are still perfect
    assert result["ap50"] == pytest.approx(1.0)


def test_recall_keeps_matching_where_glamm_stops_at_first_miss():
    # highest-IoU pair (IoU 1) has the wrong phrase; the next (IoU 0.6) is right
    gt = [GTItem("tile", "", [("tennis court", square(0, 0)), ("harbor", square(40, 40))])]
    pred = [PredItem("tile", "", ["ground track field", "harbor"],
                     [square(0, 0), square(40 + 5, 40)])]
    result = evaluate(pred, gt)
    assert result["recall"] == pytest.approx(0.5)
    assert result["recall_glamm"] == 0.0


def test_miou_pairs_greedily_not_optimally():
    # Full-height column strips, so IoU = overlap / union of the x intervals.
    # GT A=[0,10) B=[6,16); predictions P=[0,12) Q=[0,5).
    # IoU: A-P 10/12, A-Q 5/10, B-P 6/16, B-Q 0. Greedy takes A-P first, leaving B-Q (IoU 0):
    # miou = (10/12 + 0) / 2 = 5/12. The optimal assignment (A-Q, B-P) would give 7/16.
    def strip(x0, x1):
        return box(x0, 0, x1 - x0, SIZE)

    gt = [GTItem("tile", "", [("a", strip(0, 10)), ("b", strip(6, 16))])]
    pred = [PredItem("tile", "", ["a", "b"], [strip(0, 12), strip(0, 5)])]
    result = evaluate(pred, gt)
    assert result["miou"] == pytest.approx(5 / 12, abs=1e-9)
    assert result["miou_glamm"] == pytest.approx(10 / 12, abs=1e-9)


def test_masks_of_another_size_are_refused():
    pred = [PredItem("tile-a", "", ["tennis court"], [box(0, 0, 20, 20, size=32)])]
    with pytest.raises(BadMaskError):
        evaluate(pred)


def test_bag_of_words_encoder_rows_are_unit_cosines():
    vectors = ENCODER.encode(["Tennis court", "tennis COURT", "storage tank", ""])
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0)
    assert vectors[0] @ vectors[1] == pytest.approx(1.0)
    assert vectors[0] @ vectors[2] == pytest.approx(0.0)
    assert not vectors[3].any()


def rle_json(rle) -> dict:
    return {"size": rle.size, "counts": rle.counts}


def test_prediction_file_round_trip(tmp_path):
    a, b = perfect_predictions()
    # square(5, 5) of tile-b as uncompressed column-major runs: zeros, then 20 ones per column
    runs = [5 * SIZE + 5] + [20, SIZE - 20] * 19 + [20]
    uncompressed = {"size": [SIZE, SIZE], "counts": runs + [SIZE * SIZE - sum(runs)]}
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([
        {"image_id": a.record_id, "caption": a.caption, "phrases": list(a.phrases),
         "pred_masks": [rle_json(m) for m in a.masks]},
        {"record_id": b.record_id, "caption": b.caption, "phrases": list(b.phrases),
         "masks": [uncompressed, rle_json(b.masks[1])]},
    ]))
    loaded = load_predictions(path)
    assert [p.record_id for p in loaded] == ["tile-a", "tile-b"]
    assert masks.iou(loaded[1].masks[0], b.masks[0]) == pytest.approx(1.0)
    assert evaluate(loaded)["recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("text, problem", [
    ("[{\"image_id\": \"x\",", "cannot read"),
    ("{\"image_id\": \"x\"}", "JSON array"),
    ("[{\"caption\": \"no id\"}]", "image_id"),
    ("[{\"image_id\": \"x\", \"pred_masks\": [{\"counts\": \"ab\"}]}]", "RLE"),
    ("[{\"image_id\": \"x\"}, {\"image_id\": \"x\"}]", "two predictions"),
])
def test_malformed_prediction_file_names_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(BadAnnotationError) as caught:
        load_predictions(path)
    assert problem in caught.value.message
    assert "bad.json" in caught.value.one_line()


def grounded_record(item: GTItem) -> GroundedRecord:
    return GroundedRecord(
        record_id=item.record_id, tile_id=item.record_id, split="val", caption=item.caption,
        phrases=[Phrase(text=t, kind="instance", category="tennis_court", object_ids=[1], mask=m)
                 for t, m in item.phrases],
        provenance=Provenance(backend="test", model="none", prompt_versions=["v1"],
                              params_hash="0", pipeline_version="0"))


def test_ground_truth_from_record_shards(tmp_path):
    for i, item in enumerate(GT):
        write_records(tmp_path / shard_name("val", i, len(GT)), [grounded_record(item)],
                      GroundedRecord)
    loaded = load_ground_truth(tmp_path, "val")
    assert [g.record_id for g in loaded] == ["tile-a", "tile-b"]
    assert [t for t, _ in loaded[1].phrases] == ["storage tanks", "harbor"]
    with pytest.raises(EmptyInputError):
        load_ground_truth(tmp_path, "test")

    pred_path = tmp_path / "predictions.json"
    pred_path.write_text(json.dumps([
        {"image_id": p.record_id, "caption": p.caption, "phrases": list(p.phrases),
         "pred_masks": [rle_json(m) for m in p.masks]} for p in perfect_predictions()]))
    out = tmp_path / "metrics.json"
    metrics = run_evaluate(tmp_path, "val", pred_path, out, encoder=ENCODER,
                           captions=False)
    assert json.loads(out.read_text())["recall"] == metrics["recall"] == pytest.approx(1.0)


def test_plain_caption_drops_tags_and_seg():
    assert plain_caption(GT[0].caption) == "The tennis court is next to a swimming pool ."


CAPTION_SCORER_READY = (importlib.util.find_spec("pycocoevalcap") is not None
                        and shutil.which("java") is not None)


@pytest.mark.skipif(CAPTION_SCORER_READY, reason="pycocoevalcap and Java are available")
def test_caption_metrics_say_why_they_were_skipped():
    result = evaluate_gcg(GT, perfect_predictions(), ENCODER)
    assert result["cider"] is None and result["meteor"] is None
    assert "pycocoevalcap" in result["skipped"]["cider"] or "Java" in result["skipped"]["cider"]
    assert "cider" not in result["computed"] and "recall" in result["computed"]


@pytest.mark.skipif(not CAPTION_SCORER_READY, reason="needs pycocoevalcap ([train]) and Java")
def test_identical_captions_score_top_cider_and_meteor():
    gt = [*GT, GTItem("tile-c", "A <p> ship </p> [SEG] is moored at the dock.",
                      [("ship", square(20, 20))])]
    pred = [*perfect_predictions(), PredItem("tile-c", gt[2].caption, ["ship"], [square(20, 20)])]
    result = evaluate_gcg(gt, pred, ENCODER)
    assert result["cider"] == pytest.approx(10.0, rel=1e-3)  # CIDEr-D of an exact match
    assert result["meteor"] > 0.9
    assert result["skipped"] == {}


# --- uni-target / multi-target split (GeoPixel's Table 2) ------------------------------------

TANKS = [box(40, 40, 8, 8), box(52, 40, 8, 8), box(40, 52, 8, 8)]  # three separate instances
COURT = square(0, 0)
MIXED = [GTItem("tile", "A <p> tennis court </p> [SEG] by <p> storage tanks </p> [SEG] .",
                [("tennis court", COURT), ("storage tanks", masks.union(TANKS))], [1, 3])]
OLD_KEYS = {"ap50", "miou", "miou_glamm", "recall", "recall_glamm", "text_encoder",
            "text_threshold", "iou_threshold", "cider", "meteor", "computed", "skipped", "counts"}


def split_of(result: dict, name: str) -> tuple[float, float, float]:
    return result[name]["ap50"], result[name]["miou"], result[name]["recall"]


@pytest.mark.parametrize("found, missed", [("uni_target", "multi_target"),
                                           ("multi_target", "uni_target")])
def test_one_subset_found_scores_one_the_other_zero(found, missed):
    row = 0 if found == "uni_target" else 1
    text, mask = MIXED[0].phrases[row]
    result = evaluate([PredItem("tile", "", [text], [mask])], MIXED)
    assert split_of(result, found) == pytest.approx((1.0, 1.0, 1.0))
    assert split_of(result, missed) == pytest.approx((0.0, 0.0, 0.0))
    assert result["miou"] == result["recall"] == pytest.approx(0.5)
    assert 0.0 < result["ap50"] < 1.0  # one of two phrases found, no false positive
    for name in ("uni_target", "multi_target"):
        assert result[name]["phrases"] == result[name]["images"] == 1
    assert result["counts"]["gt_phrases"] == 2 and result["counts"]["targets_from_masks"] == 0


def test_overall_miou_and_recall_are_phrase_weighted_means_of_the_subsets():
    gt = [*MIXED, GTItem("tile-2", "", [("ship", square(30, 0)), ("harbor", square(0, 30)),
                                        ("planes", masks.union([box(40, 40, 5, 5),
                                                                box(50, 50, 5, 5)]))],
                         [1, 1, 2])]
    pred = [PredItem("tile", "", ["tennis court"], [square(5, 0)]),  # IoU 0.6
            PredItem("tile-2", "", ["ship", "planes", "dock"],
                     [square(30, 0), masks.union([box(40, 40, 5, 5), box(50, 50, 5, 5)]),
                      square(0, 40)])]  # the harbor found with IoU 1/3, wrong phrase
    result = evaluate(pred, gt)
    uni, multi = result["uni_target"], result["multi_target"]
    assert (uni["phrases"], multi["phrases"]) == (3, 2)
    assert (uni["images"], multi["images"]) == (2, 2)
    assert uni["miou"] == pytest.approx((0.6 + 1.0 + 1 / 3) / 3)
    assert multi["miou"] == pytest.approx(0.5)
    assert uni["recall"] == pytest.approx(2 / 3) and multi["recall"] == pytest.approx(0.5)
    for key in ("miou", "recall", "recall_glamm"):
        assert result[key] == pytest.approx((3 * uni[key] + 2 * multi[key]) / 5), key


def test_prediction_of_a_multi_target_phrase_is_no_false_positive_of_the_uni_target_ap():
    court, tanks = MIXED[0].phrases
    cases = {
        "well placed": masks.union(TANKS),
        "badly placed": TANKS[0],  # IoU 1/3 with the tanks: a false positive of multi-target only
    }
    for how, tank_mask in cases.items():
        pred = [PredItem("tile", "", [court[0], tanks[0]], [court[1], tank_mask])]
        result = evaluate(pred, MIXED)
        assert result["uni_target"]["ap50"] == pytest.approx(1.0), how
        assert result["uni_target"]["ignored_pred_masks"] == 1, how
        assert result["multi_target"]["ignored_pred_masks"] == 1, how  # the court's mask
    assert result["multi_target"]["ap50"] == pytest.approx(0.0)

    # a mask overlapping no ground truth at all stays a false positive of both subsets
    both = [PredItem("tile", "", [court[0], tanks[0], "ship"],
                     [court[1], masks.union(TANKS), box(25, 0, 10, 10)])]
    result = evaluate(both, MIXED)
    assert result["uni_target"]["ap50"] < 1.0 and result["multi_target"]["ap50"] < 1.0
    assert result["uni_target"]["ignored_pred_masks"] == 1


def test_instance_counts_fall_back_to_mask_components():
    touching = masks.union([box(0, 40, 10, 10), box(10, 40, 10, 10)])  # merge: one component
    gt = [GTItem("tile", "", [("tennis court", COURT), ("storage tanks", masks.union(TANKS)),
                              ("vehicles", touching)])]
    result = evaluate([], gt)
    assert result["uni_target"]["phrases"] == 2 and result["multi_target"]["phrases"] == 1
    assert result["counts"]["targets_from_masks"] == 3
    # a known count wins over the mask, None entries are counted on it
    result = evaluate([], [GTItem("tile", "", gt[0].phrases, [None, 1, 2])])
    assert result["uni_target"]["phrases"] == 2 and result["multi_target"]["phrases"] == 1
    assert result["counts"]["targets_from_masks"] == 1
    with pytest.raises(BadAnnotationError):
        evaluate([], [GTItem("tile", "", gt[0].phrases, [1])])


def test_split_without_phrases_of_a_subset_is_none():
    result = evaluate(perfect_predictions()[:1], [GT[0]._replace(targets=[1, 1])])
    assert result["multi_target"]["phrases"] == 0
    assert split_of(result, "multi_target") == (None, None, None)
    assert split_of(result, "uni_target") == pytest.approx((1.0, 1.0, 1.0))


def test_metrics_file_keeps_overall_keys_and_adds_the_split(tmp_path):
    record = grounded_record(MIXED[0])
    record = record.model_copy(update={"phrases": [
        record.phrases[0], record.phrases[1].model_copy(update={"object_ids": [4, 5, 6]})]})
    write_records(tmp_path / shard_name("val", 0, 1), [record], GroundedRecord)
    assert load_ground_truth(tmp_path, "val")[0].targets == [1, 3]
    pred_path = tmp_path / "predictions.json"
    pred_path.write_text(json.dumps([{"image_id": "tile", "caption": "",
                                      "phrases": ["tennis court"],
                                      "pred_masks": [rle_json(COURT)]}]))
    out = tmp_path / "metrics" / "rs_gcg.json"
    run_evaluate(tmp_path, "val", pred_path, out, encoder=ENCODER, captions=False)
    written = json.loads(out.read_text())
    assert OLD_KEYS | {"split", "predictions"} <= written.keys()
    assert written["recall"] == pytest.approx(0.5) and written["miou"] == pytest.approx(0.5)
    assert written["counts"]["gt_phrases"] == 2
    for name, value in (("uni_target", 1.0), ("multi_target", 0.0)):
        assert {"ap50", "miou", "recall", "phrases"} <= written[name].keys()
        assert (written[name]["ap50"], written[name]["recall"]) == pytest.approx((value, value))
        assert written[name]["phrases"] == 1


def test_export_parquet_object_ids_give_the_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune.evaluate import load_split_ground_truth

    (text_a, mask_a), (text_b, mask_b) = MIXED[0].phrases
    columns = {"record_id": ["tile"], "split": ["val"], "caption": [MIXED[0].caption],
               "image": [None], "phrases": [[text_a, text_b]],
               "masks": [[rle_json(mask_a), rle_json(mask_b)]]}
    for folder, ids in (("with-ids", [[[7], [8, 9, 10]]]), ("without-ids", None)):
        table = pa.table({**columns, **({"object_ids": ids} if ids else {})})
        (tmp_path / folder).mkdir()
        pq.write_table(table, tmp_path / folder / shard_name("val", 0, 1))
        loaded = load_split_ground_truth(tmp_path / folder, "val")
        result = evaluate([], loaded)
        assert (result["uni_target"]["phrases"], result["multi_target"]["phrases"]) == (1, 1)
        assert result["counts"]["targets_from_masks"] == (0 if ids else 2), folder
