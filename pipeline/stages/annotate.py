"""Stage annotate: answer one pass's requests (holistic, instance or cluster), shard by shard.

For each request shard `plan/requests/<kind>/<name>` it reads the plan shard of the same name
(set-of-marks images, and the measurements the template backend states) and the tiles shard (not
for a backend whose `needs_pixels` is False when every plan holds measurements), hands the whole
shard to the backend chosen in `annotate.backend` in one `annotate` call, and writes the
responses, in request order, to `<out>/<name>`. Backend set-up happens once per shard task, so
a backend with a client, a response cache or retries slots in without changing the stage.

A batched-marks request (`plan.batched_marks`, kind instance_batch) is answered in one call by a
backend that can (`answers_instance_batch`); any other backend gets the per-mark questions it
bundles and their answers are put together in the same JSON list, so compose reads one format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from annotators.base import REGISTRY, AnnotationContext, Backend, get_backend, local_scheduler_for
from pipeline.core.errors import BadParamsError, EmptyInputError
from pipeline.core.failure_policy import check_annotate
from pipeline.core.params import BackendParams, CacheParams, Params
from pipeline.core.runner import map_shards
from pipeline.core.shards import list_shards, read_records, staged_folder, write_json, write_records
from schemas import PASSES, Request, Response, Tile, TilePlan, Usage

# Failed requests listed by name in report.json (the rest are only counted).
REPORTED_FAILURES = 20


@dataclass(frozen=True)
class ShardJob:
    """One shard's work: where its inputs are and where its responses go."""

    name: str
    kind: str
    requests: Path
    tiles: Path
    plan: Path
    out: Path
    backend: BackendParams
    cache: CacheParams


def annotate_shard(job: ShardJob) -> dict:
    """Answer one request shard and write its responses; returns the shard's counts."""
    requests = read_records(job.requests, Request)
    wanted = {r.tile_id for r in requests}
    backend = get_backend(job.backend, cache=job.cache)
    one_by_one = any(r.kind == "instance_batch" for r in requests) and \
        not getattr(backend, "answers_instance_batch", False)
    needs_pixels = getattr(backend, "needs_pixels", True)
    images: dict[str, bytes] = {}
    plans: dict[str, TilePlan] = {}
    # one per tile of the shard; set-of-marks images only for a backend that looks at pixels,
    # or that measures tiles which plan did not measure
    skip = () if needs_pixels or one_by_one else ("som_png",)
    shard_plans = read_records(job.plan, TilePlan, skip_bytes=skip)
    if skip and any(p.measurements is None for p in shard_plans if p.tile_id in wanted):
        shard_plans = read_records(job.plan, TilePlan)
    for plan in shard_plans:
        if plan.tile_id in wanted:
            plans[plan.tile_id] = plan
            if plan.som_sha256 and plan.som_png is not None:
                images[plan.som_sha256] = plan.som_png
    measured = all(p.measurements is not None for p in plans.values())
    tiles: dict[str, Tile] = {}
    if needs_pixels or one_by_one or not measured:
        tiles = {t.tile_id: t for t in read_records(job.tiles, Tile) if t.tile_id in wanted}
    context = AnnotationContext(tiles=tiles, images=images, plans=plans)
    if one_by_one:
        answered = answer_marks_one_by_one(backend, requests, tiles, plans, context)
    else:
        answered = backend.annotate(requests, context)
    responses = in_request_order(requests, answered, backend.name, backend.model)
    write_records(job.out, responses, Response)
    report = shard_report(job.name, responses)
    report["tiles"] = len(shard_plans)
    stats = getattr(backend, "stats", None)
    if stats is not None:
        report["backend_stats"] = stats.as_dict()
    return report


