"""QA stage: `metrics/qa.json` (DVC metrics), DVC plot tables, and the HTML report.

Reads the records that get exported (compose's output, or the review stage's once it exists),
the drops, and, when given, the tiles (images, objects), the annotators' responses (calls,
tokens, cost, cleaning) and the review report. Every leaf of qa.json is a number, so that
`dvc metrics diff` between two parameter settings shows what changed.

Metric definitions:
- caption `chars`: length of the caption as stored, tags included (as GeoPixelD's bot text);
  `plain_chars`: without `<p>`, `</p>`, `[SEG]`, whitespace collapsed.
- words: runs of letters (an apostrophe inside kept) of the plain, lower-cased caption, so
  "small vehicle-1" is two words; sentences: the plain text's sentences as the annotator
  cleaning splits them (`pipeline.core.text.split_sentences`: no split after an abbreviation
  or a single letter), those that hold a letter.
- vocabulary size: distinct words over all captions; distinct-n: distinct word n-grams / all
  word n-grams over all captions (n-grams never cross captions); `fivegrams_top` and
  `frequent_fivegrams` as in `by_split` (below), over all captions.
- categories: `present` = categories of the tiles' objects, `grounded` = categories of the
  phrases, `coverage` = grounded / present.
- annotate `calls_per_record`: calls made for the tiles that became records, per record (the
  figure GeoPixelD reports per annotated patch); `calls_per_tile`: all calls per tile;
  `tokens_per_record` and `cost_usd_per_record`: ALL tokens and cost, dropped tiles included,
  per exported record (what a record costs).
- backends: share of records made by each backend (the record's provenance).
- review: exported records by review status, plus every number of the review stage's report.
- reference: GeoPixelD's published figures (`shared/docs/geopixeld.md`, "Scale to match"),
  mirrored by `by_split` for our splits (compared per `qa.reference_splits`). `by_split` also
  holds `plain_caption_chars_mean` (shown beside GeoPixelD's mean caption length, whose
  counting of tags was not published) and wording variety: `fivegrams_top`, the
  `qa.fivegram_top` most repeated word five-grams (words as above, each counted once per
  caption) with their share of the split's captions, and `frequent_fivegrams`, how many
  five-grams are in more than `qa.fivegram_share` of them (boilerplate).
- claims: what each caption says about its grounded phrases (position, count, category,
  colour, size), checked against the phrases' masks and the tile's measurements
  (`pipeline.geometry.claims`, which states the rules): per type the claims `checked`, the
  share that `agree` (0 when none), and how many `disagree`; over all types the same, plus
  `records_checked` and `records_with_failed`. Every claim and verdict is stored in
  `claims.parquet` in the report folder; the report and the review notebook list records with
  failed claims first. Without tiles, only category, count and single-instance positions are
  checked.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.errors import BadRecordError, BadReportError
from pipeline.core.imaging import decode_png
from pipeline.core.output_folders import check_output_file
from pipeline.core.params import Params, QAParams
from pipeline.core.requests import by_call
from pipeline.core.shards import atomic_path, read_records, safe_join, safe_name, write_json
from pipeline.core.stage import Stage
from pipeline.core.text import csv_cell, split_sentences
from pipeline.core.user_files import MAX_REPORT_BYTES, read_user_json
from pipeline.formats.html_report import IMAGE_FOLDER, render_overlay, write_report
from pipeline.geometry import masks
from pipeline.geometry.claims import (
    CLAIM_TYPES,
    CLAIMS_FILE,
    Claim,
    RecordClaims,
    check_record,
    claim_rows,
    failed,
    failed_first,
    write_claims,
)
from pipeline.geometry.measure import measure_tile
from pipeline.geometry.priors import instance_masks
from schemas import (
    PASSES,
    SEG,
    DroppedRecord,
    GroundedRecord,
    Response,
    Tile,
    TileMeasurements,
    TilePlan,
)

STAGE = "qa"
REVIEW_STATUSES = ("unreviewed", "accepted", "edited")
PLOTS = ("caption_length.csv", "phrases_per_category.csv", "drop_reasons.csv")

# GeoPixelD's published scale (shared/docs/geopixeld.md, "Scale to match"). The test split's
# patch count was not published, so its per-record figures are left out, not guessed.
_TRAIN_PATCHES, _TRAIN_PHRASES = 16_795, 53_816
GEOPIXELD_REFERENCE: dict[str, dict] = {
    "train": {
        "records": _TRAIN_PATCHES,
        "phrases": _TRAIN_PHRASES,
        "instance_phrases": 36_793,
        "cluster_phrases": 17_023,
        "objects": 600_817,
        "caption_chars_mean": 740,
        "phrases_per_record": round(_TRAIN_PHRASES / _TRAIN_PATCHES, 4),
        "instance_share": round(36_793 / _TRAIN_PHRASES, 4),
        "objects_per_record": round(600_817 / _TRAIN_PATCHES, 4),
        "calls_per_record": {"holistic": 1.0, "instance": 2.2, "cluster": 1.0, "total": 4.2},
    },
    "test": {"phrases": 5_427, "objects": 61_384, "caption_chars_mean": 647},
}

_TAG_RE = re.compile(r"<p>|</p>|\[SEG\]")
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")
_DECIMALS = 4


# ---------------------------------------------------------------------------------------------
# What the per-shard task learns about each record and shard (small, picklable).


@dataclass(frozen=True)
class PhraseFacts:
    text: str
    kind: str
    category: str
    objects: int
    area_share: float  # share of the tile's pixels under the phrase's mask


@dataclass(frozen=True)
class RecordFacts:
    """One exported record, as the metrics and the report need it."""

    record_id: str
    tile_id: str
    split: str
    backend: str
    model: str
    review: str
    caption: str
    phrases: tuple[PhraseFacts, ...]
    tile_objects: Optional[int] = None  # objects in the record's tile (None: no tiles given)
    calls: dict[str, int] = field(default_factory=dict)  # annotation calls for its tile, by kind
    image: Optional[str] = None  # report image, relative to the report folder (None: not shown)
    image_size: tuple[int, int] = (0, 0)  # (width, height) of that image
    claims: tuple[Claim, ...] = ()  # what the caption claims about its phrases, checked

    @property
    def failed_claims(self) -> list[Claim]:
        return failed(self.claims)


@dataclass(frozen=True)
class ShardFacts:
    records: list[RecordFacts]
    drops: list[DroppedRecord]
    tiles: Optional[int]
    tile_categories: dict[str, int]  # category -> tiles holding at least one such object
    calls: dict[str, int]            # all annotation calls, by kind
    failed_calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


# ---------------------------------------------------------------------------------------------
# Text measures


def plain_text(caption: str) -> str:
    """The caption without grounding tags, whitespace collapsed."""
    return " ".join(_TAG_RE.sub(" ", caption).split())


def words(text: str) -> list[str]:
    """Lower-cased runs of letters (see the module docstring)."""
    return _WORD_RE.findall(text.lower())


def sentences(text: str) -> list[str]:
    """Sentences of plain text that hold a letter (`pipeline.core.text.split_sentences`)."""
    return [s for s in split_sentences(text) if re.search(r"[A-Za-z]", s)]


def frequent_ngrams(token_lists: Sequence[Sequence[str]], n: int, top: int,
                    share: float) -> tuple[dict[str, float], int]:
    """The `top` n-grams found in the most lists (each counted once per list), with the share
    of lists holding them (ties by text), and how many n-grams are in more than `share` of the
    lists."""
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update({" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)})
    total = len(token_lists)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    frequent = sum(1 for c in counts.values() if total and c / total > share)
    return {gram: _ratio(c, total) for gram, c in ranked}, frequent


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float:
    """Distinct n-grams / all n-grams, over all lists (no n-gram crosses two lists)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in token_lists:
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return _ratio(len(seen), total)


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean, median, p95, min, max (all 0 for no values)."""
    if not len(values):
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "min": 0.0, "max": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": _round(arr.mean()), "median": _round(np.median(arr)),
            "p95": _round(np.percentile(arr, 95)), "min": _round(arr.min()),
            "max": _round(arr.max())}


def _round(value: float) -> float:
    return round(float(value), _DECIMALS)


def _ratio(a: float, b: float) -> float:
    return _round(a / b) if b else 0.0


def numeric_leaves(value: object) -> object:
    """`value` with only its numeric leaves (bools as 0/1); None when nothing numeric is left.
    Keeps another stage's report usable as DVC metrics whatever else it holds."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        kept = {str(k): numeric_leaves(v) for k, v in value.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    return None


