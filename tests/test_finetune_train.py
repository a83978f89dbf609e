"""The finetune and evaluate stages on real tiles with a tiny random Qwen2.5-VL and a tiny SAM.

Records come from the bundled iSAID val image P0004 through the whole pipeline (prepare, plan,
template annotation, compose, export); the two with the most mask area are kept, downscaled to
128 px (image and masks) so a CPU step takes a fraction of a second. The models are built from
configs in `tests/tiny_models.py` and saved, then loaded through the same `from_pretrained`
path a real base model takes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("segment_anything")

from tiny_models import save_tiny_qwen25_vl, save_tiny_sam  # noqa: E402

from finetune.evaluate import (
    BagOfWordsEncoder,
    evaluate_gcg,
    load_predictions,
    load_split_ground_truth,  # noqa: E402
    run_evaluate_stage,
)
from finetune.train import read_log, run_finetune  # noqa: E402
from pipeline.core.imaging import decode_png, encode_png  # noqa: E402
from pipeline.core.params import Params  # noqa: E402
from pipeline.geometry import masks  # noqa: E402
from pipeline.stages.annotate import run_annotate  # noqa: E402
from pipeline.stages.compose.stage import run_compose  # noqa: E402
from pipeline.stages.export import EXPORT_SCHEMA, run_export  # noqa: E402
from pipeline.stages.plan import run_plan  # noqa: E402
from pipeline.stages.prepare import run_prepare  # noqa: E402
from schemas import RLE  # noqa: E402

SIDE = 128  # px of the downscaled tiles
SCENE = "P0004"
OVERFIT_STEPS = 80
HALVED_BY = 60  # steps within which the total loss must have halved


def _downscaled(row: dict, side: int) -> dict:
    image = cv2.resize(decode_png(row["image"]["bytes"]), (side, side),
                       interpolation=cv2.INTER_AREA)
    small = [masks.encode(cv2.resize(masks.decode(RLE(**m)), (side, side),
                                     interpolation=cv2.INTER_NEAREST)).model_dump()
             for m in row["masks"]]
    return {**row, "image": {"bytes": encode_png(image), "path": row["image"]["path"]},
            "height": side, "width": side, "masks": small}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, isaid_root):
    """Two real records (export Parquet, 128 px), a tiny Qwen2.5-VL and a tiny SAM."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finetune")
    root = out / "isaid"
    (root / "val" / "images").mkdir(parents=True)
    for path in (isaid_root / "val" / "images").glob(f"{SCENE}*.png"):
        shutil.copy(path, root / "val" / "images" / path.name)
    raw = Params().model_dump(mode="json")
    raw["data"].update(root=str(root), splits=["val"], unlabeled_splits=[])
    raw["annotate"]["cache"]["enabled"] = False
    raw["runner"].update(local_scheduler="synchronous", workers=1)
    params = Params.model_validate(raw)
    build = out / "build"
    run_prepare(params, build / "tiles")
    run_plan(params, build / "tiles", build / "plan")
    for kind in ("holistic", "instance", "cluster"):
        run_annotate(params, kind, build / "tiles", build / "plan", build / "responses" / kind)
    run_compose(params, build / "tiles", build / "plan", build / "responses", build / "records")
    run_export(params, build / "tiles", build / "records", build / "export")

    rows = [r for shard in sorted((build / "export" / "parquet").glob("val-*.parquet"))
            for r in pq.read_table(shard).to_pylist()]
    rows.sort(key=lambda r: -sum(masks.area(RLE(**m)) for m in r["masks"]))
    chosen = [_downscaled(r, SIDE) for r in rows[:2]]
    parquet = out / "parquet"
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist(chosen, schema=EXPORT_SCHEMA),
                   parquet / "val-00000-of-00001.parquet")

    corpus = [r["caption"] for r in chosen] + [Params().finetune.question]
    lm = save_tiny_qwen25_vl(out / "tiny-qwen", corpus)
    sam = save_tiny_sam(out / "tiny-sam" / "sam.pth")
    return {"out": out, "parquet": parquet, "lm": lm, "sam": sam, "records": chosen}


def finetune_params(ws: dict, work: Path, **fields) -> Params:
    raw = Params().model_dump(mode="json")
    raw["finetune"].update(base_model_path=str(ws["lm"]), sam_model_type="custom",
                           sam_checkpoint_path=str(ws["sam"]), splits=["val"], device="cpu",
                           work_dir=str(work), num_workers=0, **fields)
    raw["evaluate"].update(split="val", device="cpu", text_encoder="bag-of-words",
                           captions=False, max_new_tokens=120)
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def overfit(workspace):
    """80 steps on the two records, both in every step."""
    params = finetune_params(workspace, workspace["out"] / "work-overfit",
                             max_steps=OVERFIT_STEPS, lr=3e-3, lora_alpha=64, warmup_steps=5,
                             lr_schedule="constant", batch_size=2, grad_accum=1,
                             lora_dropout=0.0, save_every=1000)
    out = workspace["out"] / "overfit"
    report = run_finetune(params, workspace["parquet"], out)
    return params, out, report


