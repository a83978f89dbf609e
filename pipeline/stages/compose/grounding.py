"""Grounding: which annotator answer is about which mask. A tile's requests and answers
become its groundings (scene sentences, instance groundings in mark order, cluster groundings
in plan order) and the count of phrases left out, by reason. Both compose strategies (this
package's deterministic composer and the LLM composer) word the same groundings.

Instance answers are per mark in both modes: with `plan.batched_marks` the plan also writes the
per-mark requests a batch bundles and the annotate stage stores one answer per mark, so the
batch requests themselves are ignored here and both modes compose alike. With
`compose.composer: llm` the paragraph is written by a language model instead
(`pipeline.stages.compose.llm`), from the groundings gathered here; any failure keeps this
composer's record and is counted.

"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import pipeline
from pipeline.core.errors import BadRecordError
from pipeline.core.params import Params, params_hash
from pipeline.core.validate import sanitize_fragment
from pipeline.geometry import masks
from schemas import RLE, Cluster, ObjectInstance, Provenance, Request, Response, Tile, TilePlan

_LIST_MARKER_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")


@dataclass(frozen=True)
class Grounding:
    """One phrase to be: what it grounds and the annotator sentence about it (public: the LLM
    composer words the same groundings)."""

    kind: str
    category: str
    object_ids: tuple[int, ...]
    position: Optional[str]
    label: Optional[str]  # the cluster's count word
    mask: RLE
    text: str


def _prose(text: str) -> str:
    """One paragraph-ready run of sentences: lines joined, list markers gone, closing stop."""
    lines = [_LIST_MARKER_RE.sub("", line) for line in text.splitlines()]
    text = " ".join(" ".join(lines).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text and text[-1] not in ".!?":
        text += "."
    return text


@dataclass(frozen=True)
class Groundings:
    """What a tile's paragraph is made of: the scene sentences, the usable instance groundings
    in mark order and cluster groundings in plan order, and the phrases left out, by reason."""

    scene: list[str]
    instances: list[Grounding]
    clusters: list[Grounding]
    skipped: dict[str, int]


def tile_groundings(tile: Tile, plan: TilePlan, requests: Sequence[Request],
                    responses: Sequence[Response]) -> Groundings | tuple[str, str]:
    """A tile's groundings, or (reason, detail) when it can have no record."""
    requests = sorted((r for r in requests if r.tile_id == tile.tile_id),
                      key=lambda r: r.request_id)
    answer = _answers(r for r in responses if r.tile_id == tile.tile_id)
    skipped: Counter[str] = Counter()

    scene: list[str] = []
    for req in (r for r in requests if r.kind == "holistic"):
        resp = answer.get(req.request_id)
        if resp is None or resp.status != "ok":
            continue
        text = sanitize_fragment(resp.text)
        if text is None:
            return "injected_tag", f"holistic response {req.request_id}"
        if _prose(text):
            scene.append(_prose(text))
    if not scene:
        return "holistic_failed", "no usable holistic response"

    objects = {o.object_id: o for o in tile.objects}
    instances = _groundings(tile, plan, _in_mark_order(tile, requests), answer, objects, skipped)
    clusters = _groundings(tile, plan, _in_plan_order(plan, requests), answer, objects, skipped)
    return Groundings(scene, instances, clusters, dict(sorted(skipped.items())))


def _answers(responses) -> dict[str, Response]:
    """Response per request id; an "ok" answer wins over a failed one, else the first."""
    chosen: dict[str, Response] = {}
    for r in responses:
        have = chosen.get(r.request_id)
        if have is None or (have.status != "ok" and r.status == "ok"):
            chosen[r.request_id] = r
    return chosen


def _in_mark_order(tile: Tile, requests: Sequence[Request]) -> list[Request]:
    """Instance requests by mark number (then object order): request ids are content hashes."""
    index = {o.object_id: i for i, o in enumerate(tile.objects)}
    found = [r for r in requests if r.kind == "instance"]
    return sorted(found, key=lambda r: (
        r.mark_number if r.mark_number is not None else len(index) + 1,
        index.get(r.object_ids[0], len(index)) if r.object_ids else len(index), r.request_id))


def _in_plan_order(plan: TilePlan, requests: Sequence[Request]) -> list[Request]:
    order = {c.cluster_id: i for i, c in enumerate(plan.clusters)}
    found = [r for r in requests if r.kind == "cluster"]
    return sorted(found, key=lambda r: (order.get(r.cluster_id, len(order)), r.request_id))


def _groundings(tile: Tile, plan: TilePlan, requests: Sequence[Request],
                answer: dict[str, Response], objects: dict[int, ObjectInstance],
                skipped: Counter[str]) -> list[Grounding]:
    """Usable instance or cluster groundings; the unusable ones counted in `skipped`."""
    clusters: dict[str, Cluster] = {c.cluster_id: c for c in plan.clusters}
    positions = dict(zip((o.object_id for o in tile.objects), plan.positions))
    found = []
    for req in requests:
        resp = answer.get(req.request_id)
        if resp is None:
            skipped["missing_response"] += 1
            continue
        if resp.status != "ok":
            skipped["failed_response"] += 1
            continue
        text = sanitize_fragment(resp.text)
        if text is None:
            skipped["injected_tag"] += 1
            continue
        if not _prose(text):
            skipped["empty_text"] += 1
            continue
        found.append(_grounding(tile, req, _prose(text), objects, clusters, positions))
    return found


def _grounding(tile: Tile, req: Request, text: str, objects: dict[int, ObjectInstance],
               clusters: dict[str, Cluster], positions: dict[int, str]) -> Grounding:
    if req.kind == "instance":
        if len(req.object_ids) != 1:
            raise BadRecordError(f"tile {tile.tile_id}: instance request {req.request_id} names "
                                 f"{len(req.object_ids)} objects, expected 1")
        obj = _object(tile, req, req.object_ids[0], objects)
        return Grounding("instance", req.category or obj.category, (obj.object_id,),
                          req.position or positions.get(obj.object_id), None, obj.mask, text)
    cluster = clusters.get(req.cluster_id or "")
    if cluster is None:
        raise BadRecordError(f"tile {tile.tile_id}: cluster request {req.request_id} names "
                             f"cluster {req.cluster_id!r}, not in the tile's plan")
    members = [_object(tile, req, oid, objects) for oid in cluster.object_ids]
    if not members:
        raise BadRecordError(f"tile {tile.tile_id}: cluster {cluster.cluster_id} has no members")
    return Grounding("cluster", cluster.category, tuple(cluster.object_ids),
                      cluster.region or req.position, cluster.cluster_info or None,
                      masks.union([o.mask for o in members]), text)


def _object(tile: Tile, req: Request, object_id: int,
            objects: dict[int, ObjectInstance]) -> ObjectInstance:
    try:
        return objects[object_id]
    except KeyError:
        raise BadRecordError(f"tile {tile.tile_id}: request {req.request_id} names object "
                             f"{object_id}, not in the tile") from None

def tile_provenance(params: Params, requests: Sequence[Request],
                    responses: Sequence[Response]) -> Provenance:
    """How a tile's record was made: the backends and models that answered it (several joined
    sorted with "+"), the prompt versions asked, the hash of every section that shaped it."""
    def joined(values) -> str:
        return "+".join(sorted(set(values))) or "none"

    return Provenance(
        backend=joined(r.backend for r in responses),
        model=joined(r.model for r in responses),
        prompt_versions=sorted({r.prompt_version for r in requests}),
        params_hash=params_hash(params.prepare, params.plan, params.annotate, params.compose),
        pipeline_version=pipeline.__version__)