# ---------------------------------------------------------------------------------------------
# Per-shard task


def _plan_measurements(plan_tiles: Optional[Path]) -> dict[str, TileMeasurements]:
    """Tile id -> the measurements plan took of it (`TilePlan.measurements`), from one plan
    shard (none: no shard, or plans written before measurements were stored)."""
    if plan_tiles is None or not plan_tiles.is_file():
        return {}
    return {p.tile_id: p.measurements for p in read_records(plan_tiles, TilePlan,
                                                            skip_bytes=("som_png",))
            if p.measurements is not None}


def qa_shard(shard: tuple[str, int], *, params: QAParams, records_dir: Path,
             tiles_dir: Optional[Path], responses_dir: Optional[Path],
             drop_dirs: tuple[Path, ...], report_dir: Optional[Path],
             plan_dir: Optional[Path] = None, grid: int = 3) -> ShardFacts:
    """Facts of one shard `(name, render)`; writes the report images of its first `render`
    records into `report_dir`. Claims are checked against the measurements plan stored
    (`plan_dir/tiles`); a tile plan did not measure is measured here (on a `grid` grid, the
    planner's)."""
    name, render = shard

    records_path = records_dir / name
    records = read_records(records_path, GroundedRecord)
    planned = _plan_measurements(plan_dir / "tiles" / name if plan_dir is not None else None)
    tiles: dict[str, Tile] = {}
    tile_categories: Counter[str] = Counter()
    if tiles_dir is not None:
        for tile in read_records(tiles_dir / name, Tile):
            tiles[tile.tile_id] = tile
            tile_categories.update({o.category for o in tile.objects})

    calls_by_tile: dict[str, Counter] = {}
    all_calls: Counter[str] = Counter()
    spent = {"failed": 0, "cached": 0, "prompt": 0, "completion": 0, "cost": 0.0}
    if responses_dir is not None:
        for kind in PASSES:
            responses = read_records(responses_dir / kind / name, Response)
            # the per-mark answers of one batched-marks request are one call
            for call in by_call(responses):
                calls_by_tile.setdefault(call[0].tile_id, Counter())[kind] += 1
                all_calls[kind] += 1
                spent["failed"] += all(r.status == "failed" for r in call)
                spent["cached"] += all(r.cached for r in call)
            for r in responses:
                spent["prompt"] += r.usage.prompt_tokens
                spent["completion"] += r.usage.completion_tokens
                spent["cost"] += r.cost_usd

    drops: dict[tuple[str, str, str], DroppedRecord] = {}
    for folder in drop_dirs:
        if (folder / name).is_file():
            for d in read_records(folder / name, DroppedRecord):
                drops.setdefault((d.tile_id, d.stage, d.reason), d)

    checked: list[tuple[Claim, ...]] = []
    for i, record in enumerate(records):
        tile = tiles.get(record.tile_id)
        if tiles_dir is not None and tile is None:
            raise BadRecordError(f"record {record.record_id} names tile {record.tile_id}, "
                                 f"which is not in {tiles_dir / name}", records_path)
        measured = planned.get(record.tile_id)
        if measured is None and tile is not None:  # decoded again to draw it, if shown
            measured = measure_tile(decode_png(tile.image_png), instance_masks(
                tile.tile_id, tile.height, tile.width, tile.objects), tile.image_sha256, grid)
        checked.append(tuple(check_record(record, measured, params)))
    # the report's images go to records with failed claims first (the shard's share of
    # qa.max_tiles), then in shard order
    shown = set(failed_first(range(len(records)), lambda i: checked[i])[:render])

    facts = []
    for i, record in enumerate(records):
        tile = tiles.get(record.tile_id)
        height, width = record.phrases[0].mask.size if record.phrases else (0, 0)
        pixels = height * width
        image, image_size = None, (0, 0)
        if report_dir is not None and i in shown:
            picture = decode_png(tile.image_png) if tile is not None else None
            jpeg, image_size = render_overlay(picture, record.phrases, params,
                                              where=str(records_path))
            image = f"{IMAGE_FOLDER}/{safe_name(record.tile_id, 'tile id')}.jpg"
            with atomic_path(safe_join(report_dir, image)) as tmp:
                tmp.write_bytes(jpeg)
        facts.append(RecordFacts(
            record_id=record.record_id, tile_id=record.tile_id, split=record.split,
            backend=record.provenance.backend, model=record.provenance.model,
            review=record.review, caption=record.caption,
            phrases=tuple(PhraseFacts(text=p.text, kind=p.kind, category=p.category,
                                      objects=len(p.object_ids),
                                      area_share=masks.area(p.mask) / pixels if pixels else 0.0)
                          for p in record.phrases),
            tile_objects=len(tile.objects) if tile is not None else None,
            calls=dict(calls_by_tile.get(record.tile_id, {})),
            image=image, image_size=image_size, claims=checked[i]))
    return ShardFacts(
        records=facts, drops=list(drops.values()),
        tiles=len(tiles) if tiles_dir is not None else None,
        tile_categories=dict(tile_categories), calls=dict(all_calls),
        failed_calls=spent["failed"], cached_calls=spent["cached"],
        prompt_tokens=spent["prompt"], completion_tokens=spent["completion"],
        cost_usd=spent["cost"])


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


