"""The offline template backend: short descriptions written from measured attributes.

No model is involved: every colour, size, orientation, position, arrangement and count it states
is measured on the tile's pixels and masks, once, by plan (`pipeline.geometry.measure`, stored in
`TilePlan.measurements`; a tile handed over without its plan is measured here). It answers the
three request kinds the way the paper's prompts ask (four short sentences; one sentence per
marked object; one sentence per cluster), never mentions a mark number (it writes no digits at
all) and never writes phrase tags.

The holistic answer reads like GeoPixelD's: it opens with the scene, named from evidence by
`attributes.SCENE_RULES` (categories, their counts, arrangement and colours, the ground cover),
and ends with a hedged reading of it ("This could be a school bus yard."), which the composer
moves to the end of the paragraph.

Each fact has several wordings (COVER_WORDS, ARRANGEMENT_WORDS, ...), chosen by a hash of
(request id, seed) and a slot name, so captions of similar scenes do not repeat one another; an
instance answer's choices hash its tile and stated facts instead (`instance_picker`), so objects
with the same facts get the same sentence, which the composer may share between them. The same
input always gives the same text, so a build with this backend is byte-reproducible.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Sequence

from annotators import attributes as attr
from annotators.base import AnnotationContext, Backend
from pipeline.core.errors import BadImageError
from pipeline.core.params import BackendParams
from pipeline.core.text import stable_choice
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
            pick = instance_picker(measure, ids[0], category, request.position, self.params.seed)
            return instance_text(measure, ids[0], category, request.position, pick)
        return cluster_text(measure, ids, category, request.position,
                            cluster_picker(request, self.params.seed))

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
        return stable_choice(f"{request_id}\x1f{seed}\x1f{slot}", n)
    return pick


def _one(options: Sequence[str], pick: Picker, slot: str) -> str:
    """One of `options`, chosen for this request's `slot`."""
    return options[pick(slot, len(options))]


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _at(pos: str, pick: Picker) -> str:
    """Position phrase: 'at the top left', 'at the top left of the image', 'toward the top left'
    (forms the composer recognises, so that it states the plan's position once)."""
    return ("at the {}", "at the {} of the image", "toward the {}")[pick("pos", 3)].format(pos)


def _many(phrase: str) -> bool:
    """Whether a cover or category phrase is plural: its head noun, the word before "of" when
    there is one ('patches of greenery'), else its last word ('grey paved surfaces')."""
    words = phrase.split()
    head = words[words.index("of") - 1] if "of" in words[1:] else words[-1]
    return head.endswith("s") and not head.endswith("ss")


def _is(name: str) -> str:
    """Verb agreement for cover and category phrases ('surfaces are', 'water is')."""
    return "are" if _many(name) else "is"


def _covers(name: str) -> str:
    return "cover" if _many(name) else "covers"


def _verb(name: str, plural_form: str, singular_form: str) -> str:
    return plural_form if _many(name) else singular_form


def _size_adjective(size: attr.Size | None, category: str) -> str | None:
    if size is None:
        return None
    first = readable(category).split()[0]
    return _SIZE_SYNONYMS.get(size.word, size.word) if size.word == first else size.word


# =============================================================================================
# Words: each measured fact has several wordings that say the same thing, so that captions of
# similar scenes do not repeat one another word for word (the wording is picked per request,
# the fact never changes). A fixed run of words is kept to about four: then any five words in a
# row span two independent choices (or a measured word: a count, a colour, a position), and no
# five-word sequence recurs across most captions.

# Ground-cover classes (pipeline.geometry.measure.COVER_CLASSES) and other names for them.
COVER_WORDS: dict[str, tuple[str, ...]] = {
    "grey paved surfaces": ("grey paved surfaces", "paved grey surfaces", "grey paving",
                            "grey pavement"),
    "dark areas": ("dark areas", "dark patches", "darker patches", "dark ground"),
    "bare brown soil": ("bare brown soil", "bare brown earth", "brown bare earth",
                        "brown soil"),
    "green vegetation": ("green vegetation", "greenery", "vegetation", "patches of greenery"),
    "water": ("water", "open water", "water surfaces"),
    "light sandy ground": ("light sandy ground", "pale sandy ground", "sandy soil"),
    "bright pale surfaces": ("bright pale surfaces", "pale bright surfaces",
                             "bright pale areas"),
    "reddish surfaces": ("reddish surfaces", "reddish areas", "red-toned surfaces"),
}

