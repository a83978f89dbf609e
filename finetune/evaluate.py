"""RS-GCG evaluation of grounded captions: AP50, mIoU, Recall, CIDEr, METEOR (as GLaMM's GCG).

GeoPixel reports RS-GCG with GLaMM's GCG evaluation (`eval/gcg/evaluate.py` in
mbzuai-oryx/groundingLMM); this module computes the same figures from our GroundedRecord shards
and a predictions file, without GLaMM's intermediate COCO files.

Ground truth: one `GTItem(record_id, caption, [(phrase_text, RLE), ...], targets)` per record,
the i-th pair being the i-th grounded phrase and the mask its [SEG] owns, `targets[i]` the number
of object instances it grounds (`len(object_ids)`; `load_ground_truth` and
`load_split_ground_truth` read them from record or export shards).

Predictions file: a JSON array with one object per evaluated image, GLaMM's per-image result:

    [{"image_id": "<record_id>",
      "caption": "The <p> tennis court </p> [SEG] at right ...",
      "phrases": ["tennis court", ...],
      "pred_masks": [{"size": [height, width], "counts": "<COCO RLE string>"}, ...]},
     ...]

`record_id` is accepted for `image_id`, and `masks` for `pred_masks`. `counts` may also be an
uncompressed RLE (list of ints). The i-th phrase belongs to the i-th mask; extra masks without a
phrase still count for AP50 and mIoU. Captions are compared as plain text: `<...>` tags and
[SEG] are removed from both sides, as GLaMM's inference does.

Metrics (every figure is over the whole split):
- ap50: pycocotools COCOeval(iouType="segm"), one class, every predicted mask scored 1.0,
  `stats[1]`; one ground-truth annotation per grounded phrase.
- miou: per image, ground-truth and predicted masks are paired greedily one-to-one, highest IoU
  first (pairs of IoU > 0); a ground-truth mask left unpaired counts as IoU 0; the mean is over
  all ground-truth masks of the split.
- miou_glamm: GLaMM's script as written: per image the mean of the paired IoUs only (unpaired
  masks ignored, 0 for an image without pairs), then the mean over images.
- recall: matched ground-truth phrases / all ground-truth phrases. A pair (ground-truth phrase,
  predicted phrase) is admissible when mask IoU >= iou_threshold and text similarity >=
  text_threshold; admissible pairs are taken greedily one-to-one, highest IoU first.
- recall_glamm: GLaMM's script as written: the greedy pass over all pairs stops at the first
  highest-IoU pair that is not admissible (so a well-placed mask with a wrong phrase can hide
  later matches in the same image).
- cider, meteor: pycocoevalcap (PTB tokenizer; both need Java), one reference per image.
  `None` when they could not be computed; `skipped` then says why.

Uni-target / multi-target split (GeoPixel's Table 2 reports AP50, mIoU and Recall for both and
Overall; CIDEr and METEOR once, per caption): a ground-truth phrase is uni-target when it grounds
one object instance, multi-target when it grounds more. The top-level figures above are Overall;
`uni_target` and `multi_target` hold ap50, miou, miou_glamm, recall, recall_glamm (None for a
subset without phrases), `phrases` (its ground-truth phrases), `images` (images with one) and
`ignored_pred_masks` (predicted masks left out of its AP50, below). Predictions carry no object
counts, so they are not split; instead:
- miou, recall (and the GLaMM variants): each ground-truth phrase keeps the prediction it got in
  the Overall matching above, which pairs all of an image's ground truth with all of its
  predictions; a subset's figure is over its own phrases (miou_glamm: over the images that have
  one). A prediction thus counts for at most one phrase, and Overall miou and recall are the
  phrase-weighted means of the two subsets'.
- ap50: COCOeval with the subset's ground-truth annotations only, over every image. A predicted
  mask whose highest-IoU ground-truth mask belongs to the other subset only (a tie keeps it) is
  left out, so a mask aimed at a multi-target phrase, well placed or not, is no false positive of
  the uni-target AP50, and the other way round; a mask overlapping no ground truth is a false
  positive of both.
Where the instance count is unknown (`targets` None, or a phrase with no object ids), it is the
number of 8-connected components of the phrase's mask, as `read_geopixel` counts instances of an
RLE mask; `counts.targets_from_masks` says for how many phrases (touching instances merge, so
this undercounts multi-target phrases).

Text similarity is the cosine of mean-pooled `bert-base-uncased` token embeddings
(`BertMeanPoolEncoder`, needs the `[train]` extra and the weights); figures comparable to
GeoPixel's need it. `BagOfWordsEncoder` is a dependency-free stand-in for tests and offline use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.core.errors import BadAnnotationError, BadMaskError, EmptyInputError, printable
from pipeline.core.shards import list_shards, read_records, write_json
from pipeline.core.user_files import read_user_json
from pipeline.geometry import masks
from pipeline.geometry.checks import check_rle
from schemas import RLE, SEG, GroundedRecord

log = logging.getLogger(__name__)

TEXT_THRESHOLD = 0.5  # GLaMM's text_sim_threshold
IOU_THRESHOLD = 0.5  # GLaMM's iou_threshold
PHRASE_CATEGORY_ID = 1  # the single class every grounded phrase belongs to
CAPTION_METRICS = ("cider", "meteor")
UNI_TARGET = "uni_target"  # phrases grounding one object instance
MULTI_TARGET = "multi_target"  # phrases grounding several
TARGET_SUBSETS = (UNI_TARGET, MULTI_TARGET)

_TAG_RE = re.compile(r"<.*?>")
_WORD_RE = re.compile(r"[a-z0-9]+")


class GTItem(NamedTuple):
    """One ground-truth record: caption, then its grounded phrases and masks in [SEG] order.

    `targets[i]`: object instances the i-th phrase grounds (it is uni-target when <= 1). Where
    `targets`, or one entry of it, is None, the connected components of the mask are counted.
    """

    record_id: str
    caption: str
    phrases: Sequence[tuple[str, RLE]]
    targets: Sequence[int | None] | None = None


class PredItem(NamedTuple):
    """One model output: caption, phrases and masks (the i-th phrase owns the i-th mask)."""

    record_id: str
    caption: str
    phrases: Sequence[str]
    masks: Sequence[RLE]


class TextEncoder(Protocol):
    """Embeds phrases as L2-normalised rows, so a dot product is their cosine similarity.

    An optional `name` attribute is recorded in the metrics.
    """

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class BagOfWordsEncoder:
    """Hashed bag of lowercase words: a dependency-free stand-in for BERT (tests, offline runs).

    Phrases sharing no word have similarity 0; its figures are NOT comparable to GeoPixel's.
    """

    def __init__(self, dim: int = 4096):
        self.dim = dim
        self.name = f"bag-of-words-{dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for word in _WORD_RE.findall(text.lower()):
                vectors[row, zlib.crc32(word.encode("utf-8")) % self.dim] += 1.0
        return _normalise_rows(vectors)


class BertMeanPoolEncoder:
    """GLaMM's phrase embedding: mean of BERT's last hidden states over the phrase's tokens.

    GLaMM encodes one phrase at a time, so its mean includes [CLS] and [SEP] and no padding;
    batches here mask the padding out, which gives the same vectors. Loads `transformers`
    (the `[train]` extra) and the weights on first use.
    """

    def __init__(self, model_path: str = "bert-base-uncased", device: str = "cpu",
                 batch_size: int = 64, max_length: int = 512):
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"bert-mean-pool:{model_path}"
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._model = AutoModel.from_pretrained(self.model_path).to(self.device).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(list(texts[start:start + self.batch_size]),
                                        return_tensors="pt", padding=True, truncation=True,
                                        max_length=self.max_length).to(self.device)
                hidden = self._model(**batch).last_hidden_state
                keep = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                rows.append(((hidden * keep).sum(1) / keep.sum(1)).float().cpu().numpy())
        if not rows:
            return np.zeros((0, 0))
        return _normalise_rows(np.concatenate(rows).astype(np.float64))


def plain_caption(text: str) -> str:
    """Caption without `<p>` tags and [SEG] tokens, spaces collapsed (GLaMM's cleaning)."""
    return " ".join(_TAG_RE.sub("", text).replace(SEG, "").split()).strip("'").strip()


def ground_truth_item(record: GroundedRecord) -> GTItem:
    """A GroundedRecord as evaluation ground truth."""
    return GTItem(record.record_id, record.caption, [(p.text, p.mask) for p in record.phrases],
                  [len(p.object_ids) or None for p in record.phrases])


def mask_components(rle: RLE) -> int:
    """8-connected components of a mask: the instance count of a phrase that names none."""
    crop, _, _ = masks.decode_crop(rle)
    if not crop.size:
        return 0
    return int(cv2.connectedComponents(crop, connectivity=8)[0]) - 1


def phrase_subsets(item: GTItem) -> tuple[list[str], int]:
    """Each phrase's subset (uni- or multi-target), and how many counts came from the masks."""
    targets = list(item.targets) if item.targets is not None else [None] * len(item.phrases)
    if len(targets) != len(item.phrases):
        raise BadAnnotationError(f"record {item.record_id!r}: {len(targets)} target counts for "
                                 f"{len(item.phrases)} phrases")
    counted = [t if t is not None else mask_components(rle)
               for t, (_, rle) in zip(targets, item.phrases)]
    return ([MULTI_TARGET if n > 1 else UNI_TARGET for n in counted],
            sum(t is None for t in targets))


def load_ground_truth(records_dir: Path, split: str) -> list[GTItem]:
    """Ground truth of one split from GroundedRecord shards (`build/records`)."""
    shards = list_shards(Path(records_dir), split)
    if not shards:
        raise EmptyInputError(f"no {split!r} record shards", path=records_dir)
    return [ground_truth_item(r) for shard in shards for r in read_records(shard, GroundedRecord)]


def _prediction_rle(value: Any, where: str, path: Path) -> RLE:
    # typed size, counts covering the frame exactly (pipeline.geometry.checks), before any decoding
    checked = check_rle(value, None, None, where, path)
    size, counts = checked["size"], checked["counts"]
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects({"size": size, "counts": counts}, *size)["counts"].decode()
    return RLE(size=size, counts=counts)


def _prediction_item(entry: Any, index: int, path: Path) -> PredItem:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise BadAnnotationError(f"{where}: expected an object, got {type(entry).__name__}",
                                 path=path)
    record_id = entry.get("image_id", entry.get("record_id"))
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise BadAnnotationError(f"{where}: missing image_id (or record_id)", path=path)
    caption = entry.get("caption", "")
    phrases = entry.get("phrases", [])
    rles = entry.get("pred_masks", entry.get("masks", []))
    if not isinstance(caption, str):
        raise BadAnnotationError(f"{where}: caption must be a string", path=path)
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise BadAnnotationError(f"{where}: phrases must be a list of strings", path=path)
    if not isinstance(rles, list):
        raise BadAnnotationError(f"{where}: pred_masks must be a list of RLE objects", path=path)
    return PredItem(str(record_id), caption, phrases,
                    [_prediction_rle(r, f"{where} mask {k}", path) for k, r in enumerate(rles)])


def load_predictions(path: Path) -> list[PredItem]:
    """Read a predictions JSON file (format in the module docstring)."""
    path = Path(path)
    try:
        payload = read_user_json(path, "the file")
    except BadAnnotationError as err:
        raise BadAnnotationError(f"cannot read predictions: {err.message}", path=path) from None
    if not isinstance(payload, list):
        raise BadAnnotationError("predictions must be a JSON array of per-image objects",
                                 path=path)
    items = [_prediction_item(entry, i, path) for i, entry in enumerate(payload)]
    seen: set[str] = set()
    for item in items:
        if item.record_id in seen:
            raise BadAnnotationError(f"two predictions for image {item.record_id!r}", path=path)
        seen.add(item.record_id)
    return items


def _iou_matrix(gt: Sequence[RLE], pred: Sequence[RLE]) -> np.ndarray:
    """IoU of every ground-truth mask (rows) with every predicted mask (columns)."""
    if not gt or not pred:
        return np.zeros((len(gt), len(pred)))
    ious = mask_utils.iou([masks.to_coco(r) for r in pred], [masks.to_coco(r) for r in gt],
                          [0] * len(gt))
    return np.asarray(ious, dtype=np.float64).reshape(len(pred), len(gt)).T


def greedy_pairs(scores: np.ndarray, admissible: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs taken by highest score first, among admissible cells."""
    order = np.argsort(-scores, axis=None, kind="stable")
    rows_used: set[int] = set()
    cols_used: set[int] = set()
    pairs = []
    for flat in order:
        row, col = np.unravel_index(flat, scores.shape)
        if admissible[row, col] and row not in rows_used and col not in cols_used:
            pairs.append((int(row), int(col)))
            rows_used.add(int(row))
            cols_used.add(int(col))
    return pairs


def _glamm_recall_matches(ious: np.ndarray, sims: np.ndarray, iou_threshold: float,
                          text_threshold: float) -> list[int]:
    """GLaMM's `find_best_matches`: greedy by IoU, stopping at the first non-admissible pair.

    Returns the matched ground-truth rows.
    """
    ious, sims = ious.copy(), sims.copy()
    matched = []
    while ious.size:
        row, col = np.unravel_index(np.argmax(ious), ious.shape)
        if ious[row, col] < iou_threshold or sims[row, col] < text_threshold:
            break
        matched.append(int(row))
        ious[row, :] = ious[:, col] = 0
        sims[row, :] = sims[:, col] = 0
    return matched


def _ap50(images_masks: Sequence[tuple[Sequence[RLE], Sequence[RLE]]]) -> float:
    """COCO mask AP at IoU 0.5, one class, all scores 1.0 (GLaMM's `COCOeval(..., "segm")`).

    One (ground-truth masks, predicted masks) pair per image.
    """
    images, gt_anns, results = [], [], []
    for image_id, (gt_rles, pred_rles) in enumerate(images_masks, start=1):
        sized = [*gt_rles, *pred_rles]
        height, width = sized[0].size if sized else (1, 1)
        images.append({"id": image_id, "height": height, "width": width})
        for rle in gt_rles:
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id,
                            "category_id": PHRASE_CATEGORY_ID, "iscrowd": 0,
                            "segmentation": masks.to_coco(rle), "area": masks.area(rle),
                            "bbox": masks.bbox(rle)})
        for rle in pred_rles:
            results.append({"image_id": image_id, "category_id": PHRASE_CATEGORY_ID,
                            "segmentation": masks.to_coco(rle), "score": 1.0})
    if not results:
        return 0.0
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gt_anns,
                       "categories": [{"id": PHRASE_CATEGORY_ID, "name": "grounded phrase"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.params.catIds = [PHRASE_CATEGORY_ID]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return max(float(coco_eval.stats[1]), 0.0)


def score_captions(references: dict[str, str], candidates: dict[str, str]
                   ) -> tuple[dict[str, float | None], dict[str, str]]:
    """CIDEr and METEOR with pycocoevalcap: (scores, reasons for the ones skipped)."""
    scores: dict[str, float | None] = {name: None for name in CAPTION_METRICS}
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        reason = "pycocoevalcap is not installed (pip install '.[train]')"
        return scores, {name: reason for name in CAPTION_METRICS}
    if shutil.which("java") is None:
        reason = "Java is not on PATH (pycocoevalcap's PTB tokenizer and METEOR need it)"
        return scores, {name: reason for name in CAPTION_METRICS}
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({k: [{"caption": v}] for k, v in references.items()})
    cands = tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in references})
    skipped: dict[str, str] = {}
    for name, scorer in (("cider", Cider), ("meteor", Meteor)):
        try:
            scores[name] = float(scorer().compute_score(refs, cands)[0])
        except Exception as err:  # a scorer's Java subprocess failing must not lose the others
            skipped[name] = f"{type(err).__name__}: {err}"
    return scores, skipped


@dataclass
class _PhraseTally:
    """Running mIoU and Recall sums over one set of ground-truth phrases (all, or a subset)."""

    phrases: int = 0
    images: int = 0
    iou_sum: float = 0.0
    matched: int = 0
    glamm_matched: int = 0
    glamm_image_mious: list[float] = field(default_factory=list)

    def add_image(self, rows: Sequence[int], gt_ious: np.ndarray, matched: set[int],
                  glamm_matched: set[int]) -> None:
        """One image's phrases `rows`, with the IoU each got in the image's pairing (0 unpaired)."""
        ious = [float(gt_ious[r]) for r in rows]
        paired = [v for v in ious if v > 0]  # pairs are taken among IoU > 0 only
        self.phrases += len(rows)
        self.images += 1
        self.iou_sum += sum(ious)
        self.matched += len(matched.intersection(rows))
        self.glamm_matched += len(glamm_matched.intersection(rows))
        self.glamm_image_mious.append(float(np.mean(paired)) if paired else 0.0)

    def figures(self) -> dict[str, float | None]:
        n = self.phrases
        return {"miou": self.iou_sum / n if n else None,
                "miou_glamm": (float(np.mean(self.glamm_image_mious))
                               if self.glamm_image_mious else None),
                "recall": self.matched / n if n else None,
                "recall_glamm": self.glamm_matched / n if n else None}


def _prediction_owners(ious: np.ndarray, subsets: Sequence[str]) -> list[set[str]]:
    """Per predicted mask, the subsets of its highest-IoU ground-truth masks (empty: none)."""
    owners = []
    for col in ious.T:
        best = col.max() if col.size else 0.0
        owners.append({subsets[r] for r in np.flatnonzero(col == best)} if best > 0 else set())
    return owners


def evaluate_gcg(ground_truth: Sequence[GTItem], predictions: Sequence[PredItem],
                 encoder: TextEncoder, text_threshold: float = TEXT_THRESHOLD,
                 iou_threshold: float = IOU_THRESHOLD, captions: bool = True) -> dict:
    """RS-GCG metrics of `predictions` against `ground_truth` (definitions in the module doc).

    Ground-truth images without a prediction count as an empty prediction (no masks, empty
    caption); predictions for images not in the ground truth are ignored and counted.
    `captions=False` skips CIDEr/METEOR (they start Java). The top-level figures are Overall;
    `uni_target` and `multi_target` split them by the phrases' instance counts.
    """
    ground_truth = [GTItem(*item) for item in ground_truth]
    predictions = [PredItem(*item) for item in predictions]
    gt_ids = [item.record_id for item in ground_truth]
    if len(set(gt_ids)) != len(gt_ids):
        raise BadAnnotationError("ground truth names a record twice")
    by_id: dict[str, PredItem] = {}
    for pred in predictions:
        if pred.record_id in by_id:
            raise BadAnnotationError(f"two predictions for image {pred.record_id!r}")
        by_id[pred.record_id] = pred

    counts = {"images": len(ground_truth), "gt_phrases": 0, "pred_phrases": 0, "pred_masks": 0,
              "matched": 0, "missing_predictions": 0, "unknown_predictions": 0,
              "unaligned_predictions": 0, "targets_from_masks": 0}
    counts["unknown_predictions"] = len(set(by_id) - set(gt_ids))
    overall = _PhraseTally()
    by_subset = {name: _PhraseTally() for name in TARGET_SUBSETS}
    ap_images: list[tuple[list[RLE], list[str], list[RLE], list[set[str]]]] = []
    for item in ground_truth:
        pred = by_id.get(item.record_id)
        if pred is None:
            counts["missing_predictions"] += 1
            pred = PredItem(item.record_id, "", [], [])
        gt_texts = [text for text, _ in item.phrases]
        gt_rles = [rle for _, rle in item.phrases]
        sizes = {tuple(r.size) for r in [*gt_rles, *pred.masks]}
        if len(sizes) > 1:
            raise BadMaskError(f"image {item.record_id!r}: masks of different sizes "
                               f"{sorted(sizes)}")
        subsets, from_masks = phrase_subsets(item)
        counts["targets_from_masks"] += from_masks
        counts["pred_phrases"] += len(pred.phrases)
        counts["pred_masks"] += len(pred.masks)
        if len(pred.phrases) != len(pred.masks):
            counts["unaligned_predictions"] += 1

        ious = _iou_matrix(gt_rles, pred.masks)
        # GLaMM's mIoU matrix is predictions x ground truth: the same pairs, same tie-breaking
        gt_ious = np.zeros(len(gt_rles))
        for r, c in greedy_pairs(ious.T, ious.T > 0):
            gt_ious[c] = ious.T[r, c]

        matched: set[int] = set()
        glamm_matched: set[int] = set()
        n_text = min(len(pred.phrases), len(pred.masks))  # i-th phrase owns i-th mask
        if gt_texts and n_text:
            sims = encoder.encode(gt_texts) @ encoder.encode(list(pred.phrases[:n_text])).T
            text_ious = ious[:, :n_text]
            admissible = (text_ious >= iou_threshold) & (sims >= text_threshold)
            matched = {r for r, _ in greedy_pairs(text_ious, admissible)}
            glamm_matched = set(_glamm_recall_matches(text_ious, sims, iou_threshold,
                                                      text_threshold))

        overall.add_image(range(len(gt_rles)), gt_ious, matched, glamm_matched)
        for name, tally in by_subset.items():
            rows = [r for r, subset in enumerate(subsets) if subset == name]
            if rows:
                tally.add_image(rows, gt_ious, matched, glamm_matched)
        ap_images.append((gt_rles, subsets, list(pred.masks), _prediction_owners(ious, subsets)))

    if counts["unknown_predictions"]:
        log.warning("%d predictions name images that are not in the ground truth",
                    counts["unknown_predictions"])
    counts["gt_phrases"], counts["matched"] = overall.phrases, overall.matched
    n_gt = overall.phrases
    result: dict[str, Any] = {
        "ap50": _ap50([(gt, pred) for gt, _, pred, _ in ap_images]) if n_gt else None,
        **overall.figures(),
        "text_encoder": getattr(encoder, "name", type(encoder).__name__),
        "text_threshold": text_threshold,
        "iou_threshold": iou_threshold,
    }
    for name, tally in by_subset.items():
        subset_images, ignored = [], 0
        for gt_rles, subsets, pred_rles, owners in ap_images:
            kept = [rle for rle, owner in zip(pred_rles, owners) if not owner or name in owner]
            ignored += len(pred_rles) - len(kept)
            subset_images.append(([rle for rle, subset in zip(gt_rles, subsets)
                                   if subset == name], kept))
        result[name] = {"ap50": _ap50(subset_images) if tally.phrases else None,
                        **tally.figures(), "phrases": tally.phrases, "images": tally.images,
                        "ignored_pred_masks": ignored}
    if captions and ground_truth:
        references = {item.record_id: plain_caption(item.caption) for item in ground_truth}
        candidates = {k: plain_caption(by_id[k].caption) if k in by_id else "" for k in references}
        caption_scores, skipped = score_captions(references, candidates)
    else:
        caption_scores = {name: None for name in CAPTION_METRICS}
        skipped = {name: "not requested" if not captions else "no images"
                   for name in CAPTION_METRICS}
    result.update(caption_scores)
    for name, reason in skipped.items():
        if captions:
            log.warning("%s skipped: %s", name, reason)
    result["computed"] = [k for k in ("ap50", "miou", "miou_glamm", "recall", "recall_glamm",
                                      *CAPTION_METRICS) if result[k] is not None]
    result["skipped"] = skipped
    result["counts"] = counts
    return result


def run_evaluate(records_dir: Path, split: str, predictions_path: Path, out_path: Path,
                 encoder: TextEncoder | None = None, captions: bool = True) -> dict:
    """Evaluate a predictions file against one split's records; write the metrics as JSON.

    The default encoder is GLaMM's (BERT), which the reported figures need.
    """
    metrics = evaluate_gcg(load_ground_truth(records_dir, split),
                           load_predictions(predictions_path),
                           encoder if encoder is not None else BertMeanPoolEncoder(),
                           captions=captions)
    write_json(Path(out_path), {"split": split, "predictions": str(predictions_path), **metrics})
    return metrics


# ---------------------------------------------------------------------------------------------
# The `evaluate` stage: a checkpoint's predictions (or a given predictions file) -> DVC metrics

EXPORT_GT_COLUMNS = ["record_id", "split", "caption", "phrases", "masks"]
EXPORT_TARGET_COLUMN = "object_ids"  # optional: without it, instances are counted on the masks


def load_split_ground_truth(records_dir: Path, split: str) -> list[GTItem]:
    """Ground truth of one split from GroundedRecord shards or from export Parquet shards.

    Each phrase's instance count is `len(object_ids)` (None where a shard has no object ids).
    """
    import pyarrow.parquet as pq

    records_dir = Path(records_dir)
    shards = list_shards(records_dir, split)
    if not shards:
        raise EmptyInputError(f"no {split!r} shards", path=records_dir)
    if "image" not in pq.ParquetFile(shards[0]).schema_arrow.names:
        return load_ground_truth(records_dir, split)
    items = []
    for shard in shards:
        columns = list(EXPORT_GT_COLUMNS)
        if EXPORT_TARGET_COLUMN in pq.ParquetFile(shard).schema_arrow.names:
            columns.append(EXPORT_TARGET_COLUMN)
        for row in pq.read_table(shard, columns=columns).to_pylist():
            if len(row["phrases"]) != len(row["masks"]):
                raise BadAnnotationError(f"record {row['record_id']}: {len(row['phrases'])} "
                                         f"phrases but {len(row['masks'])} masks", path=shard)
            object_ids = row.get(EXPORT_TARGET_COLUMN)
            if object_ids is not None and len(object_ids) != len(row["phrases"]):
                raise BadAnnotationError(f"record {row['record_id']}: {len(row['phrases'])} "
                                         f"phrases but {len(object_ids)} object id lists",
                                         path=shard)
            items.append(GTItem(row["record_id"], row["caption"],
                                [(text, RLE(**m)) for text, m in zip(row["phrases"],
                                                                     row["masks"])],
                                [len(ids) or None if ids is not None else None
                                 for ids in object_ids] if object_ids is not None else None))
    return items


def encoder_from_params(evaluate: Any) -> TextEncoder:
    """The phrase encoder `evaluate.text_encoder` names."""
    if evaluate.text_encoder == "bag-of-words":
        return BagOfWordsEncoder()
    device = evaluate.device if evaluate.device != "auto" else "cpu"
    return BertMeanPoolEncoder(evaluate.bert_model_path, device=device)


def run_evaluate_stage(params: Any, records_dir: Path, checkpoint_dir: Path | None = None,
                       predictions_path: Path | None = None,
                       out_metrics: Path = Path("metrics/rs_gcg.json"),
                       out_dir: Path = Path("build/evaluate"),
                       encoder: TextEncoder | None = None, scheduler: str | None = None) -> dict:
    """The evaluate stage: RS-GCG metrics of split `evaluate.split`, written as DVC metrics.

    Predictions come from `predictions_path` when given, else are generated from the
    fine-tuned checkpoint in `checkpoint_dir` (`finetune.predict`, needs the `[train]` extra)
    into `out_dir/predictions.json`. `records_dir` holds the split's GroundedRecord shards or
    export Parquet shards; generating needs the latter (it has the images). With neither a
    predictions file nor a trained checkpoint (the finetune stage was skipped) the stage is
    skipped: one line on stderr, and metrics that say `"evaluated": false`. `out_dir` (with
    its report.json, the metrics again) is written whole either way, so DVC finds its outs.
    `skipped` in the metrics lists the caption metrics that were not computed, and why.
    Generating runs as one task of the run's dask cluster when there is one (a GPU worker:
    `runner.model_resources`), else here.
    """
    import sys

    from pipeline.core.output_folders import check_output_file
    from pipeline.core.stage import Stage

    ev = params.evaluate
    out_dir = Path(out_dir)
    stage = Stage("evaluate", params, scheduler, holds_model=True)
    check_output_file(out_metrics, [records_dir, checkpoint_dir, predictions_path])
    with stage.output(out_dir, inputs=[records_dir, checkpoint_dir, predictions_path]) as out:
        staging = out.folder
        if predictions_path is not None:
            source: dict[str, Any] = {"predictions": str(predictions_path)}
            read_from = Path(predictions_path)
        elif checkpoint_dir is not None and (Path(checkpoint_dir) / "geopixel.json").is_file():
            from finetune.predict import run_predict

            read_from = staging / "predictions.json"
            generated = stage.call(run_predict, Path(checkpoint_dir), Path(records_dir),
                                   read_from, ev, label="evaluate predict")
            source = {"checkpoint": str(checkpoint_dir),
                      "predictions": str(out_dir / "predictions.json"), "generation": generated}
        else:
            reason = ("no predictions file and no trained checkpoint"
                      + (f" in {checkpoint_dir}" if checkpoint_dir is not None else ""))
            print(printable(f"evaluate skipped: {reason}"), file=sys.stderr)
            result = out.report = {"evaluated": False, "reason": reason}
            read_from = None
        if read_from is not None:
            ground_truth = load_split_ground_truth(Path(records_dir), ev.split)
            if ev.max_records:
                ground_truth = ground_truth[:ev.max_records]
            wanted = {g.record_id for g in ground_truth}
            predictions = [p for p in load_predictions(read_from)
                           if p.record_id in wanted or not ev.max_records]
            metrics = evaluate_gcg(ground_truth, predictions,
                                   encoder if encoder is not None else encoder_from_params(ev),
                                   text_threshold=ev.text_threshold,
                                   iou_threshold=ev.iou_threshold, captions=ev.captions)
            result = out.report = {"evaluated": True, "split": ev.split, **source, **metrics}
    write_json(Path(out_metrics), result)
    return result
