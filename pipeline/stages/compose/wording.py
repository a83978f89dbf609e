"""The deterministic composer: the words of a tile's paragraph around its grounding tags.

The paper merges the three passes with an LLM; this is the deterministic composer: the same
inputs always give the same bytes, and it only rearranges the annotators' words around the
grounding tags, it never invents a fact. The paragraph, in GeoPixelD's style:

1. the holistic sentences (the scene), as the model wrote them, except a hedged reading at
   their end ("This could be a recreational facility.", `_HEDGE_RE`), which moves to 4.;
2. one sentence per instance, categories in order of their first mark, marks in number order:
   "The <p> ship-1 </p> [SEG] at the top left is moored beside the pier."  Same-category
   instances at one position whose descriptions are identical share one sentence
   (`compose.group_instances`, `_group_key`): "The <p> tennis court-2 </p> [SEG] , <p> tennis
   court-3 </p> [SEG] , and <p> tennis court-4 </p> [SEG] at the bottom right have white
   lines." A shared sentence states nothing that is not true of each of them: the text after
   the subject must be the same character for character, not merely similar;
3. one sentence per cluster, in plan order: "At the left side, <p> numerous small vehicles
   </p> [SEG] are parked in rows.";
4. the hedged reading of the scene, as GeoPixelD's captions end.

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
  next to an instance's tag ("The <p> ship-1 </p> [SEG] at the top left is ...", "Toward the
  top left, the <p> ship-1 </p> [SEG] is ..."), at the front of a cluster's sentence ("At the
  left side, <p> ... </p> [SEG] are ...");
- a subject is only removed if a verb or a comma follows it; otherwise the whole text follows a
  colon ("The <p> ship-1 </p> [SEG] at the top left: a white hull with a red deck.", "At the
  left side, there are <p> many ships </p> [SEG]: boats moored in a harbour.").

The composer's own words vary, so that paragraphs of similar tiles are not framed word for word
alike: how a position is said (`leads`: "at the left side", "in the left half", "on the left",
...), where it goes (before or after an instance's tag) and how a kept count is said (", seven
in all,", ", seven of them,", ...). The choice is a hash of (`compose.seed`, tile id, slot), and
the n-th sentence of a paragraph takes the next wording of each slot, so two sentences of one
paragraph are not framed alike either. Every wording says the same position or count.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pipeline.core.params import ComposeParams
from pipeline.core.text import split_sentences, stable_choice
from pipeline.core.validate import validate_record
from pipeline.geometry.categories import plural, readable
from pipeline.stages.compose.grounding import Grounding, Groundings, tile_groundings
from schemas import (
    SEG,
    DroppedRecord,
    GroundedRecord,
    Phrase,
    Provenance,
    Request,
    Response,
    Tile,
    TilePlan,
)

STAGE = "compose"


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


_POSITION_TAIL = (r"(?:[\s-]+(?:hand[\s-]+side|side|corner|part|portion|area|region|section|"
                  r"half))?"
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


# A hedged reading of the scene ("This could be a recreational facility."): when the holistic
# answer ends with such sentences they close the paragraph, as in GeoPixelD. Openings with "It"
# are not moved: after the object sentences "it" would seem to mean the last object.
_HEDGE_RE = re.compile(
    r"^(?:perhaps|possibly|probably|presumably|"
    r"(?:this|the\s+(?:scene|site|area|place|setting|image|location|facility|complex))\s+"
    r"(?:could|may|might|would|is\s+(?:likely|probably|possibly|perhaps)|"
    r"(?:seems|appears)\s+to\s+be)\b)", re.IGNORECASE)


# How an exact count the annotator gave is kept after a cluster's tag: ", seven in all,".
_COUNT_FORMS = ("{} in all", "numbering {}", "{} of them", "{} altogether", "{} all told",
                "{} strong")


Choice = Callable[[str, int], int]


def _chooser(seed: int, tile_id: str) -> Choice:
    """`choose(slot, n)`: the composer's stable choice among n wordings of one slot of a tile's
    paragraph (`compose.seed`): the same inputs give the same caption, and captions of
    similar tiles are not framed word for word alike."""
    def choose(slot: str, n: int) -> int:
        return stable_choice(f"{seed}\x1f{tile_id}\x1f{slot}", n)
    return choose


def _first_choice(slot: str, n: int) -> int:
    return 0


def leads(position: str) -> tuple[str, ...]:
    """Ways to say where a plan position or region is, each true of it, the first as `where`
    says it: 'at the left side', 'in the left half', 'on the left', ... for the 1x2 region
    "left side"; 'at the top left', 'in the upper left', 'toward the top left' for a corner.
    Their last words differ, so that the words before a tag vary with the choice."""
    if position == "whole image" or position.startswith("row "):
        return (where(position),) + (("throughout the image", "all over the image")
                                     if position == "whole image" else ())
    words = position.split()
    upper = {"top": "upper", "bottom": "lower"}
    if len(words) == 2 and words[1] == "side":
        side = words[0]
        return (f"at the {side} side", f"in the {side} half", f"on the {side}",
                f"across the {side} part", f"on the {side} flank", f"in the {side} sector")
    if len(words) == 2 and words[1] == "half" and words[0] in upper:
        return (f"in the {position}", f"in the {upper[words[0]]} half",
                f"across the {upper[words[0]]} half")
    if len(words) == 2 and words[0] in upper:
        return (f"at the {position}", f"in the {upper[words[0]]} {words[1]}",
                f"toward the {position}")
    if position in ("center", "centre", "middle"):
        return ("at the center", "in the middle", "around the center")
    if position in upper:
        return (f"at the {position}", f"toward the {position}", f"in the {upper[position]} middle")
    if position in ("left", "right"):
        return (f"at the {position}", f"toward the {position}", f"on the {position}")
    return (where(position),)


@dataclass(frozen=True)
class Composition:
    """A tile's outcome, and how many grounded phrases were left out and why."""

    record: GroundedRecord | DroppedRecord
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Woven:
    """An annotator sentence split around its subject."""

    rest: Optional[str]  # what follows the removed subject, when the phrase can replace it
    text: str            # the whole sentence (used after a colon)
    say_position: bool   # whether the composer must state the plan's position
    adjectives: str = ""  # the removed subject's adjectives, kept before the tag ("large white ")


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