def _split_figures(records: Sequence[RecordFacts], with_calls: bool, params: QAParams) -> dict:
    """The figures GeoPixelD published, for one set of records (same keys as the reference),
    the plain caption length and the wording variety."""
    n = len(records)
    plain = [plain_text(r.caption) for r in records]
    top, frequent = frequent_ngrams([words(t) for t in plain], 5, params.fivegram_top,
                                    params.fivegram_share)
    phrases = [p for r in records for p in r.phrases]
    instance = sum(p.kind == "instance" for p in phrases)
    objects = sum(p.objects for p in phrases)
    figures = {
        "records": n,
        "phrases": len(phrases),
        "instance_phrases": instance,
        "cluster_phrases": len(phrases) - instance,
        "objects": objects,
        "caption_chars_mean": _ratio(sum(len(r.caption) for r in records), n),
        "plain_caption_chars_mean": _ratio(sum(len(t) for t in plain), n),
        "fivegrams_top": top,
        "frequent_fivegrams": frequent,
        "phrases_per_record": _ratio(len(phrases), n),
        "instance_share": _ratio(instance, len(phrases)),
        "objects_per_record": _ratio(objects, n),
    }
    if with_calls:
        figures["calls_per_record"] = _calls_per(records, n)
    return figures


def _calls_per(records: Sequence[RecordFacts], n: int) -> dict[str, float]:
    calls = Counter()
    for r in records:
        calls.update(r.calls)
    per = {k: _ratio(calls[k], n) for k in PASSES}
    per["total"] = _ratio(sum(calls[k] for k in PASSES), n)
    return per


