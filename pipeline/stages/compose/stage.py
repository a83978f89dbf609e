"""Compose: merge the holistic, instance and cluster texts of a tile into one grounded paragraph,
align the i-th [SEG] with the i-th mask, and validate the record.

The stage: per shard, read tiles, plans, requests and answers, compose each tile with the
configured strategy (`compose.composer`: the deterministic `wording.compose` or the LLM
composer in `llm`), and write records and drops.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

from pipeline.core.errors import GeoPixelDError
from pipeline.core.failure_policy import check_compose
from pipeline.core.params import CacheParams, ComposeParams, Params
from pipeline.core.shards import read_records, write_records
from pipeline.core.stage import Stage
from pipeline.stages.compose.grounding import Groundings, tile_groundings, tile_provenance
from pipeline.stages.compose.llm import compose_with_llm, draft
from pipeline.stages.compose.wording import STAGE, compose
from schemas import (
    PASSES,
    DroppedRecord,
    GroundedRecord,
    Provenance,
    Request,
    Response,
    Tile,
    TilePlan,
)


def compose_tile(tile: Tile, plan: TilePlan, requests: Sequence[Request],
                 responses: Sequence[Response], params: ComposeParams,
                 provenance: Provenance) -> GroundedRecord | DroppedRecord:
    """One tile's grounded record, or why it has none. Pure and deterministic."""
    return compose(tile, plan, requests, responses, params, provenance).record



def _inputs(name: str, tiles_dir: Path, plan_dir: Path, responses_dir: Path) -> dict[str, Path]:
    paths = {"tiles": tiles_dir / name, "plan": plan_dir / "tiles" / name}
    for kind in PASSES:
        paths[f"requests/{kind}"] = plan_dir / "requests" / kind / name
        paths[f"responses/{kind}"] = responses_dir / kind / name
    return paths


def compose_shard(name: str, params: Params, tiles_dir: Path, plan_dir: Path,
                  responses_dir: Path, staging: Path,
                  llm_cache: Optional[CacheParams] = None) -> dict:
    """Compose every tile of one shard; write its records and drops; return its counts.
    With `compose.composer: llm` the LLM rewrites each record this composer made (the
    response cache `llm_cache`, default annotate.cache), keeping it wherever the LLM fails."""
    paths = _inputs(name, tiles_dir, plan_dir, responses_dir)
    # the tile's image is read only when the LLM composer is to see it
    with_image = params.compose.composer == "llm" and params.compose.llm_with_image
    tiles = read_records(paths["tiles"], Tile, skip_bytes=() if with_image else ("image_png",))
    plans = {p.tile_id: p for p in read_records(paths["plan"], TilePlan, skip_bytes=("som_png",))}
    requests: dict[str, list[Request]] = {}
    responses: dict[str, list[Response]] = {}
    for kind in PASSES:
        for r in read_records(paths[f"requests/{kind}"], Request):
            requests.setdefault(r.tile_id, []).append(r)
        for r in read_records(paths[f"responses/{kind}"], Response):
            responses.setdefault(r.tile_id, []).append(r)

    records, drops = [], []
    skipped: Counter[str] = Counter()
    drafts, slots = [], []  # tiles for the LLM composer, and where their records are
    for tile in tiles:
        plan = plans.get(tile.tile_id)
        if plan is None:
            drops.append(DroppedRecord(tile_id=tile.tile_id, split=tile.split, stage=STAGE,
                                       reason="no_plan", detail=f"not in {paths['plan']}"))
            continue
        reqs, resps = requests.get(tile.tile_id, []), responses.get(tile.tile_id, [])
        try:
            result = compose(tile, plan, reqs, resps, params.compose,
                             tile_provenance(params, reqs, resps))
        except GeoPixelDError as exc:
            if exc.path is None:
                raise type(exc)(exc.message, paths["plan"]) from None
            raise
        skipped.update(result.skipped)
        if isinstance(result.record, GroundedRecord) and params.compose.composer == "llm":
            found = tile_groundings(tile, plan, reqs, resps)
            if isinstance(found, Groundings):
                drafts.append(draft(tile, found, reqs, resps))
                slots.append(len(records))
        (records if isinstance(result.record, GroundedRecord) else drops).append(result.record)

    llm: Counter[str] = Counter()
    if drafts:
        composed, llm = compose_with_llm(drafts, params, llm_cache)
        for slot, record in zip(slots, composed):
            if record is not None:
                records[slot] = record
    write_records(staging / name, records, GroundedRecord)
    write_records(staging / "dropped" / name, drops, DroppedRecord)
    # what the failure policy weighs: tiles with objects that made no record
    with_objects = {t.tile_id for t in tiles if t.objects}
    lost = [d for d in drops if d.tile_id in with_objects]
    return {
        "tiles": len(tiles), "records": len(records),
        "tiles_with_objects": len(with_objects), "dropped_with_objects": len(lost),
        "first_drop": ({"tile_id": lost[0].tile_id, "reason": lost[0].reason,
                        "detail": lost[0].detail} if lost else None),
        "dropped": dict(Counter(d.reason for d in drops)),
        "phrases": dict(Counter(p.kind for r in records for p in r.phrases)),
        "phrases_skipped": dict(skipped),
        "objects_grounded": sum(len(p.object_ids) for r in records for p in r.phrases),
        "caption_chars": sum(len(r.caption) for r in records),
        "llm": dict(llm),
    }