def _split_subject(g: Grounding, text: str,
                   count_form: str = _COUNT_FORMS[0]) -> Optional[tuple[str, str]]:
    """(adjectives, rest) when `text` opens with the object as subject followed by a verb or a
    comma, else None."""
    m = _subject_re(g.kind, g.category, g.label, g.position).match(text)
    if not m or m.end() >= len(text):
        return None
    rest = text[m.end():]
    found = m.groupdict()
    if g.kind == "cluster" and found.get("comma") and not rest.startswith(","):
        rest = ", " + rest  # "There are seven ships at the top, moored ...": the comma stays
    first = re.match(r"[A-Za-z]+", rest)
    if not (rest.startswith(",") or (first and first.group().lower() in _VERB_LED)):
        return None
    if g.kind == "instance":
        if found.get("comma") and not rest.startswith(","):
            rest = ", " + rest  # the position stays right before it
        return (found.get("adjectives") or "").lower(), rest
    # A cluster's phrase is plural, and its position moves to the front of the sentence.
    if not rest.startswith(","):
        verb, _, tail = rest.partition(" ")
        rest = " ".join(filter(None, [_SINGULAR_TO_PLURAL.get(verb.lower(), verb), tail]))
    if found.get("count"):
        count = count_form.format(found["count"].lower())
        rest = f", {count}{rest}" if rest.startswith(",") else f", {count}, {rest}"
    return "", rest


