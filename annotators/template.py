"""The offline template backend: short descriptions written from measured attributes.

No model is involved: every colour, size, orientation, position, arrangement and count it states
is measured on the tile's pixels and masks, once, by plan (`pipeline.geometry.measure`, stored in
`TilePlan.measurements`; a tile handed over without its plan is measured here). It answers the
three request kinds the way the paper's prompts ask (four short sentences; one sentence per
marked object; one sentence per cluster), never mentions a mark number (it writes no digits at
all) and never writes phrase tags. Wording varies between requests, chosen by a hash of (request id, seed): the same
input always gives the same text, so a build with this backend is byte-reproducible.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Callable, Sequence

from annotators import attributes as attr
from annotators.base import AnnotationContext, Backend
from pipeline.core.errors import BadImageError
from pipeline.core.params import BackendParams
from pipeline.geometry.categories import plural, readable
from schemas import Request, Response, Usage

# Latency is measured, then floored to this resolution: template answers take milliseconds, and
# a coarse clock keeps the written responses byte-identical from run to run.
LATENCY_RESOLUTION_S = 1.0

# A size word that would repeat the category's own first word ("a small small vehicle").
_SIZE_SYNONYMS = {"small": "compact", "large": "big"}


class Unanswerable(Exception):
    """A request this backend cannot answer from its context (recorded as a failed response)."""


class TemplateBackend(Backend):
    """Backend that writes descriptions from measured attributes, offline and deterministic."""

    name = "template"
    needs_pixels = False  # it states what plan measured (TilePlan.measurements)

    def __init__(self, params: BackendParams):
        self.params = params
        self.model = params.model

    def annotate(self, requests: Sequence[Request],
                 context: AnnotationContext) -> list[Response]:
        """One Response per request, in order; a request that cannot be answered fails alone."""
        measured: dict[str, attr.TileMeasure] = {}
        responses = []
        for request in requests:
            start = time.perf_counter()
            try:
                text, error = self.answer(request, context, measured), None
            except Unanswerable as exc:
                text, error = "", str(exc)
            latency = time.perf_counter() - start
            responses.append(Response(
                request_id=request.request_id, tile_id=request.tile_id, kind=request.kind,
                status="ok" if error is None else "failed", text=text, error=error,
                backend=self.name, model=self.model, prompt_version=request.prompt_version,
                usage=Usage(), cost_usd=0.0,
                latency_s=math.floor(latency / LATENCY_RESOLUTION_S) * LATENCY_RESOLUTION_S,
                attempts=1))
        return responses

    def answer(self, request: Request, context: AnnotationContext,
               measured: dict[str, attr.TileMeasure]) -> str:
        """The text for one request; raises Unanswerable when its inputs are missing."""
        measure = self.measure(request, context, measured)
        pick = _picker(request.request_id, self.params.seed)
        if request.kind == "holistic":
            return holistic_text(measure, pick)
        ids = list(request.object_ids)
        if not ids:
            raise Unanswerable(f"{request.kind} request {request.request_id} names no object")
        missing = [i for i in ids if i not in measure.objects]
        if missing:
            raise Unanswerable(f"object(s) {missing} of request {request.request_id} are not "
                               f"in tile {request.tile_id} (or have empty masks)")
        category = request.category or measure.objects[ids[0]].category
        if request.kind == "instance":
            return instance_text(measure, ids[0], category, request.position, pick)
        return cluster_text(measure, ids, category, request.position, pick)

    @staticmethod
    def measure(request: Request, context: AnnotationContext,
                measured: dict[str, attr.TileMeasure]) -> attr.TileMeasure:
        """The request's tile measured (as plan stored it, or measured here from the tile),
        once per tile; the image the request names must be that tile's or its marks image."""
        plan = context.plans.get(request.tile_id)
        stored = plan.measurements if plan is not None else None
        if stored is not None:
            if request.image_sha256 not in (stored.image_sha256, plan.som_sha256):
                raise Unanswerable(f"image {request.image_sha256} of request "
                                   f"{request.request_id} is neither the tile nor its marks "
                                   "image that plan measured")
        else:
            try:
                context.image(request.image_sha256)
            except KeyError:
                raise Unanswerable(f"image {request.image_sha256} of request "
                                   f"{request.request_id} is not in the annotation context"
                                   ) from None
        if request.tile_id in measured:
            return measured[request.tile_id]
        if stored is not None:
            found = attr.TileMeasure(tile_id=request.tile_id, measurements=stored)
        else:
            tile = context.tiles.get(request.tile_id)
            if tile is None:
                raise Unanswerable(f"tile {request.tile_id} is not in the annotation context")
            try:
                found = attr.measure_tile(tile)
            except (ValueError, BadImageError) as exc:
                raise Unanswerable(f"tile {request.tile_id}: {exc}") from None
        measured[request.tile_id] = found
        return found


