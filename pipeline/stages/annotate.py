"""Stage annotate: answer one pass's requests (holistic, instance or cluster), shard by shard.

For each request shard `plan/requests/<kind>/<name>` it reads the plan shard of the same name
(set-of-marks images, and the measurements the template backend states) and the tiles shard (not
for a backend whose `needs_pixels` is False when every plan holds measurements), hands the whole
shard to the backend chosen in `annotate.backend` in one `annotate` call, and writes the
responses, in request order, to `<out>/<name>`. Backend set-up happens once per shard task, so
a backend with a client, a response cache or retries slots in without changing the stage.

A batched-marks request (`plan.batched_marks`, kind instance_batch) is answered in one call by a
backend that can (`answers_instance_batch`); any other backend is asked the per-mark requests it
bundles (`Request.bundles`, planned alongside it) instead. Either way the stage stores one
instance Response per mark, keyed by the per-mark request id (`split_batch_answer`, the one place
a batch answer is split), so that compose reads the same per-mark answers in both modes; the
batch itself gets no stored response, its call is counted once (`pipeline.core.requests.by_call`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from annotators.base import REGISTRY, AnnotationContext, get_backend, local_scheduler_for
from pipeline.core.errors import BadParamsError, BadShardError, EmptyInputError
from pipeline.core.failure_policy import check_annotate
from pipeline.core.params import BackendParams, CacheParams, Params
from pipeline.core.requests import by_call, questions
from pipeline.core.shards import list_shards, read_records, write_records
from pipeline.core.stage import Stage
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
    asked = questions(requests, batches=backend.answers_instance_batch)
    needs_pixels = backend.needs_pixels
    images: dict[str, bytes] = {}
    plans: dict[str, TilePlan] = {}
    # one per tile of the shard; set-of-marks images only for a backend that looks at pixels,
    # or that measures tiles which plan did not measure
    skip = () if needs_pixels else ("som_png",)
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
    if needs_pixels or not measured:
        tiles = {t.tile_id: t for t in read_records(job.tiles, Tile) if t.tile_id in wanted}
    context = AnnotationContext(tiles=tiles, images=images, plans=plans)
    answered = in_request_order(asked, backend.annotate(asked, context), backend.name,
                                backend.model)
    responses = per_mark_responses(requests, answered, job.requests)
    write_records(job.out, responses, Response)
    report = shard_report(job.name, responses)
    report["tiles"] = len(shard_plans)
    stats = backend.stats
    if stats is not None:
        report["backend_stats"] = stats.as_dict()
    return report


def per_mark_responses(requests: Sequence[Request], answered: Sequence[Response],
                       where: Path | None = None) -> list[Response]:
    """The responses to store: one per request but the batched-marks ones, in request order.
    `answered` holds one response per request asked (`in_request_order`); a per-mark request
    that a batch bundles has its own answer when asked one by one, else its part of the batch
    answer. Either way it names its batch (`batch_id`)."""
    answers = {a.request_id: a for a in answered}
    by_id = {r.request_id: r for r in requests}
    batch_of: dict[str, Request] = {}
    for r in requests:
        if r.kind != "instance_batch":
            continue
        if not r.bundles or any(i not in by_id for i in r.bundles):
            raise BadShardError(f"batched-marks request {r.request_id} does not list its "
                                "per-mark requests in this shard (a plan of an older version? "
                                "re-run plan)", where)
        batch_of.update(dict.fromkeys(r.bundles, r))
    parts: dict[str, dict[str, Response]] = {}
    out = []
    for r in requests:
        if r.kind == "instance_batch":
            continue
        batch = batch_of.get(r.request_id)
        if batch is None:
            out.append(answers[r.request_id])
        elif r.request_id in answers:  # asked one mark per call
            out.append(answers[r.request_id].model_copy(update={"batch_id": batch.request_id}))
        else:
            if batch.request_id not in parts:
                parts[batch.request_id] = {a.request_id: a for a in split_batch_answer(
                    batch, [by_id[i] for i in batch.bundles or ()], answers[batch.request_id])}
            out.append(parts[batch.request_id][r.request_id])
    return out


def split_batch_answer(batch: Request, marks: Sequence[Request],
                       answer: Response) -> list[Response]:
    """A batched-marks answer (its text the JSON list [{"mark": n, "description": ...}]) as one
    instance Response per bundled per-mark request, in `marks` order: ok with the description of
    its mark, or failed (the batch failed, or its answer does not describe that mark). The
    call's usage, cost, latency and attempts stay on the first mark's response only."""
    described: dict[int, str] = {}
    error = answer.error or "failed"
    if answer.status == "ok":
        try:
            described = {int(m["mark"]): str(m["description"]) for m in json.loads(answer.text)}
            error = ""
        except (ValueError, TypeError, KeyError):
            error = "the batched-marks answer is not a list of marks and descriptions"
    out = []
    for i, mark in enumerate(marks):
        text = described.get(mark.mark_number)  # type: ignore[arg-type]
        reason = error or f"the batched-marks answer does not describe mark {mark.mark_number}"
        first = i == 0
        out.append(Response(
            request_id=mark.request_id, tile_id=mark.tile_id, kind=mark.kind,
            status="ok" if text is not None else "failed", text=text or "",
            error=None if text is not None else reason,
            backend=answer.backend, model=answer.model, prompt_version=answer.prompt_version,
            usage=answer.usage if first else Usage(), cost_usd=answer.cost_usd if first else 0.0,
            latency_s=answer.latency_s if first else 0.0,
            attempts=answer.attempts if first else 0, cached=answer.cached,
            batch_id=batch.request_id))
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
    """Counts, tokens, cost and latency of one shard's responses. Requests are counted as
    asked: the per-mark answers of one batched-marks request are one request, ok when any mark
    is, cached when all are (`by_call`); tokens, cost, latency and calls are summed."""
    by_backend: dict[str, dict[str, int]] = {}
    asked: list[tuple[str, bool, bool, str]] = []  # (request id, ok, cached, error) per call
    for call in by_call(responses):
        first, ok = call[0], any(r.status == "ok" for r in call)
        if first.batch_id is None:
            asked.append((first.request_id, ok, first.cached, first.error or ""))
        else:
            asked.append((first.batch_id, ok, all(r.cached for r in call), "; ".join(sorted(
                {r.error or "failed" for r in call if r.status != "ok"}))))
        entry = by_backend.setdefault(f"{first.backend}/{first.model}",
                                      {"requests": 0, "ok": 0, "failed": 0})
        entry["requests"] += 1
        entry["ok" if ok else "failed"] += 1
    return {
        "name": name,
        "requests": len(asked),
        "ok": sum(ok for _, ok, _, _ in asked),
        "failed": sum(not ok for _, ok, _, _ in asked),
        "cached": sum(cached for _, _, cached, _ in asked),
        # model calls this run made (attempts of the answers not from the cache)
        "calls": sum(r.attempts for r in responses if not r.cached),
        "by_backend": by_backend,
        "prompt_tokens": sum(r.usage.prompt_tokens for r in responses),
        "completion_tokens": sum(r.usage.completion_tokens for r in responses),
        "cost_usd": sum(r.cost_usd for r in responses),
        "spent_usd": sum(r.cost_usd for r in responses if not r.cached),
        "latency_s": sum(r.latency_s for r in responses),
        "failures": [{"request_id": rid, "error": error}
                     for rid, ok, _, error in asked if not ok][:REPORTED_FAILURES],
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
    stage = Stage("annotate", params, scheduler,
                  local_scheduler=local_scheduler_for(made, params.runner.local_scheduler),
                  holds_model=made.loads_model)
    tiles_dir, plan_dir, out_dir = Path(tiles_dir), Path(plan_dir), Path(out_dir)
    requests_dir = plan_dir / "requests" / kind
    if not requests_dir.is_dir():
        raise EmptyInputError(f"no {kind} request folder (run the plan stage first)", requests_dir)
    shards = list_shards(requests_dir)
    for shard in shards:
        for path in (tiles_dir / shard.name, plan_dir / "tiles" / shard.name):
            stage.need(path, f"missing shard for request shard {shard.name} (tiles and plan "
                       "are out of step; re-run prepare and plan)")
    # workers may run elsewhere: the cache path must not depend on their working directory
    cache = params.annotate.cache.model_copy(
        update={"path": str(Path(params.annotate.cache.path).resolve())})
    with stage.output(out_dir, inputs=[tiles_dir, plan_dir, cache.path]) as out:
        jobs = [ShardJob(name=s.name, kind=kind, requests=s, tiles=tiles_dir / s.name,
                         plan=plan_dir / "tiles" / s.name,
                         out=out.folder / s.name, backend=backend, cache=cache) for s in shards]
        reports = stage.map(annotate_shard, jobs, label=f"annotate {kind}")
        report = stage_report(kind, backend, reports)
        # too many failures: raised here, the staged folder is dropped and out_dir kept
        check_annotate(kind, report, params.annotate.max_failed_share, out_dir)
        out.report = report
    return report