def qa_metrics(shards: Sequence[ShardFacts], *, compose_report: Optional[dict] = None,
               annotate_reports: Optional[dict[str, dict]] = None,
               review_report: Optional[dict] = None, with_tiles: bool = False,
               with_responses: bool = False, params: Optional[QAParams] = None) -> dict:
    """qa.json from the shards' facts and the earlier stages' reports (all leaves numbers)."""
    params = params or QAParams()
    records = [r for s in shards for r in s.records]
    drops = [d for s in shards for d in s.drops]
    phrases = [p for r in records for p in r.phrases]
    n, n_phrases = len(records), len(phrases)
    tiles = sum(s.tiles or 0 for s in shards) if with_tiles else n + len(drops)

    plain = [plain_text(r.caption) for r in records]
    tokens = [words(t) for t in plain]
    fivegrams_top, frequent_fivegrams = frequent_ngrams(tokens, 5, params.fivegram_top,
                                                        params.fivegram_share)
    instance = [p for p in phrases if p.kind == "instance"]
    cluster = [p for p in phrases if p.kind == "cluster"]
    grounded_objects = sum(p.objects for p in phrases)

    metrics: dict = {
        "records": n,
        "tiles": tiles,
        "dropped": {
            "total": len(drops),
            "rate": _ratio(len(drops), n + len(drops)),
            "by_reason": dict(sorted(Counter(d.reason for d in drops).items())),
            "phrases_skipped": numeric_leaves((compose_report or {}).get("phrases_skipped"))
            or {},
        },
        "phrases": {
            "total": n_phrases,
            "per_record_mean": _ratio(n_phrases, n),
            "instance": len(instance),
            "cluster": len(cluster),
            "instance_share": _ratio(len(instance), n_phrases),
            "objects_per_phrase_mean": _ratio(grounded_objects, n_phrases),
            "objects_per_cluster_phrase_mean": _ratio(sum(p.objects for p in cluster),
                                                      len(cluster)),
            "seg_per_phrase": _ratio(sum(r.caption.count(SEG) for r in records), n_phrases),
            "mask_area_share_mean": _ratio(sum(p.area_share for p in phrases), n_phrases),
        },
        "objects": {
            "grounded": grounded_objects,
            "grounded_per_record_mean": _ratio(grounded_objects, n),
        },
        "caption": {
            "chars": summary([len(r.caption) for r in records]),
            "plain_chars": summary([len(t) for t in plain]),
            "words": summary([len(t) for t in tokens]),
            "sentences": summary([len(sentences(t)) for t in plain]),
        },
        "vocabulary": {
            "size": len({w for t in tokens for w in t}),
            "distinct_1": distinct_n(tokens, 1),
            "distinct_2": distinct_n(tokens, 2),
            "fivegrams_top": fivegrams_top,
            "frequent_fivegrams": frequent_fivegrams,
        },
        "categories": {"grounded": len({p.category for p in phrases})},
        "backends": {b: _ratio(c, n)
                     for b, c in sorted(Counter(r.backend for r in records).items())},
        "review": {"exported": {s: sum(r.review == s for r in records) for s in REVIEW_STATUSES}},
        "by_split": {split: _split_figures([r for r in records if r.split == split],
                                           with_responses, params)
                     for split in sorted({r.split for r in records})},
        "claims": claim_metrics(records),
        "reference": {"geopixeld": GEOPIXELD_REFERENCE},
    }
    if with_tiles:
        in_tiles = sum(r.tile_objects or 0 for r in records)
        present = set().union(*(s.tile_categories for s in shards)) if shards else set()
        metrics["objects"]["in_record_tiles"] = in_tiles
        metrics["objects"]["grounded_share"] = _ratio(grounded_objects, in_tiles)
        metrics["categories"]["present"] = len(present)
        metrics["categories"]["coverage"] = _ratio(metrics["categories"]["grounded"], len(present))
    if with_responses:
        metrics["annotate"] = _annotate_metrics(shards, records, tiles)
    metrics["cleaning"] = _cleaning_metrics(annotate_reports or {})
    if review_report is not None:
        metrics["review"].update(numeric_leaves(review_report) or {})
    return metrics


