"""The LLM composer (`compose.composer: llm`): a language model writes a tile's paragraph, as
the paper did with Llama-3.1-8B, and the grounding stays exact.

The model gets the scene sentences and every grounding as `[i] name (where): annotator text`
(prompts/<version>/compose.txt) and must write the paragraph with each grounding as a `{i}`
placeholder where its name stands. The answer is accepted only if every id is used exactly
once, no unknown id appears, and nothing tag-like, no other brace and no bracketed number is
left; the placeholders then become `<p> name </p> [SEG]`, phrases in order of appearance (so
the i-th [SEG] owns the i-th mask), instance names numbered per category in that order
("ship-1", "ship-2"), and the record passes the same `validate_record` as the deterministic
composer's. Anything else keeps the deterministic record, and the reason is counted.

The request (kind "compose") goes through the chosen backend with its response cache:
`compose.llm_backend`, or `annotate.backend` when that is null. It is text only unless
`compose.llm_with_image` (then the tile's image goes with it).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import prompts
from annotators.base import AnnotationContext, get_backend
from pipeline.core.params import BackendParams, CacheParams, ComposeParams, Params
from pipeline.core.requests import request_id
from pipeline.core.validate import sanitize_fragment, validate_record
from pipeline.geometry.categories import readable
from pipeline.stages.compose.grounding import Grounding, Groundings, tile_provenance
from pipeline.stages.compose.wording import cluster_name, where
from schemas import GroundedRecord, Phrase, Request, Response, Tile

KIND = "compose"
PLACEHOLDER = re.compile(r"\{\s*(\d+)\s*\}")
# A grounding id written the prompt's way ("[3]") instead of as a placeholder.
_BRACKET_ID = re.compile(r"\[\s*\d+\s*\]")


@dataclass(frozen=True)
class Draft:
    """One tile for the LLM composer: its groundings (id i = position i - 1) and names."""

    tile: Tile
    groundings: Groundings
    named: list[tuple[str, Grounding]]
    requests: list[Request]
    responses: list[Response]


def composer_backend(params: Params) -> BackendParams:
    """The backend that composes: compose.llm_backend, else annotate.backend."""
    return params.compose.llm_backend or params.annotate.backend


def named_groundings(groundings: Groundings) -> list[tuple[str, Grounding]]:
    """Every grounding with the name the prompt shows: instances in mark order numbered per
    category ("ship-1"), then clusters ("numerous small vehicles")."""
    counter: Counter[str] = Counter()
    named = []
    for g in groundings.instances:
        counter[g.category] += 1
        named.append((f"{readable(g.category)}-{counter[g.category]}", g))
    named.extend((cluster_name(g), g) for g in groundings.clusters)
    return named


def compose_prompt(scene: Sequence[str], named: Sequence[tuple[str, Grounding]],
                   version: str) -> str:
    """The compose prompt: the scene and the numbered groundings."""
    lines = []
    for i, (name, g) in enumerate(named, 1):
        placed = f" ({where(g.position)})" if g.position else ""
        lines.append(f"[{i}] {name}{placed}: {g.text}")
    return prompts.render(KIND, version, scene=" ".join(scene), phrases="\n".join(lines))


def compose_request(tile: Tile, prompt: str, version: str, with_image: bool) -> Request:
    image = tile.image_sha256 if with_image else ""
    return Request(request_id=request_id(tile.tile_id, KIND, version, prompt, image, []),
                   tile_id=tile.tile_id, kind=KIND, prompt=prompt, prompt_version=version,
                   image_sha256=image, object_ids=[])


def parse_composition(text: str, count: int) -> tuple[Optional[list[str | int]], str]:
    """The paragraph as text pieces and grounding ids (1-based) in order, or None and the
    reason it is refused: empty, missing_id, repeated_id, unknown_id, stray_brace,
    bracket_id, tags."""
    text = " ".join((text or "").split())
    if not text:
        return None, "empty"
    pieces: list[str | int] = []
    at = 0
    for m in PLACEHOLDER.finditer(text):
        pieces.append(text[at:m.start()])
        pieces.append(int(m.group(1)))
        at = m.end()
    pieces.append(text[at:])
    ids = [p for p in pieces if isinstance(p, int)]
    words = " ".join(p for p in pieces if isinstance(p, str))
    if any(i < 1 or i > count for i in ids):
        return None, "unknown_id"
    if len(set(ids)) != len(ids):
        return None, "repeated_id"
    if len(ids) != count:
        return None, "missing_id"
    if "{" in words or "}" in words:
        return None, "stray_brace"
    if _BRACKET_ID.search(words):
        return None, "bracket_id"
    if sanitize_fragment(words) is None:
        return None, "tags"
    return [p for p in pieces if p != ""], "ok"


def build_record(draft: Draft, pieces: Sequence[str | int], provenance) -> GroundedRecord:
    """The record of an accepted paragraph: placeholders become tagged phrases, phrases in
    order of appearance, instance names numbered per category in that order."""
    counter: Counter[str] = Counter()
    caption, phrases = [], []
    for piece in pieces:
        if isinstance(piece, str):
            caption.append(piece)
            continue
        _, g = draft.named[piece - 1]
        if g.kind == "instance":
            counter[g.category] += 1
            name = f"{readable(g.category)}-{counter[g.category]}"
        else:
            name = cluster_name(g)
        caption.append(f" <p> {name} </p> [SEG] ")  # spaced as GeoPixelD: "[SEG] , <p>"
        phrases.append(Phrase(text=name, kind=g.kind, category=g.category,
                              object_ids=list(g.object_ids), mask=g.mask))
    text = " ".join("".join(caption).split())
    tile = draft.tile
    return GroundedRecord(record_id=tile.tile_id, tile_id=tile.tile_id, split=tile.split,
                          caption=text, phrases=phrases, provenance=provenance)


def accept(draft: Draft, request: Request, response: Optional[Response], params: Params,
           ) -> tuple[Optional[GroundedRecord], str]:
    """The LLM's record for one tile, or None and why the deterministic one stays."""
    if response is None:
        return None, "missing_response"
    if response.status != "ok":
        return None, "failed_response"
    pieces, reason = parse_composition(response.text, len(draft.named))
    if pieces is None:
        return None, reason
    provenance = tile_provenance(params, [*draft.requests, request],
                                 [*draft.responses, response])
    record = build_record(draft, pieces, provenance)
    reasons = validate_record(record, params.compose, (draft.tile.height, draft.tile.width))
    if reasons:
        return None, f"record_{reasons[0]}"
    return record, "ok"


