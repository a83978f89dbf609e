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