def claim_metrics(records: Sequence[RecordFacts]) -> dict:
    """Claims checked, the share that agree and how many disagree, over all types and per
    type; records with at least one claim checked, and with at least one failed."""
    claims = [c for r in records for c in r.claims]

    def block(found: Sequence[Claim]) -> dict:
        bad = sum(c.failed for c in found)
        return {"checked": len(found), "agree": _ratio(len(found) - bad, len(found)),
                "disagree": bad}

    return {**block(claims),
            "records_checked": sum(bool(r.claims) for r in records),
            "records_with_failed": sum(bool(r.failed_claims) for r in records),
            **{t: block([c for c in claims if c.type == t]) for t in CLAIM_TYPES}}


def _annotate_metrics(shards: Sequence[ShardFacts], records: Sequence[RecordFacts],
                      tiles: int) -> dict:
    n = len(records)
    calls = Counter()
    for s in shards:
        calls.update(s.calls)
    total_calls = {k: calls[k] for k in PASSES}
    total_calls["total"] = sum(total_calls.values())
    prompt = sum(s.prompt_tokens for s in shards)
    completion = sum(s.completion_tokens for s in shards)
    cost = sum(s.cost_usd for s in shards)
    return {
        "calls": total_calls,
        "calls_per_tile": {k: _ratio(v, tiles) for k, v in total_calls.items()},
        "calls_per_record": _calls_per(records, n),
        "failed_calls": sum(s.failed_calls for s in shards),
        "cached_calls": sum(s.cached_calls for s in shards),
        "tokens": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        "tokens_per_record": {"prompt": _ratio(prompt, n), "completion": _ratio(completion, n),
                              "total": _ratio(prompt + completion, n)},
        "cost_usd": round(cost, 6),
        "cost_usd_per_record": round(cost / n, 6) if n else 0.0,
    }


