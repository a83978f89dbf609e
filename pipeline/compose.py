"""Compose: merge the holistic, instance and cluster texts of a tile into one grounded paragraph,
align the i-th [SEG] with the i-th mask, and validate the record.

The paper merges the three passes with an LLM; this is the deterministic composer: the same
inputs always give the same bytes, and it only rearranges the annotators' words around the
grounding tags, it never invents a fact. The paragraph, in GeoPixelD's style:

1. the holistic sentences (the scene), as the model wrote them;
2. one sentence per instance, categories in order of their first mark, marks in number order:
   "The <p> ship-1 </p> [SEG] at the top left is moored beside the pier."  Same-category
   instances at one position whose descriptions are the same share one sentence
   (`compose.group_instances`): "The <p> tennis court-2 </p> [SEG] , <p> tennis court-3 </p>
   [SEG] , and <p> tennis court-4 </p> [SEG] at the bottom right have white lines.";
3. one sentence per cluster, in plan order: "At the left side, <p> numerous small vehicles
   </p> [SEG] are parked in rows."

Phrase text: an instance is its readable category + "-" + its index among that category's
phrases in caption order ("small vehicle-1"); a cluster is its count word + the plural category
("numerous small vehicles", "a few ships"), as the cluster prompt itself words it.

Weaving an annotator sentence (documented rules, applied in order):
- the text is refused if it carries tag-like text (`validate.sanitize_fragment`), else its lines
  are joined, list markers dropped, and a full stop added if it ends without one;
- a leading subject naming the object is removed, the tagged phrase takes its place: for an
  instance "The ship", "A large white ship" (up to three adjectives, kept before the tag: "The
  large white <p> ship-1 </p> [SEG]"), "It"; for a cluster "Numerous small vehicles", "There
  are several ships" (a vague quantifier gives way to the phrase's count word; an exact count
  is kept: "<p> several ships </p> [SEG] , seven in all, are ..."); a singular verb after a
  cluster's subject becomes plural;
- the plan's own position next to that subject ("at the top left", "Seen at the top left, ...")
  is removed, and so is one "at the <same position> (of the image)" ending a clause unless
  that would leave a bare verb ("is at the top left." stays);
- the plan's position is then stated once, by the composer, unless the text still names it:
  after an instance's tag ("The <p> ship-1 </p> [SEG] at the top left is ..."), at the front of
  a cluster's sentence ("At the left side, <p> ... </p> [SEG] are ...");
- a subject is only removed if a verb or a comma follows it; otherwise the whole text follows a
  colon ("The <p> ship-1 </p> [SEG] at the top left: a white hull with a red deck.", "At the
  left side, there are <p> many ships </p> [SEG]: boats moored in a harbour.").

Batched-marks answers (`plan.batched_marks`) are split back into the per-mark instance requests
and answers they bundle before anything else, so both modes compose alike. With
`compose.composer: llm` the paragraph is written by a language model instead
(`annotators.llm_composer`), from the groundings gathered here; any failure keeps this
composer's record and is counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import pipeline
from pipeline import masks
from pipeline.categories import plural, readable
from pipeline.errors import BadRecordError, EmptyInputError, GeoPixelDError
from pipeline.failure_policy import check_compose
from pipeline.params import CacheParams, ComposeParams, Params, params_hash
from pipeline.runner import map_shards
from pipeline.shards import list_shards, read_records, staged_folder, write_json, write_records
from pipeline.validate import sanitize_fragment, validate_record
from schemas import (
    RLE, Cluster, DroppedRecord, GroundedRecord, ObjectInstance, Phrase, Provenance, Request,
    Response, Tile, TilePlan, Usage,
)

STAGE = "compose"
KINDS = ("holistic", "instance", "cluster")
SEG = "[SEG]"

# First words after a removed subject that let the tagged phrase become the sentence's subject.
# Singular verbs map to their plural, for a sentence shared by grouped instances.
_SINGULAR_TO_PLURAL = {
    "is": "are", "was": "were", "has": "have", "appears": "appear", "seems": "seem",
    "looks": "look", "features": "feature", "sits": "sit", "lies": "lie", "stands": "stand",
    "rests": "rest", "shows": "show", "displays": "display", "contains": "contain",
    "includes": "include", "occupies": "occupy", "measures": "measure", "casts": "cast",
    "faces": "face", "points": "point", "runs": "run", "spans": "span", "extends": "extend",
    "exhibits": "exhibit", "remains": "remain", "covers": "cover", "reflects": "reflect",
    "carries": "carry", "crosses": "cross", "connects": "connect", "forms": "form",
}
_NUMBER_NEUTRAL = {
    "can", "could", "may", "might", "will", "would", "should", "must", "with", "having",
    "parked", "docked", "moored", "anchored", "berthed", "located", "situated", "positioned",
    "placed", "lined", "arranged", "aligned", "scattered", "clustered", "grouped", "gathered",
    "distributed", "spread", "stationed", "surrounded", "oriented", "painted", "covered", "seen",
    "visible", "made", "built", "equipped", "enclosed", "bordered", "flanked", "featuring",
    "showing", "displaying", "sitting", "lying", "standing", "resting", "appearing",
    "occupying", "facing", "pointing", "characterized", "adjacent", "next", "near", "beside",
}
_PLURAL_VERBS = set(_SINGULAR_TO_PLURAL.values()) | {"line", "fill", "dot", "cluster", "occupy"}
_VERB_LED = set(_SINGULAR_TO_PLURAL) | _NUMBER_NEUTRAL | _PLURAL_VERBS
# A trailing position is kept when removing it would leave one of these bare.
_NEEDS_COMPLEMENT = {"is", "are", "was", "were", "be", "been", "being", "lies", "lie", "sits",
                     "sit", "stands", "stand", "rests", "rest", "remains", "remain", "appears",
                     "appear", "seems", "seem", "located", "situated", "positioned", "found"}
# Sentence openers lower-cased when the text follows a colon.
_LOWER_AFTER_COLON = {"A", "An", "The", "This", "That", "These", "Those", "It", "Its", "There"}

_POSITION_SYNONYMS = {"center": r"(?:center|centre|middle)", "centre": r"(?:center|centre|middle)",
                      "middle": r"(?:center|centre|middle)"}
_POSITION_TAIL = (r"(?:[\s-]+(?:side|corner|part|portion|area|region|section))?"
                  r"(?:\s+(?:of|in)\s+the\s+(?:image|scene|picture|frame|photo|patch|view))?")
_PLACED = r"(?:(?:located|situated|positioned|found)\s+)?"
_PREPOSITION = r"(?:at|on|in|to|toward|towards|across)"
_LEADING_VERBS = r"seen|located|situated|positioned|found|lying|sitting|parked|visible"
# Words that end an instance subject's adjectives (so "a ship next to a tank" is no subject).
_NOT_ADJECTIVES = (r"the|a|an|this|that|these|those|of|to|next|near|with|and|or|but|is|are|"
                   r"was|were|has|at|in|on|by|for|from|its|it")
_QUANTIFIERS = (r"numerous|many|several|a\s+few|few|some|multiple|various|"
                r"a\s+(?:group|cluster|number|row|line|series|set|collection|fleet)\s+of|"
                r"(?:rows|groups|clusters|lines)\s+of")
_NUMBER_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|"
                 "fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|"
                 "fifty|sixty|seventy|eighty|ninety")
_COUNT = rf"\d+|(?:{_NUMBER_WORDS})(?:-(?:{_NUMBER_WORDS}))?"
_LIST_MARKER_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")


@dataclass(frozen=True)
class Composition:
    """A tile's outcome, and how many grounded phrases were left out and why."""

    record: GroundedRecord | DroppedRecord
    skipped: dict[str, int] = field(default_factory=dict)


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