def test_overfitting_two_records_halves_the_loss_and_raises_mask_iou(overfit):
    _, out, report = overfit
    log = read_log(out / "log.jsonl")
    assert report["complete"] and [r["step"] for r in log] == list(range(1, OVERFIT_STEPS + 1))
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("ce", "bce", "dice", "total"))
        assert r["masks"] > 0
    first = log[0]
    halved = [r["step"] for r in log if r["total"] <= 0.5 * first["total"]]
    assert halved and halved[0] <= HALVED_BY, \
        f"total loss {first['total']:.3f} -> {log[-1]['total']:.3f}, halved at {halved[:1]}"
    assert log[-1]["ce"] < first["ce"] and log[-1]["dice"] < first["dice"]
    late_iou = sum(r["mask_iou"] for r in log[-5:]) / 5
    assert late_iou > 2 * first["mask_iou"] and late_iou > first["mask_iou"] + 0.05, \
        (first["mask_iou"], late_iou)
    for name in ("trainable.safetensors", "geopixel.json", "trainer.pt", "report.json",
                 "adapter/adapter_config.json", "processor/tokenizer_config.json"):
        assert (out / name).is_file(), name


def test_resumed_run_matches_the_uninterrupted_one(workspace):
    """Batch 1 x 2 accumulated micro-batches, LoRA dropout on: step 3 starts epoch 3."""
    fields = dict(max_steps=3, lr=1e-3, warmup_steps=1, batch_size=1, grad_accum=2,
                  lora_dropout=0.1, save_every=100)
    whole = run_finetune(finetune_params(workspace, workspace["out"] / "work-a", **fields),
                         workspace["parquet"], workspace["out"] / "run-a")
    params_b = finetune_params(workspace, workspace["out"] / "work-b", **fields)
    stopped = run_finetune(params_b, workspace["parquet"], workspace["out"] / "run-b",
                           stop_after=2)
    assert not stopped["complete"] and stopped["steps"] == 2
    assert not (workspace["out"] / "run-b").exists()  # an interrupted run writes no outs
    resumed = run_finetune(params_b, workspace["parquet"], workspace["out"] / "run-b")
    assert resumed["resumed_from_step"] == 2 and resumed["samples_seen"] == 2
    assert whole["run_key"] == resumed["run_key"]
    log_a = read_log(workspace["out"] / "run-a" / "log.jsonl")
    log_b = read_log(workspace["out"] / "run-b" / "log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3]
    for a, b in zip(log_a, log_b):
        for key in ("total", "ce", "bce", "dice", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    from safetensors.torch import load_file

    weights_a = load_file(str(workspace["out"] / "run-a" / "trainable.safetensors"))
    weights_b = load_file(str(workspace["out"] / "run-b" / "trainable.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a)


def test_no_base_model_skips_both_stages_with_one_line_and_a_report(tmp_path, capsys):
    report = run_finetune(Params(), tmp_path / "missing-export", tmp_path / "finetune")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert report["skipped"] is True
    assert len(err) == 1 and "skipped" in err[0] and "base_model_path" in err[0]
    assert json.loads((tmp_path / "finetune" / "report.json").read_text())["skipped"] is True

    metrics = run_evaluate_stage(Params(), tmp_path / "missing-records",
                                 checkpoint_dir=tmp_path / "finetune",
                                 out_metrics=tmp_path / "metrics" / "rs_gcg.json",
                                 out_dir=tmp_path / "evaluate")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert metrics["evaluated"] is False and len(err) == 1 and "evaluate skipped" in err[0]
    for path in (tmp_path / "metrics" / "rs_gcg.json", tmp_path / "evaluate" / "report.json"):
        assert json.loads(path.read_text())["evaluated"] is False


def test_checkpoint_predictions_are_read_and_scored_by_the_evaluation(workspace, overfit):
    params, checkpoint, _ = overfit
    metrics_path = workspace["out"] / "metrics" / "rs_gcg.json"
    predictions_path = workspace["out"] / "evaluate" / "predictions.json"
    metrics = run_evaluate_stage(params, workspace["parquet"], checkpoint_dir=checkpoint,
                                 out_metrics=metrics_path, out_dir=workspace["out"] / "evaluate")
    predictions = load_predictions(predictions_path)
    records = workspace["records"]
    assert [p.record_id for p in predictions] == [r["record_id"] for r in records]
    for pred in predictions:
        assert len(pred.masks) == pred.caption.count("[SEG]") == len(pred.phrases)
        assert all(list(m.size) == [SIDE, SIDE] for m in pred.masks)
        assert "<|im_end|>" not in pred.caption
    assert metrics["evaluated"] is True and metrics["counts"]["images"] == 2
    assert metrics["counts"]["gt_phrases"] == sum(len(r["masks"]) for r in records)
    assert metrics["counts"]["pred_masks"] == sum(len(p.masks) for p in predictions)
    for key in ("ap50", "miou", "recall"):
        assert 0.0 <= metrics[key] <= 1.0
    assert json.loads(metrics_path.read_text())["miou"] == metrics["miou"]
    assert metrics["generation"]["records"] == 2
    # a given predictions file is scored the same, nothing generated
    again = run_evaluate_stage(params, workspace["parquet"], predictions_path=predictions_path,
                               out_metrics=workspace["out"] / "again.json",
                               out_dir=workspace["out"] / "evaluate-again")
    assert again["miou"] == metrics["miou"] and "generation" not in again
    # the same file scored directly gives the same figures
    direct = evaluate_gcg(load_split_ground_truth(workspace["parquet"], "val"), predictions,
                          BagOfWordsEncoder(), captions=False)
    assert direct["miou"] == metrics["miou"] and direct["recall"] == metrics["recall"]