def _weave(g: Grounding, count_form: str = _COUNT_FORMS[0]) -> _Woven:
    """Split the annotator sentence around its subject (see the module docstring)."""
    text = g.text
    split = _split_subject(g, text, count_form)
    if split is None and g.position:
        unplaced = _drop_leading_position(text, g.position)
        if unplaced != text:
            split = _split_subject(g, unplaced, count_form)
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


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _instance_sentence(names: Sequence[str], woven: _Woven, position: Optional[str],
                       choose: Choice = _first_choice) -> str:
    """'The <p> ship-1 </p> [SEG] at the top left is ...' or 'Toward the top left, the <p>
    ship-1 </p> [SEG] is ...' (`choose` picks the wording of the position and its place)."""
    tags = [_tag(n) for n in names]
    if len(tags) == 1:
        subject = tags[0]
    elif len(tags) == 2:
        subject = f"{tags[0]} and {tags[1]}"
    else:
        subject = " , ".join(tags[:-1]) + f" , and {tags[-1]}"
    rest = woven.rest
    if rest is not None and len(names) > 1:
        first, _, tail = rest.partition(" ")
        rest = " ".join(filter(None, [_SINGULAR_TO_PLURAL.get(first.lower(), first), tail]))
    if not (position and woven.say_position):
        return _join(f"The {woven.adjectives}{subject}", woven, rest)
    options = leads(position)
    placed = options[choose("where", len(options))]
    if rest is not None and choose("frame", 2):
        return _join(f"{_capital(placed)}, the {woven.adjectives}{subject}", woven, rest)
    return _join(f"The {woven.adjectives}{subject} {placed}", woven, rest)


def _cluster_sentence(name: str, woven: _Woven, region: Optional[str],
                      choose: Choice = _first_choice) -> str:
    lead = ""
    if region and woven.say_position:
        options = leads(region)
        lead = f"{_capital(options[choose('where', len(options))])}, "
    if woven.rest is None:
        opener = "there are" if lead else "There are"
        return f"{lead}{opener} {_tag(name)}: {woven.text}"
    head = f"{lead}{_tag(name)}" if lead else f"Here, {_tag(name)}"
    return _join(head, woven, woven.rest)


def _group_key(g: Grounding, woven: _Woven) -> Optional[tuple]:
    """Instances share a sentence only if everything it states holds for each of them: same
    category, same plan position (and whether the composer states it), same adjectives kept
    before the tag, and the same text after the subject, character for character: identical,
    not merely alike ("is dark grey" and "is dark blue" never share a sentence). The template
    backend words objects with the same measured facts alike (`annotators.template.
    instance_picker`), so its answers share exactly when colour, size, orientation and
    neighbours agree. The text must also open with a verb whose number can follow the group."""
    if woven.rest is None or woven.rest.startswith(","):
        return None
    first = woven.rest.split()[0].lower()
    if first not in _SINGULAR_TO_PLURAL and first not in _NUMBER_NEUTRAL:
        return None
    return (g.category, g.position, woven.say_position, woven.adjectives,
            " ".join(woven.rest.split()))


def _closing(scene: Sequence[str]) -> tuple[list[str], list[str]]:
    """The scene sentences split into those that open the paragraph and the hedged reading
    that closes it (the trailing sentences `_HEDGE_RE` recognises; at least one stays first)."""
    sentences = [s for text in scene for s in split_sentences(text)]
    k = len(sentences)
    while k > 1 and _HEDGE_RE.match(sentences[k - 1]):
        k -= 1
    return sentences[:k], sentences[k:]


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
    choose = _chooser(params.seed, tile.tile_id)

    def nth(u: int, base: str) -> Choice:
        # the u-th instance (or cluster) sentence takes the next wording of each slot: two
        # neighbouring sentences of a paragraph are never framed alike
        return lambda slot, n: (choose(f"{base}/{slot}", n) + u) % n

    opening, closing = _closing(scene)
    sentences, phrases = list(opening), []
    for u, (names_and_groundings, woven) in enumerate(_instance_sentences(instances, params)):
        names = [n for n, _ in names_and_groundings]
        sentences.append(_instance_sentence(names, woven, names_and_groundings[0][1].position,
                                            nth(u, "instance")))
        phrases.extend(_phrase(n, g) for n, g in names_and_groundings)
    for k, g in enumerate(clusters):
        name = cluster_name(g)
        form = _COUNT_FORMS[nth(k, "cluster")("count", len(_COUNT_FORMS))]
        sentences.append(_cluster_sentence(name, _weave(g, form), g.position,
                                           nth(k, "cluster")))
        phrases.append(_phrase(name, g))
    sentences.extend(closing)

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