# `attr.fraction_words` and other words for the same range of shares.
FRACTION_WORDS: dict[str, tuple[str, ...]] = {
    "nearly all": ("nearly all", "almost all"),
    "most": ("most", "the greater part"),
    "more than half": ("more than half", "over half", "the larger part"),
    "about half": ("about half", "roughly half", "around half"),
    "about a third": ("about a third", "roughly a third", "around a third"),
    "about a quarter": ("about a quarter", "roughly a quarter", "around a quarter"),
    "about a tenth": ("about a tenth", "roughly a tenth", "around a tenth"),
    "a small part": ("a small part", "a small share", "a little"),
}

# `attr.group_arrangement` words and other names for the same layout.
ARRANGEMENT_WORDS: dict[str, tuple[str, ...]] = {
    "parked side by side": ("parked side by side", "standing abreast", "parked in parallel",
                            "side by side", "next to each other", "shoulder to shoulder"),
    "parked side by side in a row": ("parked side by side in a row", "parked abreast in one row",
                                     "lined up side by side", "in one row, side by side",
                                     "abreast in a single row"),
    "side by side": ("side by side", "abreast", "in parallel", "alongside each other"),
    "side by side in a row": ("side by side in a row", "abreast in one row",
                              "lined up side by side"),
    "parked in a row": ("parked in a row", "parked in a line", "lined up in a row",
                        "parked in one line"),
    "lined up in a row": ("lined up in a row", "arranged in a line", "set out in a row",
                          "in a single line"),
    "in a tight group": ("in a tight group", "closely packed", "bunched together",
                         "tightly clustered"),
    "loosely grouped": ("loosely grouped", "in a loose group", "loosely spaced",
                        "spaced loosely"),
    "scattered": ("scattered", "spread out", "dotted about", "widely spaced",
                  "scattered about"),
}

# `attr.orientation_words` and other names for the same long-axis direction.
ORIENTATION_WORDS: dict[str, tuple[str, ...]] = {
    "oriented horizontally": ("oriented horizontally", "aligned horizontally",
                              "lying left to right", "set horizontally"),
    "oriented vertically": ("oriented vertically", "aligned vertically", "lying top to bottom",
                            "set vertically"),
    "oriented diagonally from top left to bottom right": (
        "oriented diagonally from top left to bottom right",
        "angled from top left to bottom right", "sloping down to the right"),
    "oriented diagonally from bottom left to top right": (
        "oriented diagonally from bottom left to top right",
        "angled from bottom left to top right", "sloping up to the right"),
}

# `attr.neighbourhood` openings and other wordings of the same relation.
NEIGHBOUR_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parked side by side with ", ("parked side by side with ", "parked alongside ",
                                   "parked abreast of ")),
    ("side by side with ", ("side by side with ", "alongside ")),
    ("lined up with ", ("lined up with ", "in line with ")),
    ("near ", ("near ", "close to ", "a short way from ")),
)

# What the median colour under an object's mask is the colour of, seen from above.
SURFACE_WORDS: dict[str, str] = {
    "small_vehicle": "roof", "large_vehicle": "roof", "ship": "deck", "storage_tank": "top",
    "plane": "body", "helicopter": "body", "bridge": "deck", "tennis_court": "surface",
    "basketball_court": "surface", "soccer_ball_field": "surface",
    "ground_track_field": "surface", "baseball_diamond": "surface", "harbor": "surface",
}

# Openings of the hedged reading that closes a holistic answer (the composer moves a trailing
# hedged sentence to the end of the paragraph; pipeline.stages.compose.wording recognises these).
HEDGES = ("this could be {}", "this may be {}", "perhaps this is {}", "this might be {}",
          "possibly this is {}", "this is possibly {}")

_GREYS = ("grey", "light grey", "dark grey")


def _cover(name: str, pick: Picker, slot: str) -> str:
    return _one(COVER_WORDS.get(name, (name,)), pick, slot)


def _fraction(share: float, pick: Picker, slot: str) -> str:
    words = attr.fraction_words(share)
    return _one(FRACTION_WORDS.get(words, (words,)), pick, slot)


def _arrangement(words: str | None, pick: Picker, slot: str = "arrangement") -> str | None:
    if not words:
        return None
    return _one(ARRANGEMENT_WORDS.get(words, (words,)), pick, slot)