@dataclass(frozen=True)
class _Woven:
    """An annotator sentence split around its subject."""

    rest: Optional[str]  # what follows the removed subject, when the phrase can replace it
    text: str            # the whole sentence (used after a colon)
    say_position: bool   # whether the composer must state the plan's position
    adjectives: str = ""  # the removed subject's adjectives, kept before the tag ("large white ")


# ---------------------------------------------------------------------------------------------
# Text


def _prose(text: str) -> str:
    """One paragraph-ready run of sentences: lines joined, list markers gone, closing stop."""
    lines = [_LIST_MARKER_RE.sub("", line) for line in text.splitlines()]
    text = " ".join(" ".join(lines).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if text and text[-1] not in ".!?":
        text += "."
    return text


def _words(name: str) -> str:
    return r"[\s_-]+".join(re.escape(w) for w in name.split())


def _position_re(position: str) -> str:
    """A position as written in free text: 'left side' also matches 'the left (of the image)'."""
    position = re.sub(r"\s+side$", "", position.strip())
    words = [_POSITION_SYNONYMS.get(w.lower(), re.escape(w)) for w in position.split()]
    return r"[\s-]+".join(words) + _POSITION_TAIL


def where(position: str) -> str:
    """How the composer states a position or region: 'at the top left', 'in the top half',
    'across the whole image', 'in row 1, column 4' (names from the plan's grids)."""
    if position == "whole image":
        return "across the whole image"
    if position.startswith("row "):
        return f"in {position}"
    if position.endswith(" half"):
        return f"in the {position}"
    return f"at the {position}"


def _subject_re(kind: str, category: str, label: Optional[str],
                position: Optional[str]) -> re.Pattern[str]:
    """Leading subject naming the object(s), with the plan's position right after it.

    An instance's subject may carry up to three adjectives ("A large white ship"): they are
    kept, before the tag. A cluster's subject may carry a vague quantifier ("numerous"), which
    the phrase's own count word replaces, and an exact count ("seven ships"), which is kept
    after the tag (", seven in all,").
    """
    one, many = _words(readable(category)), _words(plural(category))
    if kind == "instance":
        adjective = rf"(?!(?:{_NOT_ADJECTIVES})\b)[a-z]+(?:-[a-z]+)*"
        subject = (rf"(?:(?:the|this|that|a|an)\s+(?:(?:marked|selected|highlighted)\s+)?"
                   rf"(?P<adjectives>(?:{adjective}\s+){{0,3}})(?:{one})|it)\b")
    else:
        quantifiers = _QUANTIFIERS + (rf"|{_words(label)}" if label else "")
        subject = (rf"(?:there\s+(?:are|is)\s+|(?:the|these|those)\s+)?"
                   rf"(?:(?:{quantifiers})\s+)?(?:(?P<count>{_COUNT})\s+)?(?:{many}|{one}s?)\b")
    placed = ""
    if position:
        placed = (rf"(?:\s*,?\s*{_PLACED}{_PREPOSITION}\s+the\s+{_position_re(position)}"
                  rf"(?:\s*(?P<comma>,))?(?=\s))?")
    return re.compile(rf"^{subject}{placed}\s*", re.IGNORECASE)


def _drop_leading_position(text: str, position: str) -> str:
    """'Seen at the top left, the ship is ...' -> 'the ship is ...'."""
    pattern = re.compile(rf"^(?:(?:{_LEADING_VERBS})\s+)?{_PREPOSITION}\s+the\s+"
                         rf"{_position_re(position)}\s*,\s*", re.IGNORECASE)
    return pattern.sub("", text, count=1)


def _drop_own_position(text: str, position: str) -> str:
    """Remove one 'at the <position> (of the image)' that ends a clause (before a comma or the
    end), unless a bare verb would remain ("is at the top left." stays)."""
    pattern = re.compile(rf"\s*,?\s*{_PLACED}{_PREPOSITION}\s+the\s+{_position_re(position)}"
                         rf"(?=\s*(?:,|[.!?]*$))", re.IGNORECASE)
    for m in pattern.finditer(text):
        kept = text[:m.start()].rstrip(" ,")
        last = kept.split()[-1].lower() if kept.split() else ""
        if last and last not in _NEEDS_COMPLEMENT:
            return kept + text[m.end():].lstrip(" ")
    return text


def _split_subject(g: Grounding, text: str) -> Optional[tuple[str, str]]:
    """(adjectives, rest) when `text` opens with the object as subject followed by a verb or a
    comma, else None."""
    m = _subject_re(g.kind, g.category, g.label, g.position).match(text)
    if not m or m.end() >= len(text):
        return None
    rest = text[m.end():]
    first = re.match(r"[A-Za-z]+", rest)
    if not (rest.startswith(",") or (first and first.group().lower() in _VERB_LED)):
        return None
    found = m.groupdict()
    if g.kind == "instance":
        if found.get("comma") and not rest.startswith(","):
            rest = ", " + rest  # the position stays right before it
        return (found.get("adjectives") or "").lower(), rest
    # A cluster's phrase is plural, and its position moves to the front of the sentence.
    if not rest.startswith(","):
        verb, _, tail = rest.partition(" ")
        rest = " ".join(filter(None, [_SINGULAR_TO_PLURAL.get(verb.lower(), verb), tail]))
    if found.get("count"):
        count = found["count"].lower()
        rest = f", {count} in all{rest}" if rest.startswith(",") else f", {count} in all, {rest}"
    return "", rest


def _weave(g: Grounding) -> _Woven:
    """Split the annotator sentence around its subject (see the module docstring)."""
    text = g.text
    split = _split_subject(g, text)
    if split is None and g.position:
        unplaced = _drop_leading_position(text, g.position)
        if unplaced != text:
            split = _split_subject(g, unplaced)
    adjectives, rest = split if split else ("", None)
    if g.position:
        text = _drop_own_position(text, g.position)
        rest = _drop_own_position(rest, g.position) if rest else rest
    # Still named: the position as a whole phrase ("the left edge" does not name "left side").
    named = g.position and re.search(rf"\bthe\s+{_position_re(g.position)}(?![\s-]*[A-Za-z])",
                                     rest if rest is not None else text, re.IGNORECASE)
    if text.split()[0] in _LOWER_AFTER_COLON:
        text = text[0].lower() + text[1:]
    return _Woven(rest=rest, text=text, say_position=bool(g.position) and not named,
                  adjectives=adjectives)


def _tag(text: str) -> str:
    return f"<p> {text} </p> {SEG}"


def _join(head: str, woven: _Woven, rest: Optional[str]) -> str:
    if rest is None:
        return f"{head}: {woven.text}"
    if rest.startswith(","):
        return f"{head} {rest}" if head.endswith(SEG) else f"{head}{rest}"
    return f"{head} {rest}"


def _instance_sentence(names: Sequence[str], woven: _Woven, position: Optional[str]) -> str:
    tags = [_tag(n) for n in names]
    if len(tags) == 1:
        subject = tags[0]
    elif len(tags) == 2:
        subject = f"{tags[0]} and {tags[1]}"
    else:
        subject = " , ".join(tags[:-1]) + f" , and {tags[-1]}"
    head = f"The {woven.adjectives}{subject}"
    if position and woven.say_position:
        head += f" {where(position)}"
    rest = woven.rest
    if rest is not None and len(names) > 1:
        first, _, tail = rest.partition(" ")
        rest = " ".join(filter(None, [_SINGULAR_TO_PLURAL.get(first.lower(), first), tail]))
    return _join(head, woven, rest)


def _cluster_sentence(name: str, woven: _Woven, region: Optional[str]) -> str:
    lead = ""
    if region and woven.say_position:
        placed = where(region)
        lead = f"{placed[0].upper()}{placed[1:]}, "
    if woven.rest is None:
        opener = "there are" if lead else "There are"
        return f"{lead}{opener} {_tag(name)}: {woven.text}"
    head = f"{lead}{_tag(name)}" if lead else f"Here, {_tag(name)}"
    return _join(head, woven, woven.rest)


def _group_key(g: Grounding, woven: _Woven) -> Optional[tuple]:
    """Instances share a sentence only if category, position and description agree and the
    description opens with a verb whose number can follow the group."""
    if woven.rest is None or woven.rest.startswith(","):
        return None
    first = woven.rest.split()[0].lower()
    if first not in _SINGULAR_TO_PLURAL and first not in _NUMBER_NEUTRAL:
        return None
    said = " ".join(woven.rest.lower().split()).rstrip(".!?")
    return (g.category, g.position, woven.say_position, woven.adjectives, said)


# ---------------------------------------------------------------------------------------------
# One tile


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
    requests, responses = unbatch_marks(tile, plan, requests, responses)
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


def compose(tile: Tile, plan: TilePlan, requests: Sequence[Request],
            responses: Sequence[Response], params: ComposeParams,
            provenance: Provenance) -> Composition:
    """Compose one tile, and count the phrases left out (failed, missing, injected, empty)."""
    found = tile_groundings(tile, plan, requests, responses)
    skipped: Counter[str] = Counter(found.skipped if isinstance(found, Groundings) else {})

    def dropped(reason: str, detail: str = "") -> Composition:
        record = DroppedRecord(tile_id=tile.tile_id, split=tile.split, stage=STAGE,
                               reason=reason, detail=detail)
        return Composition(record, dict(sorted(skipped.items())))

    if not isinstance(found, Groundings):
        return dropped(*found)
    scene, instances, clusters = found.scene, found.instances, found.clusters
    sentences, phrases = list(scene), []
    for names_and_groundings, woven in _instance_sentences(instances, params):
        names = [n for n, _ in names_and_groundings]
        sentences.append(_instance_sentence(names, woven, names_and_groundings[0][1].position))
        phrases.extend(_phrase(n, g) for n, g in names_and_groundings)
    for g in clusters:
        name = cluster_name(g)
        sentences.append(_cluster_sentence(name, _weave(g), g.position))
        phrases.append(_phrase(name, g))

    if not phrases and params.require_phrases:
        detail = ",".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        return dropped("no_phrases", detail)
    record = GroundedRecord(record_id=tile.tile_id, tile_id=tile.tile_id, split=tile.split,
                            caption=" ".join(sentences), phrases=phrases, provenance=provenance)
    reasons = validate_record(record, params, (tile.height, tile.width))
    if reasons:
        return dropped(reasons[0], ",".join(reasons))
    return Composition(record, dict(sorted(skipped.items())))


def cluster_name(g: Grounding) -> str:
    """A cluster's phrase: its count word and plural category ("numerous small vehicles")."""
    return f"{g.label} {plural(g.category)}" if g.label else plural(g.category)


def unbatch_marks(tile: Tile, plan: TilePlan, requests: Sequence[Request],
                  responses: Sequence[Response]) -> tuple[list[Request], list[Response]]:
    """Batched-marks requests and answers of a tile as the per-mark instance requests and
    answers they bundle (the answer's text is the JSON list [{"mark": n, "description": ...}];
    a mark it does not describe has no answer). Other requests and answers pass unchanged."""
    from pipeline.plan import mark_requests

    batches = [r for r in requests if r.kind == "instance_batch" and r.tile_id == tile.tile_id]
    if not batches:
        return list(requests), list(responses)
    answer = _answers(responses)
    out_requests = [r for r in requests if r.kind != "instance_batch"]
    out_responses = [r for r in responses if r.kind != "instance_batch"]
    for batch in batches:
        singles = [q for q in mark_requests(tile, plan, batch.prompt_version)
                   if q.object_ids[0] in batch.object_ids]
        out_requests.extend(singles)
        resp = answer.get(batch.request_id)
        if resp is None:
            continue
        described: dict[int, str] = {}
        if resp.status == "ok":
            try:
                described = {int(m["mark"]): str(m["description"]) for m in json.loads(resp.text)}
            except (ValueError, TypeError, KeyError):
                described = {}
        for q in singles:
            if resp.status == "ok" and q.mark_number not in described:
                continue
            out_responses.append(resp.model_copy(update={
                "request_id": q.request_id, "kind": "instance",
                "text": described.get(q.mark_number, ""),
                "usage": Usage(), "cost_usd": 0.0}))
    return out_requests, out_responses


def compose_tile(tile: Tile, plan: TilePlan, requests: Sequence[Request],
                 responses: Sequence[Response], params: ComposeParams,
                 provenance: Provenance) -> GroundedRecord | DroppedRecord:
    """One tile's grounded record, or why it has none. Pure and deterministic."""
    return compose(tile, plan, requests, responses, params, provenance).record


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


def _instance_sentences(instances: list[Grounding], params: ComposeParams):
    """Instance sentences in caption order, each with its (phrase name, grounding) pairs.

    Categories in order of first appearance, instances in mark order within one; grouped
    instances share the sentence of their first member. Indices count per category in
    caption order.
    """
    by_category: dict[str, list[Grounding]] = {}
    for g in instances:
        by_category.setdefault(g.category, []).append(g)
    units: list[tuple[list[Grounding], _Woven]] = []
    for members in by_category.values():
        slots: dict[tuple, int] = {}
        for g in members:
            woven = _weave(g)
            key = _group_key(g, woven) if params.group_instances else None
            if key is not None and key in slots:
                units[slots[key]][0].append(g)
                continue
            if key is not None:
                slots[key] = len(units)
            units.append(([g], woven))
    counter: Counter[str] = Counter()
    out = []
    for members, woven in units:
        named = []
        for g in members:
            counter[g.category] += 1
            named.append((f"{readable(g.category)}-{counter[g.category]}", g))
        out.append((named, woven))
    return out


def _phrase(name: str, g: Grounding) -> Phrase:
    return Phrase(text=name, kind=g.kind, category=g.category, object_ids=list(g.object_ids),
                  mask=g.mask)


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


# ---------------------------------------------------------------------------------------------
# The stage


def _inputs(name: str, tiles_dir: Path, plan_dir: Path, responses_dir: Path) -> dict[str, Path]:
    paths = {"tiles": tiles_dir / name, "plan": plan_dir / "tiles" / name}
    for kind in KINDS:
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
    for kind in KINDS:
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
            from annotators.llm_composer import draft

            found = tile_groundings(tile, plan, reqs, resps)
            if isinstance(found, Groundings):
                drafts.append(draft(tile, found, reqs, resps))
                slots.append(len(records))
        (records if isinstance(result.record, GroundedRecord) else drops).append(result.record)

    llm: Counter[str] = Counter()
    if drafts:
        from annotators.llm_composer import compose_with_llm

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
    and keep the previous `out_dir` (`pipeline.failure_policy`)."""
    tiles_dir, plan_dir = Path(tiles_dir), Path(plan_dir)
    responses_dir, out_dir = Path(responses_dir), Path(out_dir)
    names = [p.name for p in list_shards(tiles_dir)]
    if not names:
        raise EmptyInputError("no tile shards to compose", tiles_dir)
    for name in names:
        for what, path in _inputs(name, tiles_dir, plan_dir, responses_dir).items():
            if not path.is_file():
                raise EmptyInputError(f"missing {what} shard for tile shard {name} "
                                      f"(run the earlier stages first)", path)

    llm_cache, local = None, params.runner.local_scheduler
    if params.compose.composer == "llm":
        from annotators.base import get_backend, local_scheduler_for
        from annotators.llm_composer import composer_backend

        # set-up mistakes stop here, before any work
        local = local_scheduler_for(
            get_backend(composer_backend(params), cache=params.annotate.cache), local)
        # workers may run elsewhere: the cache path must not depend on their working folder
        llm_cache = params.annotate.cache.model_copy(
            update={"path": str(Path(params.annotate.cache.path).resolve())})

    with staged_folder(out_dir, stage="compose", inputs=[tiles_dir, plan_dir, responses_dir],
                       count_key="records") as staging:
        (staging / "dropped").mkdir()
        task = partial(compose_shard, params=params, tiles_dir=tiles_dir, plan_dir=plan_dir,
                       responses_dir=responses_dir, staging=staging, llm_cache=llm_cache)
        counts = map_shards(task, names, label=STAGE, scheduler=scheduler,
                            local_scheduler=local, workers=params.runner.workers)
        report = _report(counts)
        # too many tiles lost: raised here, the staged folder is dropped and out_dir kept
        check_compose(report, next((c["first_drop"] for c in counts if c.get("first_drop")),
                                   None), params.compose.max_dropped_share, out_dir)
        report["composer"] = params.compose.composer
        if params.compose.composer == "llm":
            llm = Counter()
            for c in counts:
                llm.update(c["llm"])
            composed = llm.pop("composed", 0)
            report["llm"] = {"asked": composed + sum(llm.values()), "composed": composed,
                             "fallbacks": dict(sorted(llm.items()))}
        write_json(staging / "report.json", report)
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