def answer_marks_one_by_one(backend: Backend, requests: Sequence[Request],
                            tiles: dict[str, Tile], plans: dict[str, TilePlan],
                            context: AnnotationContext) -> list[Response]:
    """Answer batched-marks requests with a backend that takes one mark per call: ask the
    per-mark questions each bundles, and put their answers together as one JSON list
    [{"mark": n, "description": "..."}] per batched request (usage, cost and calls summed)."""
    from pipeline.stages.plan import mark_requests

    bundled: dict[str, list[Request]] = {}
    asked: list[Request] = []
    for r in requests:
        if r.kind != "instance_batch":
            asked.append(r)
        elif r.tile_id in tiles and r.tile_id in plans:
            bundled[r.request_id] = [q for q in mark_requests(tiles[r.tile_id], plans[r.tile_id],
                                                              r.prompt_version)
                                     if q.object_ids[0] in r.object_ids]
            asked.extend(bundled[r.request_id])
    answers = {a.request_id: a for a in backend.annotate(asked, context)}
    out = []
    for r in requests:
        if r.kind != "instance_batch":
            if r.request_id in answers:
                out.append(answers[r.request_id])
            continue
        parts = [(q.mark_number, answers.get(q.request_id)) for q in bundled.get(r.request_id, [])]
        found = [a for _, a in parts if a is not None]
        ok = [(n, a) for n, a in parts if a is not None and a.status == "ok"]
        errors = sorted({a.error or "failed" for a in found if a.status != "ok"})
        out.append(Response(
            request_id=r.request_id, tile_id=r.tile_id, kind=r.kind,
            status="ok" if ok else "failed",
            text=json.dumps([{"mark": n, "description": a.text} for n, a in ok],
                            ensure_ascii=False) if ok else "",
            error=None if ok else "; ".join(errors) or "no mark of the tile was answered",
            backend=backend.name, model=backend.model, prompt_version=r.prompt_version,
            usage=Usage(prompt_tokens=sum(a.usage.prompt_tokens for a in found),
                        completion_tokens=sum(a.usage.completion_tokens for a in found)),
            cost_usd=sum(a.cost_usd for a in found), latency_s=sum(a.latency_s for a in found),
            attempts=sum(a.attempts for a in found),
            cached=bool(found) and all(a.cached for a in found)))
    return out


def in_request_order(requests: Sequence[Request], responses: Sequence[Response],
                     backend: str, model: str) -> list[Response]:
    """One response per request, in request order; a request the backend left unanswered is
    recorded as failed rather than silently dropped."""
    by_id = {r.request_id: r for r in responses}
    ordered = []
    for req in requests:
        found = by_id.get(req.request_id)
        ordered.append(found if found is not None else Response(
            request_id=req.request_id, tile_id=req.tile_id, kind=req.kind, status="failed",
            error="backend returned no response", backend=backend, model=model,
            prompt_version=req.prompt_version))
    return ordered


def shard_report(name: str, responses: Sequence[Response]) -> dict:
    """Counts, tokens, cost and latency of one shard's responses."""
    by_backend: dict[str, dict[str, int]] = {}
    for r in responses:
        entry = by_backend.setdefault(f"{r.backend}/{r.model}",
                                      {"requests": 0, "ok": 0, "failed": 0})
        entry["requests"] += 1
        entry[r.status] += 1
    return {
        "name": name,
        "requests": len(responses),
        "ok": sum(r.status == "ok" for r in responses),
        "failed": sum(r.status == "failed" for r in responses),
        "cached": sum(r.cached for r in responses),
        # model calls this run made (attempts of the answers not from the cache)
        "calls": sum(r.attempts for r in responses if not r.cached),
        "by_backend": by_backend,
        "prompt_tokens": sum(r.usage.prompt_tokens for r in responses),
        "completion_tokens": sum(r.usage.completion_tokens for r in responses),
        "cost_usd": sum(r.cost_usd for r in responses),
        "spent_usd": sum(r.cost_usd for r in responses if not r.cached),
        "latency_s": sum(r.latency_s for r in responses),
        "failures": [{"request_id": r.request_id, "error": r.error or ""}
                     for r in responses if r.status == "failed"][:REPORTED_FAILURES],
    }


def _summed(dicts: Sequence[dict]) -> dict:
    """Add up nested counters (numbers summed, sub-dicts merged, other values kept once)."""
    total: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, list):
                total[key] = sorted(set(total.get(key, [])) | set(value))
            elif isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                total.setdefault(key, value)
            elif isinstance(value, dict):
                total[key] = _summed([total.get(key, {}), value])
            else:
                total[key] = total.get(key, 0) + value
    return total


