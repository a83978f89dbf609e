"""Stage `plan`: priors, instance vs cluster split, set-of-marks, and the exact requests.

For each tile: the 3x3 position of every instance (positional prior), clusters of many small
same-category instances per refined grid region, numbered marks on the instances described one
by one, the tile's measurements (`pipeline.geometry.measure`: what the template backend states), and one
`Request` per LMM call (holistic, instance, cluster) carrying the rendered prompt, its version
and the hash of the image the model will see. With `plan.batched_marks` a tile's marks are
also asked in one instance_batch request, which lists (`bundles`) the per-mark instance requests
planned as in the other mode: later stages read per-mark requests and answers either way.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import prompts
from pipeline.core.errors import BadAnnotationError, GeoPixelDError
from pipeline.core.estimate import plan_estimate
from pipeline.core.imaging import decode_png, sha256
from pipeline.core.params import Params, PlanParams
from pipeline.core.requests import questions, request_id
from pipeline.core.shards import read_records, write_records
from pipeline.core.stage import Stage
from pipeline.geometry.categories import UNKNOWN_CATEGORY
from pipeline.geometry.grid import position
from pipeline.geometry.measure import measure_tile
from pipeline.geometry.priors import (
    InstanceMask,
    category_prior,
    check_plan_params,
    instance_masks,
    mark_order,
    split_instances,
)
from pipeline.geometry.set_of_marks import place_marks, render_set_of_marks
from schemas import PASSES, Request, Tile, TilePlan

# the passes plan writes requests for (RequestKind also has kinds that later stages make)
# the pass (requests/<pass>/ folder) of each request kind plan makes
PASS_OF = {"holistic": "holistic", "instance": "instance", "instance_batch": "instance",
           "cluster": "cluster"}

__all__ = ["mark_requests", "marks_batch_requests", "plan_shard", "plan_tile",
           "request_id", "run_plan"]


def _request(tile_id: str, kind: str, version: str, prompt: str, image_sha: str,
             object_ids: list[int], **extra) -> Request:
    return Request(request_id=request_id(tile_id, kind, version, prompt, image_sha, object_ids),
                   tile_id=tile_id, kind=kind, prompt=prompt, prompt_version=version,
                   image_sha256=image_sha, object_ids=object_ids, **extra)


def _plan(tile: Tile, params: PlanParams) -> tuple[TilePlan, list[Request], list[int]]:
    """`plan_tile`, plus the ids of instances that could not be marked without overlap."""
    check_plan_params(params)
    ids = [o.object_id for o in tile.objects]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise BadAnnotationError(f"tile {tile.tile_id}: object ids repeated: {dup[:5]}")
    version = params.prompt_version
    image = decode_png(tile.image_png)
    if image.shape[:2] != (tile.height, tile.width):
        raise BadAnnotationError(
            f"tile {tile.tile_id}: image is {image.shape[0]}x{image.shape[1]}, the record "
            f"says {tile.height}x{tile.width}")
    instances = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    measurements = measure_tile(image, instances, tile.image_sha256, params.grid)
    positions = [position(*i.centroid, tile.width, tile.height, params.grid) for i in instances]
    requests = [_request(tile.tile_id, "holistic", version, prompts.render("holistic", version),
                         tile.image_sha256, [])]
    if not instances:
        plan = TilePlan(tile_id=tile.tile_id, split=tile.split, positions=[], marks=[],
                        clusters=[], unplanned_object_ids=[], measurements=measurements)
        return plan, requests, []

    split = split_instances(instances, tile.width, tile.height, params)
    order, too_small = mark_order(instances, split.individual_ids, params)
    by_id: dict[int, InstanceMask] = {i.object_id: i for i in instances}
    placement = place_marks([by_id[i] for i in order], tile.width, tile.height,
                            params.max_marks_per_tile, params.marks)
    marked = {m.object_id for m in placement.marks}
    unplanned = [i for i in split.individual_ids if i not in marked]

    som_png = som_sha = None
    if placement.marks:
        som_png = render_set_of_marks(image, placement.marks, params.marks)
        som_sha = sha256(som_png)

    plan = TilePlan(tile_id=tile.tile_id, split=tile.split, positions=positions,
                    marks=placement.marks, clusters=split.clusters,
                    unplanned_object_ids=unplanned, som_png=som_png, som_sha256=som_sha,
                    measurements=measurements)
    marks = mark_requests(tile, plan, version)
    requests.extend(marks)
    if params.batched_marks:
        requests.extend(marks_batch_requests(tile, plan, version, marks))
    for cluster in split.clusters:
        if cluster.category == UNKNOWN_CATEGORY:
            prompt = prompts.render("cluster_unknown", version,
                                    cluster_info=cluster.cluster_info, pos=cluster.region)
        else:
            prompt = prompts.render("cluster", version, cluster_info=cluster.cluster_info,
                                    category_name=category_prior(cluster.category, many=True),
                                    pos=cluster.region)
        requests.append(_request(tile.tile_id, "cluster", version, prompt, tile.image_sha256,
                                 list(cluster.object_ids), category=cluster.category,
                                 position=cluster.region, cluster_id=cluster.cluster_id))
    return plan, requests, placement.unmarkable_ids


def mark_requests(tile: Tile, plan: TilePlan, version: str) -> list[Request]:
    """One instance request per mark of a planned tile, in mark order (in both modes: the
    per-mark requests a batched-marks request bundles are these, same prompts, same ids)."""
    category_of = {o.object_id: o.category for o in tile.objects}
    pos_of = dict(zip((o.object_id for o in tile.objects), plan.positions))
    requests = []
    for mark in sorted(plan.marks, key=lambda m: m.number):
        category = category_of[mark.object_id]
        if category == UNKNOWN_CATEGORY:  # category-free variant: never invent one
            prompt = prompts.render("instance_unknown", version, pos=pos_of[mark.object_id],
                                    mark_number=mark.number)
        else:
            prompt = prompts.render("instance", version,
                                    category_name=category_prior(category),
                                    pos=pos_of[mark.object_id], mark_number=mark.number)
        requests.append(_request(tile.tile_id, "instance", version, prompt,
                                 plan.som_sha256 or "", [mark.object_id], category=category,
                                 position=pos_of[mark.object_id], mark_number=mark.number))
    return requests


def marks_batch_requests(tile: Tile, plan: TilePlan, version: str,
                         bundled: list[Request] | None = None) -> list[Request]:
    """The batched-marks request of a planned tile (none without marks): one call describes
    every marked object; its object_ids are the marked objects by mark number, marks numbered
    1..n (what the answer's "mark" fields refer to), and its `bundles` the ids of the per-mark
    requests it asks at once (`bundled`, default `mark_requests`), in the same order."""
    marks = sorted(plan.marks, key=lambda m: m.number)
    if not marks:
        return []
    if [m.number for m in marks] != list(range(1, len(marks) + 1)):
        raise BadAnnotationError(f"tile {tile.tile_id}: marks are not numbered 1..{len(marks)}")
    category_of = {o.object_id: o.category for o in tile.objects}
    pos_of = dict(zip((o.object_id for o in tile.objects), plan.positions))
    lines = []
    for mark in marks:
        category = category_of[mark.object_id]
        name = "object" if category == UNKNOWN_CATEGORY else category_prior(category)
        lines.append(f"Mark {mark.number}: the {name} at the {pos_of[mark.object_id]}")
    prompt = prompts.render("instance_batch", version, marks="\n".join(lines))
    bundled = mark_requests(tile, plan, version) if bundled is None else bundled
    if [q.object_ids for q in bundled] != [[m.object_id] for m in marks]:
        raise BadAnnotationError(f"tile {tile.tile_id}: the per-mark requests to bundle are not "
                                 "the tile's marks in mark order")
    return [_request(tile.tile_id, "instance_batch", version, prompt, plan.som_sha256 or "",
                     [m.object_id for m in marks], bundles=[q.request_id for q in bundled])]


def plan_tile(tile: Tile, params: PlanParams) -> tuple[TilePlan, list[Request]]:
    """Plan one tile: its TilePlan and its requests (holistic first, then instance requests by
    mark number, with batched marks then the batch that bundles them, then cluster requests by
    cluster id)."""
    plan, requests, _ = _plan(tile, params)
    return plan, requests


def plan_shard(item: tuple[Path, Path], params: PlanParams) -> dict:
    """Plan every tile of one input shard; write its TilePlan and Request shards (same name)."""
    source, staging = item
    try:
        tiles = read_records(source, Tile)
        plans, requests, counts, asked = [], {k: [] for k in PASSES}, Counter(), Counter()
        for tile in tiles:
            plan, reqs, unmarkable = _plan(tile, params)
            plans.append(plan)
            for r in reqs:
                requests[PASS_OF[r.kind]].append(r)
            # the report counts requests asked (a batch, not the per-mark requests it bundles)
            asked.update(PASS_OF[r.kind] for r in questions(reqs))
            counts["objects"] += len(tile.objects)
            counts["marks"] += len(plan.marks)
            counts["marked_tiles"] += bool(plan.marks)
            counts["clusters"] += len(plan.clusters)
            counts["clustered_objects"] += sum(len(c.object_ids) for c in plan.clusters)
            counts["unplanned_objects"] += len(plan.unplanned_object_ids)
            counts["unmarkable_objects"] += len(unmarkable)
            counts["tiles_without_objects"] += not tile.objects
    except GeoPixelDError as exc:
        if exc.path is None:
            raise type(exc)(exc.message, source) from None
        raise
    write_records(staging / "tiles" / source.name, plans, TilePlan)
    for kind in PASSES:
        write_records(staging / "requests" / kind / source.name, requests[kind], Request)
    return {"tiles": len(tiles), **counts, **{f"requests_{k}": asked[k] for k in PASSES}}


def run_plan(params: Params, tiles_dir: Path, out_dir: Path, scheduler: str | None = None) -> dict:
    """Plan every tile shard in `tiles_dir` into `out_dir` (tiles/, requests/<kind>/,
    report.json), written as a whole or not at all. Returns the report."""
    tiles_dir, out_dir = Path(tiles_dir), Path(out_dir)
    check_plan_params(params.plan)
    stage = Stage("plan", params, scheduler)
    shards = stage.shards(tiles_dir, "no tile shards ({split}-#####-of-#####.parquet) in this "
                          "folder")
    with stage.output(out_dir, inputs=[tiles_dir]) as out:
        results = stage.map(partial(plan_shard, params=params.plan),
                            [(s, out.folder) for s in shards])
        total = stage.total(results)
        requests = {k: total[f"requests_{k}"] for k in PASSES}
        tiles, total_requests = total["tiles"], sum(requests.values())
        out.report = {
            "stage": "plan",
            "shards": len(shards),
            "tiles": tiles,
            "tiles_without_objects": total["tiles_without_objects"],
            "objects": total["objects"],
            "marks": total["marks"],
            "clusters": total["clusters"],
            "clustered_objects": total["clustered_objects"],
            "unmarkable_objects": total["unmarkable_objects"],
            "unplanned_objects": total["unplanned_objects"],
            "requests": requests,
            "requests_total": total_requests,
            "requests_per_tile": {k: round(v / tiles, 4) if tiles else 0.0
                                  for k, v in {**requests, "total": total_requests}.items()},
            # model calls per tile of each instance-pass mode (one per mark, or one per
            # marked tile), the other passes included; `batched_marks` says which is planned
            "batched_marks": params.plan.batched_marks,
            "calls_per_tile": {
                mode: round((requests["holistic"] + requests["cluster"] + instance) / tiles, 4)
                if tiles else 0.0
                for mode, instance in (("per_mark", total["marks"]),
                                       ("batched_marks", total["marked_tiles"]))},
            "prompt_version": params.plan.prompt_version,
            "params_digest": params.plan.digest(),
            "estimate": plan_estimate(params, out.folder),  # the bill, before any paid call
        }
    return out.report