def _orientation(words: str | None, pick: Picker) -> str | None:
    if not words:
        return None
    return _one(ORIENTATION_WORDS.get(words, (words,)), pick, "orientation")


def _neighbours(words: str | None, pick: Picker) -> str | None:
    if not words:
        return None
    alone = re.fullmatch(r"with no other (.+) nearby", words)
    if alone:  # 'with no other small vehicles nearby'
        return _one((words, f"standing apart from the other {alone[1]}",
                     f"set apart from the other {alone[1]}"), pick, "neighbours")
    for opening, options in NEIGHBOUR_WORDS:
        if words.startswith(opening):
            return _one(options, pick, "neighbours") + words[len(opening):]
    return words


def colour_words(names: Sequence[str], pick: Picker, slot: str = "colours") -> str:
    """The colours of a group's members as a predicate ('mostly yellow', 'all white', 'in
    yellow, white and grey', 'in white and shades of grey'): `attr.mix_colours`' facts (one
    colour, a colour of at least MOSTLY_MIN_SHARE of them, else the three most common), worded
    one of several ways."""
    mix = attr.mix_colours(names)
    top = mix.colours[0]
    if mix.members == 1:
        return top
    if mix.uniform:
        return _one((f"all {top}", f"uniformly {top}", f"{top} throughout"), pick, slot)
    if mix.mostly:
        return _one((f"mostly {top}", f"largely {top}", f"predominantly {top}",
                     f"mainly {top}", f"chiefly {top}"), pick, slot)
    shown = list(mix.colours)
    if sum(c in _GREYS for c in shown) >= 2 and pick(slot + ".greys", 2):
        first = next(i for i, c in enumerate(shown) if c in _GREYS)
        shown = [c for c in shown if c not in _GREYS]
        shown.insert(first, "shades of grey")
    if pick(slot + ".order", 2):
        shown.reverse()
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return _one((f"in {listed}", f"coloured {listed}", f"a mix of {listed}"), pick, slot)


# =============================================================================================
# Instance: one short sentence of attributes.


def instance_picker(measure: attr.TileMeasure, object_id: int, category: str,
                    position: str | None, seed: int) -> Picker:
    """The wording choices of an instance answer follow its tile and its stated facts, not its
    request: two objects of one tile with the same facts get the same sentence, which the
    composer may then give to both ("The <p> ship-1 </p> [SEG] and <p> ship-2 </p> [SEG] ...")
    without stating anything untrue of either."""
    facts = attr.describe_object(measure, object_id, category)
    size = facts["size"]
    key = "\x1e".join([measure.tile_id, attr.category_key(category), str(facts["colour"]),
                       size.word if isinstance(size, attr.Size) else "",
                       str(facts["orientation"] or ""), str(facts["neighbours"] or ""),
                       position or str(facts["cell"])])
    return _picker(key, seed)


def instance_text(measure: attr.TileMeasure, object_id: int, category: str,
                  position: str | None, pick: Picker) -> str:
    """One short sentence: the colour of one object at its position, and one more measured
    attribute when it has one (its size when not the usual, its orientation or its
    neighbours)."""
    facts = attr.describe_object(measure, object_id, category)
    cat = readable(category)
    colour = str(facts["colour"])
    size = _size_adjective(facts["size"], category)  # type: ignore[arg-type]
    if size == "medium-sized":
        size = None  # the usual size is no attribute worth a word
    at = _at(position or str(facts["cell"]), pick)
    extras = [e for e in (_orientation(facts["orientation"], pick),  # type: ignore[arg-type]
                          _neighbours(facts["neighbours"], pick)) if e]  # type: ignore[arg-type]
    if size or not pick("extras", 2):
        extras = []  # the size is this sentence's second attribute, or colour alone
    elif len(extras) == 2:
        extras = [extras[pick("extra", 2)]]
    tail = f", {extras[0]}" if extras else ""
    is_sized = f"{colour} and {size}" if size else colour
    sized = f"{size} {cat}" if size else cat
    surface = SURFACE_WORDS.get(attr.category_key(category))
    templates = [
        lambda: f"the {cat} {at} is {is_sized}{tail}",
        lambda: f"seen {at}, the {cat} is {is_sized}{tail}",
        lambda: f"this {colour} {cat} " + (f"is {size} and sits {at}" if size else f"sits {at}")
                + tail,
        lambda: f"the {sized} {at} appears {colour}{tail}",
        lambda: f"located {at}, this {sized} is {colour}{tail}",
        lambda: f"the {sized} {at} looks {colour}{tail}",
    ]
    if surface:
        templates.append(lambda: f"the {sized} {at} has a {colour} {surface}{tail}")
    return _sentence(templates[pick("instance", len(templates))]())