def _cleaning_metrics(reports: dict[str, dict]) -> dict:
    """Output cleaning and API retries, summed over the annotate passes' backend_stats."""
    refusals, fixes, retries = Counter(), Counter(), Counter()
    sums = Counter()
    for report in reports.values():
        stats = report.get("backend_stats") or {}
        refusals.update(numeric_leaves(stats.get("cleaning_refusals")) or {})
        fixes.update(numeric_leaves(stats.get("cleaning_fixes")) or {})
        retries.update(numeric_leaves(stats.get("retries")) or {})
        for key in ("http_attempts", "cache_hits", "answered", "failed"):
            value = stats.get(key)
            sums[key] += value if isinstance(value, (int, float)) else 0
    return {"refusals": dict(sorted(refusals.items())), "refusals_total": sum(refusals.values()),
            "fixes": dict(sorted(fixes.items())), "fixes_total": sum(fixes.values()),
            "retries": dict(sorted(retries.items())), "retries_total": sum(retries.values()),
            **{k: sums[k] for k in ("http_attempts", "cache_hits", "answered", "failed")}}


# ---------------------------------------------------------------------------------------------
# DVC plot tables (pure)


def plot_tables(shards: Sequence[ShardFacts], params: QAParams) -> dict[str, list[dict]]:
    """Rows of each DVC plot file: caption length histogram, phrases per category, drops."""
    records = [r for s in shards for r in s.records]
    width = params.caption_bin_chars
    bins = Counter(len(r.caption) // width for r in records)
    top = max(bins, default=-1)
    histogram = [{"chars": b * width, "records": bins[b]} for b in range(top + 1)]

    per_category: dict[str, Counter] = {}
    for p in (p for r in records for p in r.phrases):
        c = per_category.setdefault(p.category, Counter())
        c["phrases"] += 1
        c[p.kind] += 1
        c["objects"] += p.objects
    categories = [{"category": k, "phrases": c["phrases"], "instance": c["instance"],
                   "cluster": c["cluster"], "objects": c["objects"]}
                  for k, c in sorted(per_category.items(),
                                     key=lambda kv: (-kv[1]["phrases"], kv[0]))]

    reasons = Counter(d.reason for s in shards for d in s.drops)
    drops = [{"reason": k, "tiles": v}
             for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"caption_length.csv": histogram, "phrases_per_category.csv": categories,
            "drop_reasons.csv": drops}


PLOT_COLUMNS = {
    "caption_length.csv": ("chars", "records"),
    "phrases_per_category.csv": ("category", "phrases", "instance", "cluster", "objects"),
    "drop_reasons.csv": ("reason", "tiles"),
}


def write_plot(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """One DVC plot file (CSV with a header, even when it has no rows). Every CSV file of the
    pipeline is written here: a text cell a spreadsheet would read as a formula (a category
    named `=HYPERLINK(...)`) gets a leading `'` (`pipeline.core.text.csv_cell`, OWASP's rule)."""
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return path


# ---------------------------------------------------------------------------------------------
# The stage


def _read_report(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    data = read_user_json(path, "stage report", max_bytes=MAX_REPORT_BYTES, error=BadReportError)
    return data if isinstance(data, dict) else None


def _render_budget(records_dir: Path, names: Sequence[str], limit: Optional[int]) -> list[int]:
    """How many of each shard's records get a report image: all, or the first `limit`."""
    budget = []
    left = math.inf if limit is None else limit
    for name in names:
        rows = pq.ParquetFile(records_dir / name).metadata.num_rows
        take = int(min(rows, left))
        budget.append(take)
        left -= take
    return budget


def run_qa(params: Params, records_dir: Path, out_metrics: Path, out_plots_dir: Path,
           out_report_dir: Path, *, tiles_dir: Optional[Path] = None,
           responses_dir: Optional[Path] = None, compose_dir: Optional[Path] = None,
           review_dir: Optional[Path] = None, plan_dir: Optional[Path] = None,
           scheduler: str | None = None) -> dict:
    """Check the records that get exported; write qa.json, the plot CSVs, the HTML report and
    the claims file (`claims.parquet` in the report folder: every claim checked, and its verdict).

    `records_dir`: the records export reads (build/records, or build/reviewed). `compose_dir`
    (default `records_dir`): compose's output, for its drops and report. `review_dir`: the
    review stage's output, for its report. `plan_dir`: plan's output, whose tile plans hold the
    measurements claims are checked against (without it, or for a tile it lacks, the tile is
    measured again). Drops are read from `compose_dir/dropped` and `records_dir/dropped`.
    Returns the stage's report (also written to the report folder).
    """
    records_dir = Path(records_dir)
    compose_dir = Path(compose_dir) if compose_dir is not None else records_dir
    stage = Stage(STAGE, params, scheduler)
    names = [p.name for p in stage.shards(records_dir, "no record shards to check (run "
                                          "compose first)")]
    needed: list[Path] = []
    if tiles_dir is not None:
        needed += [Path(tiles_dir) / n for n in names]
    if responses_dir is not None:
        needed += [Path(responses_dir) / k / n for k in PASSES for n in names]
    for path in needed:
        stage.need(path, f"missing shard for record shard {path.name} (run the earlier stages "
                   "first)")

    drop_dirs = tuple(dict.fromkeys([compose_dir / "dropped", records_dir / "dropped"]))
    annotate_reports = {}
    if responses_dir is not None:
        for kind in PASSES:
            report = _read_report(Path(responses_dir) / kind / "report.json")
            if report is not None:
                annotate_reports[kind] = report
    review_report = _read_report(Path(review_dir) / "report.json") if review_dir else None
    budget = _render_budget(records_dir, names, params.qa.max_tiles)

    inputs = [records_dir, compose_dir, tiles_dir, responses_dir, review_dir, plan_dir]
    check_output_file(out_metrics, inputs)
    with stage.output(Path(out_report_dir), inputs=inputs, count_key="records") as out:
        staging = out.folder
        (staging / IMAGE_FOLDER).mkdir()
        task = partial(qa_shard, params=params.qa, records_dir=records_dir,
                       tiles_dir=Path(tiles_dir) if tiles_dir is not None else None,
                       responses_dir=Path(responses_dir) if responses_dir is not None else None,
                       drop_dirs=drop_dirs, report_dir=staging,
                       plan_dir=Path(plan_dir) if plan_dir is not None else None,
                       grid=params.plan.grid)
        shards = stage.map(task, list(zip(names, budget)))
        metrics = qa_metrics(shards, compose_report=_read_report(compose_dir / "report.json"),
                             annotate_reports=annotate_reports, review_report=review_report,
                             with_tiles=tiles_dir is not None,
                             with_responses=responses_dir is not None, params=params.qa)
        tables = plot_tables(shards, params.qa)
        pages = write_report(staging, shards, metrics, tables, params.qa)
        write_claims(staging / CLAIMS_FILE, [
            row for s in shards for r in s.records for row in claim_rows(RecordClaims(
                record_id=r.record_id, tile_id=r.tile_id, split=r.split,
                phrase_texts=tuple(p.text for p in r.phrases), claims=r.claims))])
        report = out.report = {
            "stage": STAGE, "shards": len(names), "records": metrics["records"],
            "dropped": metrics["dropped"]["total"], "pages": pages,
            "tiles_shown": sum(1 for s in shards for r in s.records if r.image),
            "claims_failed_records": metrics["claims"]["records_with_failed"]}

    with stage.output(Path(out_plots_dir), inputs=inputs, name="qa-plots") as plots:
        for file_name, rows in tables.items():
            write_plot(plots.folder / file_name, rows, PLOT_COLUMNS[file_name])
    write_json(Path(out_metrics), metrics)
    return report