Picker = Callable[[str, int], int]


def _picker(request_id: str, seed: int) -> Picker:
    """`pick(slot, n)`: a stable choice among n variants for one wording slot of a request."""
    def pick(slot: str, n: int) -> int:
        digest = hashlib.sha256(f"{request_id}\x1f{seed}\x1f{slot}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % n
    return pick


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _at(pos: str, pick: Picker) -> str:
    """Position phrase: 'at the top left', 'at the top left of the image', 'toward the top left'."""
    return ("at the {}", "at the {} of the image", "toward the {}")[pick("pos", 3)].format(pos)


def _is(name: str) -> str:
    """Verb agreement for cover and category phrases ('surfaces are', 'water is')."""
    return "are" if name.endswith("s") else "is"


def _covers(name: str) -> str:
    return "cover" if name.endswith("s") else "covers"


def _size_adjective(size: attr.Size | None, category: str) -> str | None:
    if size is None:
        return None
    first = readable(category).split()[0]
    return _SIZE_SYNONYMS.get(size.word, size.word) if size.word == first else size.word


# =============================================================================================
# Instance: one short sentence of attributes.


def instance_text(measure: attr.TileMeasure, object_id: int, category: str,
                  position: str | None, pick: Picker) -> str:
    """One sentence: colour, size, position, orientation, neighbours of one object."""
    facts = attr.describe_object(measure, object_id, category)
    cat = readable(category)
    colour = str(facts["colour"])
    size = _size_adjective(facts["size"], category)  # type: ignore[arg-type]
    at = _at(position or str(facts["cell"]), pick)
    extras = " and ".join(str(e) for e in (facts["orientation"], facts["neighbours"]) if e)
    tail = f", {extras}" if extras else ""
    sized = f"{size} {cat}" if size else cat
    is_sized = f"{colour} and {size}" if size else colour
    templates = [
        lambda: f"{attr.with_article(f'{size} {colour} {cat}' if size else f'{colour} {cat}')} "
                f"{at}{tail}",
        lambda: f"the {cat} {at} is {is_sized}{tail}",
        lambda: f"this {colour} {cat} " + (f"is {size} and sits {at}" if size else f"sits {at}")
                + tail,
        lambda: f"seen {at}, the {cat} is {is_sized}{tail}",
        lambda: f"{colour} in colour, the {sized} lies {at}{tail}",
        lambda: f"located {at}, this {sized} is {colour}{tail}",
    ]
    return _sentence(templates[pick("instance", len(templates))]())


# =============================================================================================
# Cluster: one sentence about the group.


def _colour_clause(mix: str) -> str:
    if mix.startswith(("all ", "mostly ")) or " " not in mix:
        return f"{mix} in colour"
    return f"in {mix}"


def cluster_text(measure: attr.TileMeasure, object_ids: Sequence[int], category: str,
                 position: str | None, pick: Picker) -> str:
    """One sentence: exact count, category, region, arrangement and colour mix of a group."""
    facts = attr.describe_group(measure, object_ids, category)
    n = int(facts["count"])  # type: ignore[call-overload]
    group = attr.counted(n, category)
    region = position or str(facts["cell"])
    at = _at(region, pick)
    colours = _colour_clause(str(facts["colours"]))
    arrangement = facts["arrangement"]
    be = "is" if n == 1 else "are"
    placed = f"{be} {arrangement}" if arrangement else ("appears" if n == 1 else "appear")
    placed_group = f"is {arrangement}" if arrangement else "appears"
    templates = [
        lambda: f"{group} {placed} {at}, {colours}",
        lambda: f"a group of {group} {placed_group} {at}, {colours}",
        lambda: f"{at}, there {be} {group}" + (f", {arrangement} and {colours}" if arrangement
                                               else f", {colours}"),
        lambda: f"the {region} of the image holds {group}"
                + (f" {arrangement}" if arrangement else "") + f", {colours}",
    ]
    return _sentence(templates[pick("cluster", len(templates))]())


# =============================================================================================
# Holistic: exactly four short sentences.


def _inventory(counts: dict[str, int]) -> str:
    """'thirty-one large vehicles, three small vehicles and one storage tank' (three kinds at
    most, then how many other kinds)."""
    ranked = sorted(counts, key=lambda c: (-counts[c], readable(c)))
    parts = [attr.counted(counts[c], c) for c in ranked[:3]]
    rest = len(ranked) - 3
    if rest > 0:
        parts.append(f"objects of {attr.number_word(rest)} other "
                     + ("kind" if rest == 1 else "kinds"))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def holistic_text(measure: attr.TileMeasure, pick: Picker) -> str:
    """Four sentences: overview, ground cover, where the objects are, the main category."""
    cover = measure.cover()
    counts = measure.category_counts()
    if not counts:
        return " ".join(_sentence(s) for s in _empty_scene(cover, pick))
    dom = cover.dominant
    inventory = _inventory(counts)
    overview = [
        f"this aerial image shows {dom} with {inventory}",
        f"the overhead view shows {inventory} among {dom}",
        f"the scene is an aerial view of {dom} with {inventory}",
    ][pick("overview", 3)]
    ground = _ground_sentence(cover, pick)
    where = measure.concentration()
    cell, cell_share = where if where else ("center", 0.0)
    if len(measure.objects) == 1:
        only = next(iter(measure.objects.values()))
        placement = f"the only object, {attr.with_article(readable(only.category))}, lies {_at(only.cell, pick)}"
    elif cell_share >= attr.CONCENTRATED_MIN_SHARE:
        placement = [
            f"the objects cluster toward the {cell}, which holds "
            f"{attr.fraction_words(cell_share)} of their area",
            f"{attr.fraction_words(cell_share)} of the object area lies at the {cell} of the image",
        ][pick("placement", 2)]
    else:
        placement = f"the objects are spread across the image, with the largest share at the {cell}"
    main = attr.dominant_category(counts)
    members = measure.of_category(main)
    if len(members) == 1:
        only = members[0]
        size = attr.object_size(only.area, main, [only.area])
        detail = (f"the {readable(main)} is {only.colour}"
                  + (f" and {_size_adjective(size, main)}" if size else ""))
    else:
        mix = _colour_clause(attr.colour_mix([o.colour for o in members]))
        arrangement = attr.group_arrangement([o.shape for o in members],
                                             [o.area for o in members], main)
        detail = f"the {plural(main)} are {mix}" + (f" and {arrangement}" if arrangement else "")
    return " ".join(_sentence(s) for s in (overview, ground, placement, detail))


def _ground_sentence(cover: attr.GroundCover, pick: Picker) -> str:
    dom, share = cover.dominant, cover.shares[cover.dominant]
    second = cover.secondary
    with_second = (f", with {second} over {attr.fraction_words(cover.shares[second])}"
                   if second else "")
    if share >= attr.COVER_MOSTLY_MIN_SHARE and pick("ground", 2):
        some = f", with some {second}" if second else ""
        return f"the ground is mostly {dom}{some}"
    return f"{dom} {_covers(dom)} {attr.fraction_words(share)} of the ground{with_second}"


def _empty_scene(cover: attr.GroundCover, pick: Picker) -> list[str]:
    """Four sentences about the ground cover alone (a tile without objects)."""
    dom, share = cover.dominant, cover.shares[cover.dominant]
    overview = [
        f"this aerial image shows an area of {dom}",
        f"the scene is an aerial view of {dom}",
        f"the overhead view shows an expanse of {dom}",
    ][pick("overview", 3)]
    second = cover.secondary
    if second:
        extent = (f"{second} {_covers(second)} {attr.fraction_words(cover.shares[second])} "
                  "of it")
    else:
        extent = f"{dom} {_covers(dom)} {attr.fraction_words(share)} of the ground"
    spread = (f"the {dom} {'extend' if dom.endswith('s') else 'extends'} across the whole image"
              if cover.dominant_everywhere else
              f"the {dom} {_is(dom)} most extensive at the {cover.dominant_cell}")
    tone = [
        f"the ground looks {cover.texture} in tone and {cover.tone}",
        f"its surface appears {cover.texture} in tone and {cover.tone} overall",
    ][pick("tone", 2)]
    return [overview, extent, spread, tone]
