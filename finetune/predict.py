"""Grounded captions from a fine-tuned checkpoint: text with [SEG]s, one mask per [SEG].

For each record of a split, the model answers GeoPixelD's question about the tile (greedy
decoding); the answer is then read once more, whole, so that every [SEG]'s last hidden state is
the one training used (the state at the [SEG] token itself, not at the step that chose it);
those states go through the projection into SAM's mask decoder, and each mask is thresholded
at tile size. The output is the predictions JSON that `finetune.evaluate.load_predictions`
reads (GLaMM's per-image result):

    [{"image_id", "caption", "phrases", "pred_masks": [COCO RLE, ...]}, ...]

`phrases[i]` is the `<p> ... </p>` text right before the i-th [SEG] ("" when the model wrote a
[SEG] without a phrase), so phrases and masks always pair up.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from finetune.data import Collator, Sample, open_samples, to_device
from finetune.model import GeoPixelModel, ModelSpec, load_geopixel_model, resolve_device
from pipeline.core.errors import BadParamsError
from pipeline.core.params import EvaluateParams
from pipeline.core.shards import atomic_path
from pipeline.core.user_files import read_user_json
from pipeline.formats.geopixel_format import SEG
from pipeline.geometry import masks as rle_masks

SPEC_FILE = "geopixel.json"
TRAINED_PHRASE_RE = re.compile(r"<p>\s*(.*?)\s*</p>\s*$", re.S)


def phrases_per_seg(caption: str) -> list[str]:
    """The phrase each [SEG] grounds: the `<p> ... </p>` just before it, else ""."""
    pieces = caption.split(SEG)[:-1]
    found = []
    for piece in pieces:
        match = TRAINED_PHRASE_RE.search(piece)
        found.append(match.group(1).strip() if match else "")
    return found


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def load_checkpoint(folder: Path, device: torch.device, bf16: bool
                    ) -> tuple[GeoPixelModel, Any, ModelSpec]:
    """The model of a `finetune` checkpoint folder, its trained weights loaded, in eval mode."""
    from finetune.train import load_trained_weights

    folder = Path(folder)
    if not is_checkpoint(folder):
        raise BadParamsError(f"not a GeoPixel checkpoint (no {SPEC_FILE})", folder)
    raw = read_user_json(folder / SPEC_FILE, "checkpoint spec", error=BadParamsError)
    if not isinstance(raw, dict):
        raise BadParamsError("checkpoint spec is not a JSON object", folder / SPEC_FILE)
    spec = ModelSpec(**{k: v for k, v in raw.items() if k in ModelSpec.__dataclass_fields__})
    model, processor = load_geopixel_model(spec, device, bf16,
                                           processor_path=folder / "processor")
    load_trained_weights(model, folder, device)
    model.eval()
    return model, processor, spec


def _stop_ids(model: GeoPixelModel, tokenizer: Any) -> set[int]:
    configured = getattr(model.lm.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


def _placeholder_ids(model: GeoPixelModel) -> set[int]:
    """Image/video placeholder tokens: an answer that writes one ends there (reading it back
    would ask the model for image features it does not have)."""
    config = model.lm.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id",
             "vision_end_token_id", "image_token_index")
    return {int(getattr(config, n)) for n in names if getattr(config, n, None) is not None}


def decode_answer(tokenizer: Any, ids: Sequence[int], seg_id: int) -> str:
    """Answer text with its [SEG]s kept (special tokens such as end markers dropped)."""
    chunks, current = [], []
    for token in ids:
        if token == seg_id:
            chunks.append(current)
            current = []
        else:
            current.append(int(token))
    chunks.append(current)
    return SEG.join(tokenizer.decode(c, skip_special_tokens=True) for c in chunks).strip()


@torch.no_grad()
def predict_batch(model: GeoPixelModel, collator: Collator, samples: Sequence[Sample],
                  device: torch.device, max_new_tokens: int, mask_threshold: float,
                  autocast: Any) -> list[dict]:
    """Predictions (GLaMM's per-image objects) for a batch of samples."""
    tokenizer = collator.tokenizer
    batch = to_device(collator.prompt_batch(samples), device)
    inputs = batch["vlm_inputs"]
    prompt_len = inputs["input_ids"].shape[1]
    stop, placeholders = _stop_ids(model, tokenizer), _placeholder_ids(model)
    with autocast:
        generated = model.lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      use_cache=True, pad_token_id=collator.pad_id,
                                      eos_token_id=sorted(stop | placeholders))
    answers = generated[:, prompt_len:]
    keep = torch.ones_like(answers, dtype=torch.bool)
    for i in range(answers.shape[0]):
        tokens = answers[i].tolist()
        ends = [j for j, t in enumerate(tokens) if t in stop or t in placeholders]
        if ends:
            keep[i, ends[0] + (0 if tokens[ends[0]] in placeholders else 1):] = False
    answers = torch.where(keep, answers, torch.full_like(answers, collator.pad_id))
    # read the answers once more, whole, for the hidden state at each [SEG]
    full = {k: v for k, v in inputs.items()}
    full["input_ids"] = torch.cat([inputs["input_ids"], answers], dim=1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], keep.to(
        inputs["attention_mask"].dtype)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.zeros_like(answers)], dim=1)
    with autocast:
        outputs = model.lm_outputs(full)
        embeddings = model.encode_images(batch["sam_images"])
        logits = model.seg_masks(full["input_ids"], outputs.hidden_states[-1], embeddings,
                                 batch["resized_sizes"], batch["tile_sizes"])
    results = []
    for i, sample in enumerate(samples):
        caption = decode_answer(tokenizer, answers[i][keep[i]].tolist(), model.seg_token_id)
        binary = (logits[i] > mask_threshold).to(torch.uint8).cpu().numpy()
        results.append({"image_id": sample.record_id, "caption": caption,
                        "phrases": phrases_per_seg(caption),
                        "pred_masks": [rle_masks.encode(m).model_dump() for m in binary]})
    return results


def generate_predictions(model: GeoPixelModel, processor: Any, spec: ModelSpec, samples: Any,
                         ev: EvaluateParams, device: torch.device) -> list[dict]:
    """Predictions for every sample (or the first `ev.max_records`), in sample order."""
    collator = Collator(processor, spec.seg_token, spec.question, model.sam_image_size,
                        spec.max_answer_tokens)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=ev.bf16 and device.type == "cuda")
    count = min(len(samples), ev.max_records) if ev.max_records else len(samples)
    results: list[dict] = []
    for start in range(0, count, ev.batch_size):
        chunk = [samples[i] for i in range(start, min(count, start + ev.batch_size))]
        results.extend(predict_batch(model, collator, chunk, device, ev.max_new_tokens,
                                     ev.mask_threshold, autocast))
    return results


def run_predict(checkpoint_dir: Path, parquet_dir: Path, out_path: Path,
                ev: EvaluateParams) -> dict:
    """Write the predictions JSON of a checkpoint on split `ev.split`; return counts."""
    device = resolve_device(ev.device)
    model, processor, spec = load_checkpoint(Path(checkpoint_dir), device, ev.bf16)
    samples = open_samples(Path(parquet_dir), [ev.split])
    started = time.perf_counter()
    predictions = generate_predictions(model, processor, spec, samples, ev, device)
    elapsed = time.perf_counter() - started
    with atomic_path(Path(out_path)) as tmp:
        tmp.write_text(json.dumps(predictions, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"records": len(predictions), "masks": sum(len(p["pred_masks"]) for p in predictions),
            "seconds": round(elapsed, 3),
            "records_per_s": round(len(predictions) / elapsed, 4) if elapsed else None}