# =============================================================================================
# Cluster: one sentence about the group.


def cluster_picker(request: Request, seed: int) -> Picker:
    """The clusters of one tile take consecutive wordings of every slot (a picker of the tile,
    offset by the cluster's index in the plan, "c0", "c1", ...): one paragraph never words two
    of its groups alike. A cluster id of another form gets its request's own picker."""
    index = (request.cluster_id or "")[1:]
    if not (request.cluster_id or "").startswith("c") or not index.isdigit():
        return _picker(request.request_id, seed)
    tile = _picker(f"{request.tile_id}\x1ecluster", seed)
    return lambda slot, n: (tile(slot, n) + int(index)) % n


def cluster_text(measure: attr.TileMeasure, object_ids: Sequence[int], category: str,
                 position: str | None, pick: Picker) -> str:
    """One short sentence: the exact count of the group at its region, and its arrangement or
    its colour mix (both would make the paragraph long)."""
    facts = attr.describe_group(measure, object_ids, category)
    n = int(facts["count"])  # type: ignore[call-overload]
    group = attr.counted(n, category)
    at = _at(position or str(facts["cell"]), pick)
    be = "is" if n == 1 else "are"
    arrangement = _arrangement(facts["arrangement"], pick)  # type: ignore[arg-type]
    if arrangement and pick("which", 2):
        templates = [
            f"{group} {be} {arrangement} {at}",
            f"{at}, {group} {be} {arrangement}",
            f"{group} {at} {be} {arrangement}",
        ]
    else:
        colours = colour_words([measure.objects[i].colour for i in object_ids], pick)
        templates = [
            f"{group} {at} {be} {colours}",
            f"{at}, {group} {be} {colours}",
            f"{group} {be} {colours} {at}",
        ]
    return _sentence(templates[pick("cluster", len(templates))])


# =============================================================================================
# Holistic: four short sentences: the scene, its ground, its layout, a hedged reading.


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


def _opening(scene: str, inventory: str, n_objects: int, pick: Picker) -> str:
    """The scene first, as GeoPixelD's captions open, then what it holds."""
    be = "is" if n_objects == 1 else "are"
    return _one((
        f"the image is an aerial view of {scene}, with {inventory}",
        f"this aerial view shows {scene} with {inventory}",
        f"seen from above, {scene} holds {inventory}",
        f"the overhead view shows {scene}, where {inventory} {be} visible",
        f"{scene} is seen from above, with {inventory}",
        f"this image looks down on {scene} with {inventory}",
        f"the scene is {scene} with {inventory}",
        f"shown from above is {scene} with {inventory}",
        f"the photo shows {scene} from above, with {inventory}",
    ), pick, "opening")


def _reading(rule: attr.SceneRule, pick: Picker) -> str:
    """The closing interpretation, hedged: what the evidence suggests, never stated as fact."""
    return _one(HEDGES, pick, "hedge").format(_one(rule.readings, pick, "reading"))


def holistic_text(measure: attr.TileMeasure, pick: Picker) -> str:
    """Four sentences: the scene (named by attr.SCENE_RULES) and what it holds, the ground
    cover, where the objects lie or how the main category looks, and a hedged reading of the
    scene."""
    cover = measure.cover()
    counts = measure.category_counts()
    rule = attr.scene_rule(attr.scene_evidence(measure))
    scene = _one(rule.names, pick, "scene")
    if not counts:
        return " ".join(_sentence(s) for s in _empty_scene(cover, scene, rule, pick))
    opening = _opening(scene, _inventory(counts), len(measure.objects), pick)
    ground = _ground_sentence(measure, cover, pick)
    layout = _layout_sentence(measure, counts, pick)
    return " ".join(_sentence(s) for s in (opening, ground, layout, _reading(rule, pick)))


def _vegetation_clause(measure: attr.TileMeasure, cover: attr.GroundCover,
                       pick: Picker) -> str:
    """', and greenery at the top right', only when green cover may be named at all and the
    sentence has not named it already."""
    if not attr.vegetation_named(cover.shares) or "green vegetation" in (
            cover.dominant, cover.secondary):
        return ""
    cells = attr.cover_cells(measure.measurements, "green vegetation")
    best = max(cells, key=lambda c: (cells[c], c))
    green = _cover("green vegetation", pick, "green")
    return f"; {green} {_verb(green, 'lie', 'lies')} at the {best}"