def stage_report(kind: str, backend: BackendParams, shards: Sequence[dict]) -> dict:
    """The stage's report.json: totals over shards, plus each shard's counts."""
    requests = sum(s["requests"] for s in shards)
    tiles = sum(s.get("tiles", 0) for s in shards)
    calls = sum(s["calls"] for s in shards)
    by_backend: dict[str, dict[str, int]] = {}
    for s in shards:
        for key, counts in s["by_backend"].items():
            entry = by_backend.setdefault(key, {"requests": 0, "ok": 0, "failed": 0})
            for field, value in counts.items():
                entry[field] += value
    prompt = sum(s["prompt_tokens"] for s in shards)
    completion = sum(s["completion_tokens"] for s in shards)
    latency = sum(s["latency_s"] for s in shards)
    return {
        "stage": "annotate",
        "kind": kind,
        "backend": backend.name,
        "model": backend.model,
        "shards": len(shards),
        "requests": requests,
        "ok": sum(s["ok"] for s in shards),
        "failed": sum(s["failed"] for s in shards),
        "cached": sum(s["cached"] for s in shards),
        "tiles": tiles,
        "calls": calls,
        # requests of this pass per tile, and the model calls this run made per tile
        "requests_per_tile": round(requests / tiles, 4) if tiles else 0.0,
        "calls_per_tile": round(calls / tiles, 4) if tiles else 0.0,
        "by_backend": by_backend,
        "tokens": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        # cost of every answer, and what this run paid (answers from the cache cost nothing new)
        "cost_usd": round(sum(s["cost_usd"] for s in shards), 6),
        "spent_usd": round(sum(s["spent_usd"] for s in shards), 6),
        "backend_stats": _summed([s["backend_stats"] for s in shards if "backend_stats" in s]),
        "mean_latency_s": round(latency / requests, 6) if requests else 0.0,
        "failures": [f for s in shards for f in s["failures"]][:REPORTED_FAILURES],
        "per_shard": [{k: s[k] for k in ("name", "requests", "ok", "failed")} for s in shards],
    }


def run_annotate(params: Params, kind: str, tiles_dir: Path, plan_dir: Path, out_dir: Path,
                 scheduler: str | None = None) -> dict:
    """Answer every `kind` request of the plan; write `out_dir/<shard>` and `report.json`.
    More failed requests than `annotate.max_failed_share` allows raise BackendFailureError and
    keep the previous `out_dir` (`pipeline.core.failure_policy`)."""
    if kind not in PASSES:
        raise BadParamsError(f"unknown annotation pass {kind!r}; expected one of {list(PASSES)}")
    backend = params.annotate.backend
    if backend.name not in REGISTRY:
        raise BadParamsError(f"annotate.backend.name: backend {backend.name!r} is not available "
                             f"here; available: {sorted(REGISTRY)}", backend.where("name"))
    # set-up mistakes (a missing API key, a bad response cache, ...) stop here, before any
    # work (with the cache's settings: batch mode needs one, and the cache file is checked)
    made = get_backend(backend, cache=params.annotate.cache)
    local = local_scheduler_for(made, params.runner.local_scheduler)
    tiles_dir, plan_dir, out_dir = Path(tiles_dir), Path(plan_dir), Path(out_dir)
    requests_dir = plan_dir / "requests" / kind
    if not requests_dir.is_dir():
        raise EmptyInputError(f"no {kind} request folder (run the plan stage first)", requests_dir)
    shards = list_shards(requests_dir)
    for shard in shards:
        for path in (tiles_dir / shard.name, plan_dir / "tiles" / shard.name):
            if not path.is_file():
                raise EmptyInputError(f"missing shard for request shard {shard.name} (tiles and "
                                      "plan are out of step; re-run prepare and plan)", path)
    runner = params.runner
    # workers may run elsewhere: the cache path must not depend on their working directory
    cache = params.annotate.cache.model_copy(
        update={"path": str(Path(params.annotate.cache.path).resolve())})
    with staged_folder(out_dir, stage="annotate", inputs=[tiles_dir, plan_dir, cache.path]
                       ) as staging:
        jobs = [ShardJob(name=s.name, kind=kind, requests=s, tiles=tiles_dir / s.name,
                         plan=plan_dir / "tiles" / s.name,
                         out=staging / s.name, backend=backend, cache=cache) for s in shards]
        reports = map_shards(annotate_shard, jobs, label=f"annotate {kind}",
                             scheduler=scheduler or runner.scheduler,
                             local_scheduler=local, workers=runner.workers)
        report = stage_report(kind, backend, reports)
        # too many failures: raised here, the staged folder is dropped and out_dir kept
        check_annotate(kind, report, params.annotate.max_failed_share, out_dir)
        write_json(staging / "report.json", report)
    return report