def compose_with_llm(drafts: Sequence[Draft], params: Params,
                     cache: Optional[CacheParams] = None,
                     ) -> tuple[list[Optional[GroundedRecord]], Counter]:
    """The LLM's record for each draft (None where the deterministic one stays) and the
    outcomes counted: "composed", and each fallback reason. All of a shard's prompts go to
    the backend in one call (its concurrency, batching and cache apply)."""
    c: ComposeParams = params.compose
    version = c.llm_prompt_version
    requests = [compose_request(d.tile, compose_prompt(d.groundings.scene, d.named, version),
                                version, c.llm_with_image) for d in drafts]
    outcomes: Counter = Counter()
    if not drafts:
        return [], outcomes
    backend = get_backend(composer_backend(params), cache=cache or params.annotate.cache)
    context = AnnotationContext(tiles={d.tile.tile_id: d.tile for d in drafts})
    answers = {r.request_id: r for r in backend.annotate(requests, context)}
    records: list[Optional[GroundedRecord]] = []
    for draft, request in zip(drafts, requests):
        record, reason = accept(draft, request, answers.get(request.request_id), params)
        outcomes["composed" if record is not None else reason] += 1
        records.append(record)
    return records, outcomes


def draft(tile: Tile, groundings: Groundings, requests: Sequence[Request],
          responses: Sequence[Response]) -> Draft:
    return Draft(tile, groundings, named_groundings(groundings), list(requests), list(responses))