def _ground_sentence(measure: attr.TileMeasure, cover: attr.GroundCover, pick: Picker) -> str:
    """The dominant ground cover and its share, the second one when common enough."""
    share = cover.shares[cover.dominant]
    dom = _cover(cover.dominant, pick, "dominant")
    second = cover.secondary
    sec = _cover(second, pick, "secondary") if second else ""
    frac = _fraction(share, pick, "fraction")
    frac2 = _fraction(cover.shares[second], pick, "fraction2") if second else ""
    ground = _one(("the ground", "the open ground", "the visible ground"), pick, "ground word")
    forms = [
        f"{dom} {_covers(dom)} {frac} of {ground}" + (f", {sec} {frac2}" if second else ""),
        f"{frac} of {ground} is {dom}" + (f", with {sec} over {frac2}" if second else ""),
        f"{dom} {_verb(dom, 'make', 'makes')} up {frac} of {ground}",
    ]
    if share >= attr.COVER_MOSTLY_MIN_SHARE:
        some = _one((f", with some {sec}", f", broken by {sec}", f", alongside some {sec}"),
                    pick, "some") if second else ""
        forms += [f"{ground} is mostly {dom}{some}",
                  f"{ground} is largely {dom}{some}",
                  f"between the objects {_verb(dom, 'lie', 'lies')} mostly {dom}{some}",
                  f"{dom} {_verb(dom, 'dominate', 'dominates')} {ground}{some}",
                  f"much of {ground} is {dom}{some}"]
    return _one(forms, pick, "ground") + _vegetation_clause(measure, cover, pick)


def _layout_sentence(measure: attr.TileMeasure, counts: dict[str, int], pick: Picker) -> str:
    """Where the objects lie (their area per 3x3 cell), or how the main category looks."""
    main = attr.dominant_category(counts)
    members = measure.of_category(main)
    where = measure.concentration()
    cell, cell_share = where if where else ("center", 0.0)
    if len(measure.objects) == 1:
        only = members[0]
        size = _size_adjective(attr.object_size(only.area, main, [only.area]), main)
        return (f"the only object, {attr.with_article(readable(main))}, is {only.colour}"
                + (f" and {size}" if size and size != "medium-sized" else "")
                + f" and lies {_at(only.cell, pick)}")
    if cell_share >= attr.CONCENTRATED_MIN_SHARE:
        frac = _fraction(cell_share, pick, "placement share")
        placement = _one((
            f"the objects cluster toward the {cell}",
            f"{frac} of the object area lies at the {cell}",
            f"the {cell} holds {frac} of the object area",
        ), pick, "placement")
    else:
        placement = _one((
            f"the objects are spread out, densest at the {cell}",
            f"objects spread across the tile, most thickly at the {cell}",
            f"the {cell} holds the largest share of the object area",
            f"object cover is heaviest at the {cell}",
        ), pick, "placement")
    if len(members) == 1:
        return placement
    colours = colour_words([o.colour for o in members], pick, "main colours")
    return _one((f"the {plural(main)} are {colours}", placement), pick, "layout")


def _empty_scene(cover: attr.GroundCover, scene: str, rule: attr.SceneRule,
                 pick: Picker) -> list[str]:
    """Four sentences about the ground alone (a tile without objects)."""
    dom, share = cover.dominant, cover.shares[cover.dominant]
    overview = _one((f"the image is an aerial view of {scene}",
                     f"this overhead image shows {scene}",
                     f"seen from above, the scene is {scene}"), pick, "opening")
    second = cover.secondary
    extent = f"{dom} {_covers(dom)} {attr.fraction_words(share)} of the ground"
    if second:
        extent += (f", and {second} {_covers(second)} "
                   f"{attr.fraction_words(cover.shares[second])}")
    spread = (f"the {dom} {_verb(dom, 'extend', 'extends')} across the whole image"
              if cover.dominant_everywhere else
              f"the {dom} {_is(dom)} most extensive at the {cover.dominant_cell}")
    spread += f", {cover.texture} in tone and {cover.tone}"
    return [overview, extent, spread, _reading(rule, pick)]