def run_compose(params: Params, tiles_dir: Path, plan_dir: Path, responses_dir: Path,
                out_dir: Path, scheduler: str | None = None) -> dict:
    """Compose every tile shard into GroundedRecord shards (same names) + dropped/ + report.
    More tiles with objects dropped than `compose.max_dropped_share` allows raise BadRecordError
    and keep the previous `out_dir` (`pipeline.core.failure_policy`)."""
    tiles_dir, plan_dir = Path(tiles_dir), Path(plan_dir)
    responses_dir, out_dir = Path(responses_dir), Path(out_dir)
    names = [p.name for p in Stage.shards(tiles_dir, "no tile shards to compose")]
    for name in names:
        for what, path in _inputs(name, tiles_dir, plan_dir, responses_dir).items():
            Stage.need(path, f"missing {what} shard for tile shard {name} (run the earlier "
                       "stages first)")

    llm_cache, local, holds_model = None, None, False
    if params.compose.composer == "llm":
        from annotators.base import get_backend, local_scheduler_for
        from pipeline.stages.compose.llm import composer_backend

        # set-up mistakes stop here, before any work
        made = get_backend(composer_backend(params), cache=params.annotate.cache)
        local = local_scheduler_for(made, params.runner.local_scheduler)
        holds_model = made.loads_model
        # workers may run elsewhere: the cache path must not depend on their working folder
        llm_cache = params.annotate.cache.model_copy(
            update={"path": str(Path(params.annotate.cache.path).resolve())})
    stage = Stage(STAGE, params, scheduler, local_scheduler=local, holds_model=holds_model)

    with stage.output(out_dir, inputs=[tiles_dir, plan_dir, responses_dir],
                      count_key="records") as out:
        (out.folder / "dropped").mkdir()
        task = partial(compose_shard, params=params, tiles_dir=tiles_dir, plan_dir=plan_dir,
                       responses_dir=responses_dir, staging=out.folder, llm_cache=llm_cache)
        counts = stage.map(task, names)
        report = _report(counts)
        # too many tiles lost: raised here, the staged folder is dropped and out_dir kept
        check_compose(report, next((c["first_drop"] for c in counts if c.get("first_drop")),
                                   None), params.compose.max_dropped_share, out_dir)
        report["composer"] = params.compose.composer
        if params.compose.composer == "llm":
            llm = Stage.total(c["llm"] for c in counts)
            composed = llm.pop("composed", 0)
            report["llm"] = {"asked": composed + sum(llm.values()), "composed": composed,
                             "fallbacks": dict(sorted(llm.items()))}
        out.report = report
    return report


def _report(counts: list[dict]) -> dict:
    total: dict[str, Counter] = {k: Counter() for k in ("dropped", "phrases", "phrases_skipped")}
    sums: Counter[str] = Counter()
    for c in counts:
        for k in total:
            total[k].update(c[k])
        sums.update({k: c[k] for k in ("tiles", "records", "objects_grounded", "caption_chars",
                                       "tiles_with_objects", "dropped_with_objects")})
    records = sums["records"]
    return {
        "stage": STAGE,
        "shards": len(counts),
        "tiles": sums["tiles"],
        "records": records,
        "dropped_total": sum(total["dropped"].values()),
        "dropped": dict(sorted(total["dropped"].items())),
        "tiles_with_objects": sums["tiles_with_objects"],
        "dropped_with_objects": sums["dropped_with_objects"],
        "phrases": {"instance": total["phrases"]["instance"],
                    "cluster": total["phrases"]["cluster"]},
        "phrases_total": sum(total["phrases"].values()),
        "phrases_skipped": dict(sorted(total["phrases_skipped"].items())),
        "objects_grounded": sums["objects_grounded"],
        "mean_caption_chars": round(sums["caption_chars"] / records, 1) if records else 0.0,
    }

