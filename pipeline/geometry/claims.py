"""What a caption claims about each grounded phrase, checked against the phrase's masks.

`check_record(record, tile_measurements)` reads any backend's caption and returns one `Claim`
per checkable statement about a grounded phrase, each with what the masks and the tile's
measurements (`pipeline.geometry.measure`) say and a verdict, agree or disagree. The checks are
pure functions; the stored verdicts' schema, writer and reader (`claims.parquet`, written by the
qa stage, read by the review notebook) are at the end of the module.

Where a claim is looked for (conservative: a word that may not be about the phrase is skipped,
never flagged). A phrase's sentence is the `pipeline.core.text.split_sentences` sentence that
holds its `<p>`. Phrases of one sentence joined only by commas and "and"/"or" are coordinated
("The <p> A </p> [SEG] and <p> B </p> [SEG] at the left are grey"): they share their clause.
The clause of a phrase (its scope) is its own text plus the sentence around it, cut where the
next (previous) coordinated group's clause starts (ends): at the first (last) clause boundary
between them (`, ; : ( —`, "and", "but", "or", "while", "whereas") or, without one, before
the determiner that opens the other group's noun phrase. A coordinated partner's own text is
opaque in the scope (a word about it is not read as a word about this phrase).

Claim rules (tolerances are `QAParams.claim_*`):
- category: the first category noun in the phrase's OWN text (`CATEGORY_TERMS`: readable names,
  plurals and a small synonym table, e.g. car = small vehicle, truck / bus = large vehicle,
  boat / vessel = ship; `GENERIC_TERMS` such as "vehicle" or "court" name any of a few
  categories) against the phrase's category. Words like "object" are no claim; nor is anything
  about a phrase of unknown category ("object").
- count: a number ("three", "thirty-four", "34", "a pair of", "both", "a single") followed,
  within three words, by a noun of the phrase's category ("fourteen small vehicles"), or
  followed by "in all" / "in total" / "altogether" / "strong", or after "a total of" /
  "numbering", or an aside ", seven of them,"; it agrees when it equals the phrase's
  instances (`Phrase.object_ids`) or those of its coordinated group. No claims: approximate numbers
  ("about twenty", "over ten"), other sets ("one of the five ships", "near two trucks",
  "two other cars"), parts ("two of them are white"). Vague words ("a few", "several",
  "many", "numerous", "multiple", "a group of", ...) before a noun of the category are
  checked loosely: they agree when the phrase (or its coordinated group) grounds two or more.
- position: a grid position ("top left", "upper right corner", "left side", "top half",
  "center", "at right") after a preposition of place (at, in, on, toward, near, along,
  within; "across" with a part word: "across the left part"), "the <position> of the image"
  opening a clause, or "left / right of the midline";
  not when followed by "of <something>" other than the image (relative: "left of the road"),
  not inside a "with ..." clause (a part of the object), not after "from", "to" or "its"
  ("from top left to bottom right" is an orientation). The words name grid regions of
  `pipeline.geometry.grid.REGION_NAMES` (the planner's regions): a corner word ("top left")
  is its 3x3 cell or its 2x2 quadrant, a side word ("left", "left side", "right of the
  midline") its 3x3 cell or its half (1x2 / 2x1), "center" the 3x3 center cell, "center
  left" the 3x3 left cell. Each instance's point is its centroid in the planner's convention
  (`grid.pixel_position`: pixel centres, `grid.cell`). The claim agrees when at least
  `claim_group_share` of the phrase's instances lie in one of those regions (for one
  instance: it lies there). Alternatives ("left and right sides") agree when either does.
- colour: colour words ("dark grey", "yellow, white and grey", "black in colour", "a mix of
  white and shades of grey") attached to the phrase: followed by its noun, by "in colour",
  by punctuation or a verb / preposition, and not preceded by with / of / on / near ... (the
  colour of something else: "with a red roof", "on blue water"). A word fits an instance
  whose median RGB the template's namer (`annotators.attributes.colour_name`) names the same
  (an unmodified word also fits its dark / light variants: "grey" fits "dark grey"), or whose
  CIELAB colour lies within `claim_colour_delta_e` (CIE76 delta E) of the word's reference
  colour (`COLOUR_REFERENCES`; synonyms such as silver, gray, navy in `COLOUR_SYNONYMS`).
  One instance: agrees when any listed word fits. A group: a single colour agrees when at
  least `claim_group_share` of the members fit it; a list agrees when each listed colour fits
  at least one member.
- size: size words ("small", "tiny", "large", "big", "medium-sized", ...) attached to the
  phrase as colours are; "small vehicle" / "large vehicle" are category names, not sizes.
  An instance's size is the template's (`annotators.attributes.object_size`): its area against
  the median area of its category in the tile (three or more of them), else against the
  category's typical area; a size word agrees when that ratio lies in the word's band widened
  by the factor `claim_size_tolerance` on each side. A group: at least `claim_group_share` of
  the members agree. Categories without a typical area and fewer than three peers: no claim.

Without measurements (no tiles), only category and count are checked, and the position of
single-instance phrases (their point measured on the phrase's own mask).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TypeVar, get_args

import cv2
import numpy as np

from annotators import attributes as attr
from pipeline.core.params import QAParams
from pipeline.core.shards import read_records, write_records
from pipeline.core.text import number_words, plural_noun, split_sentences
from pipeline.geometry import masks
from pipeline.geometry.categories import UNKNOWN_CATEGORY
from pipeline.geometry.grid import REGION_NAMES, cell, pixel_position
from schemas import (
    CheckedClaim,
    ClaimType,
    GroundedRecord,
    ObjectMeasurement,
    Phrase,
    TileMeasurements,
    arrow_schema,
)

CLAIM_TYPES: tuple[str, ...] = get_args(ClaimType)
T = TypeVar("T")

__all__ = ["CLAIMS_FILE", "CLAIMS_SCHEMA", "CLAIM_TYPES", "Claim", "RecordClaims", "check_record",
           "claim_rows", "colour_fits", "failed", "failed_first", "read_claims", "region_names", "size_fits",
           "write_claims"]


@dataclass(frozen=True)
class Claim:
    """One statement of a caption about its `phrase`-th grounded phrase, checked.

    `words`: the caption's words that make it; `expected`: what the masks and measurements
    say; `verdict`: agree or disagree."""

    phrase: int
    type: str
    words: str
    expected: str
    verdict: str

    @property
    def failed(self) -> bool:
        return self.verdict == "disagree"


def failed(claims: Iterable[Claim]) -> list[Claim]:
    """The claims that disagree with the masks."""
    return [c for c in claims if c.failed]


def failed_first(items: Sequence[T], claims_of: Callable[[T], Iterable[Claim]]) -> list[T]:
    """`items` (records, or indices of records) whose claims (`claims_of`) hold a failed one
    first, then the others, each in their given order: the order the HTML report and the
    review notebook show records in."""
    return sorted(items, key=lambda item: not failed(claims_of(item)))


# =============================================================================================
# Vocabulary

# Category key (`attributes.category_key`: 'small_vehicle') -> its nouns, singular. Plurals are
# made by `_plural`. Synonyms are the words an annotator model uses for the iSAID classes.
CATEGORY_TERMS: dict[str, tuple[str, ...]] = {
    "small_vehicle": ("small vehicle", "car", "automobile", "sedan", "suv", "taxi", "hatchback"),
    "large_vehicle": ("large vehicle", "truck", "lorry", "bus", "trailer", "semi-trailer",
                      "tractor-trailer", "semi-truck", "coach"),
    "plane": ("plane", "airplane", "aeroplane", "airliner", "jet"),
    "helicopter": ("helicopter",),
    "ship": ("ship", "boat", "vessel", "yacht", "barge", "ferry", "sailboat", "tugboat",
             "speedboat"),
    "storage_tank": ("storage tank", "tank", "oil tank", "fuel tank"),
    "harbor": ("harbor", "harbour", "dock", "pier", "jetty", "wharf", "marina", "quay"),
    "bridge": ("bridge", "overpass", "flyover", "viaduct"),
    "swimming_pool": ("swimming pool", "pool"),
    "roundabout": ("roundabout", "traffic circle", "rotary"),
    "tennis_court": ("tennis court",),
    "basketball_court": ("basketball court",),
    "baseball_diamond": ("baseball diamond", "baseball field"),
    "soccer_ball_field": ("soccer ball field", "soccer field", "football field", "soccer pitch",
                          "football pitch"),
    "ground_track_field": ("ground track field", "track field", "running track",
                           "athletics track", "track and field"),
}
# Nouns that may name any of a few categories: they agree with each of them.
GENERIC_TERMS: dict[str, tuple[str, ...]] = {
    "vehicle": ("small_vehicle", "large_vehicle"),
    "van": ("small_vehicle", "large_vehicle"),
    "aircraft": ("plane", "helicopter"),
    "court": ("tennis_court", "basketball_court"),
    "field": ("soccer_ball_field", "ground_track_field", "baseball_diamond"),
    "pitch": ("soccer_ball_field", "ground_track_field", "baseball_diamond"),
}
_IRREGULAR_PLURALS = {"aircraft": "aircraft", "wharf": "wharves", "coach": "coaches"}

# Colour words -> the namer's name they stand for (`attributes.colour_name` vocabulary), and
# reference sRGB colours of every name (centres of the namer's bins, chosen by this project).
COLOUR_SYNONYMS: dict[str, str] = {
    "gray": "grey", "silver": "light grey", "charcoal": "dark grey", "tan": "beige",
    "cream": "beige", "khaki": "beige", "gold": "yellow", "golden": "yellow", "navy": "dark blue",
    "maroon": "dark red", "cyan": "teal", "turquoise": "teal", "violet": "purple",
    "magenta": "purple", "pink": "light red", "off-white": "white",
}
COLOUR_REFERENCES: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25), "dark grey": (70, 70, 70), "grey": (128, 128, 128),
    "light grey": (180, 180, 180), "white": (235, 235, 235),
    "red": (190, 40, 40), "dark red": (100, 25, 25), "light red": (235, 150, 160),
    "orange": (230, 130, 40), "dark orange": (100, 55, 20), "brown": (120, 75, 40),
    "yellow": (225, 200, 60), "olive": (100, 95, 35), "beige": (215, 200, 165),
    "green": (60, 150, 60), "dark green": (30, 80, 30), "light green": (160, 215, 160),
    "teal": (40, 140, 140), "dark teal": (20, 75, 75), "light teal": (150, 215, 215),
    "blue": (50, 90, 190), "dark blue": (25, 40, 100), "light blue": (150, 190, 230),
    "purple": (120, 60, 160), "dark purple": (60, 30, 80), "light purple": (200, 170, 225),
}
_COLOUR_BASES = ("black", "white", "grey", "red", "orange", "brown", "yellow", "olive", "beige",
                 "green", "teal", "blue", "purple")
_COLOUR_WORDS = frozenset(_COLOUR_BASES) | frozenset(COLOUR_SYNONYMS) - {"off-white"}
_COLOUR_ISH = {"greyish": "grey", "grayish": "grey", "whitish": "white", "blackish": "black",
               "reddish": "red", "bluish": "blue", "blueish": "blue", "greenish": "green",
               "yellowish": "yellow", "brownish": "brown", "orangish": "orange",
               "purplish": "purple"}
_COLOUR_MODIFIERS = {"dark": "dark", "deep": "dark", "light": "light", "pale": "light",
                     "bright": "", "vivid": ""}
_COLOUR_SUFFIXES = {"coloured", "colored", "toned", "painted", "tinted"}
_COLOUR_MIXES = {"mix", "mixture", "blend", "shades", "shade", "tones", "variety", "range"}
_COLOUR_TAIL = {"colour", "color", "colours", "colors", "tone", "tones", "hue", "hues",
                "shade", "shades"}

# Size words -> the band of `attributes` they claim.
SIZE_WORDS: dict[str, str] = {
    "tiny": "small", "small": "small", "little": "small", "compact": "small",
    "small-sized": "small", "smallish": "small", "minor": "small",
    "medium": "medium-sized", "medium-sized": "medium-sized", "mid-sized": "medium-sized",
    "midsized": "medium-sized", "moderate-sized": "medium-sized", "average-sized": "medium-sized",
    "large": "large", "big": "large", "huge": "large", "giant": "large", "massive": "large",
    "enormous": "large", "sizable": "large", "sizeable": "large", "large-sized": "large",
}

# Position words.
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right", "left-hand": "left", "right-hand": "right"}
_MIDDLE = {"center", "centre", "middle", "central"}
_POSITION_QUALIFIERS = {"side", "sides", "half", "corner", "corners", "edge", "edges", "part",
                        "portion", "area", "section", "region", "quadrant", "end", "border",
                        "hand"}
_PLACE_PREPOSITIONS = {"at", "in", "on", "toward", "towards", "near", "along", "within", "into",
                       "occupying", "occupies", "occupy", "fills", "filling"}
_IMAGE_NOUNS = {"image", "scene", "tile", "picture", "photo", "photograph", "frame", "patch",
                "view", "imagery"}
_PART_VERBS = {"with", "has", "have", "having", "featuring", "features", "showing", "shows"}
_CLAUSE_OPENERS = {",", ";", ":", "(", "\u2014", "\u2013", "and", "while", "whereas", "but"}
_MIDLINES = {"midline", "centerline", "centreline", "middle", "center", "centre"}

# Numbers.
_COUNT_PHRASES: dict[tuple[str, ...], int] = {
    ("a", "pair", "of"): 2, ("both",): 2, ("a", "single"): 1, ("single",): 1, ("lone",): 1,
    ("solitary",): 1, ("a", "trio", "of"): 3,
}
_VAGUE_PHRASES: tuple[tuple[str, ...], ...] = (
    ("a", "few"), ("several",), ("many",), ("numerous",), ("multiple",), ("various",),
    ("a", "number", "of"), ("a", "group", "of"), ("a", "cluster", "of"), ("a", "couple", "of"),
    ("some",), ("dozens", "of"), ("a", "handful", "of"), ("a", "collection", "of"),
    ("a", "fleet", "of"), ("a", "row", "of"), ("a", "line", "of"), ("rows", "of"),
    ("groups", "of"), ("clusters", "of"), ("a", "set", "of"), ("a", "series", "of"),
)
_TOTAL_AFTER = (("in", "all"), ("in", "total"), ("altogether",), ("total",), ("strong",))
_TOTAL_BEFORE = (("a", "total", "of"), ("totaling",), ("totalling",), ("numbering",))
_COUNT_STOPS = {"other", "others", "more", "of", "additional", "further", "another", "than",
                "extra", "fewer", "less", "times", "percent", "per", "out", "nearby"}
_NOUN_LOOKAHEAD = 3  # words between a number (or colour, size) and the noun it counts
# Words before a number that make it no count of the phrase: approximate ('about twenty'),
# another set ('one of the five ships', 'near two trucks'), others ('the other two').
_COUNT_SKIP_BEFORE = {"about", "around", "roughly", "approximately", "nearly", "almost", "over",
                      "under", "up", "least", "most", "than", "circa", "perhaps", "maybe",
                      "estimated", "some", "other", "another", "of", "among", "amongst",
                      "between", "with", "near", "beside", "besides", "from", "to", "by",
                      "behind", "next", "plus", "except"}
# ... except a collective noun before 'of': 'a group of four cars', 'a total of five'
_COLLECTIVES = {"group", "groups", "cluster", "clusters", "row", "rows", "line", "lines", "set",
                "fleet", "total", "collection", "series", "pair", "column", "queue"}

# Attachment of colour and size words: words before them that make them about something else,
# and the closed-class words after them that keep them about the subject.
_OTHER_THING_BEFORE = {"with", "of", "on", "against", "over", "under", "among", "amid", "amidst",
                       "beside", "near", "between", "by", "from", "to", "across", "onto",
                       "behind", "surrounded", "its", "their", "his", "her"}
_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some", "all", "mostly",
                "predominantly", "mainly", "largely", "primarily", "entirely", "either", "each",
                "both", "also", "is", "are", "appears", "appear", "looks", "look", "seems",
                "in", "painted", "coloured", "colored", "relatively", "fairly", "quite", "very",
                "rather", "somewhat", "comparatively", "and", "but", "or"}
_SUBJECT_AFTER = {"and", "or", "but", "while", "whereas", "with", "at", "on", "in", "near",
                  "toward", "towards", "beside", "next", "along", "by", "parked", "is", "are",
                  "was", "were", "sits", "sit", "lies", "lie", "rests", "rest", "stands",
                  "stand", "appears", "appear", "seems", "seem", "looks", "look", "located",
                  "positioned", "situated", "placed", "oriented", "lined", "arranged",
                  "grouped", "loosely", "scattered", "clustered", "side", "that", "which",
                  "each", "all", "both", "as", "set", "visible", "seen", "moored", "docked",
                  "aligned", "facing", "spread", "standing", "sitting", "lying", "there",
                  "here", "overall", "throughout"}
_SHAPE_WORDS = {"rectangular", "square", "round", "circular", "oval", "elongated", "long",
                "narrow", "wide", "parked", "stationary", "modern", "old", "new"}

_CLAUSE_BOUNDARY = {",", ";", ":", "(", ")", "\u2014", "\u2013", "and", "but", "or", "while",
                    "whereas"}
_SCOPE_DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "its", "their"}
_PUNCTUATION_END = {",", ".", ";", ":", "!", "?", ")", "\u2014", "\u2013", '"', "'"}
PARTNER = "<phrase>"  # a coordinated partner phrase in a scope

_GROUNDING_RE = re.compile(r"<p>\s?(.*?)\s?</p>\s*\[SEG\]", re.DOTALL)
_COORDINATION_RE = re.compile(r"^[\s,]*(?:(?:and|or|&|as well as)[\s,]*)?$", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[a-z]+(?:['\u2019][a-z]+)*(?:-[a-z]+)*|\d+(?:\.\d+)?|[^\s\w]")


def _plural(noun: str) -> str:
    last = noun.rsplit(" ", 1)[-1]
    if last in _IRREGULAR_PLURALS:
        return noun[: len(noun) - len(last)] + _IRREGULAR_PLURALS[last]
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return plural_noun(noun)


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _term_index() -> dict[str, list[tuple[tuple[str, ...], frozenset[str]]]]:
    """First token -> [(term tokens, category keys it names)], longest terms first."""
    index: dict[str, list[tuple[tuple[str, ...], frozenset[str]]]] = {}

    def add(term: str, keys: Iterable[str]) -> None:
        for form in (term, _plural(term)):
            seq = tuple(_tokens(form))
            index.setdefault(seq[0], []).append((seq, frozenset(keys)))

    for key, terms in CATEGORY_TERMS.items():
        for term in terms:
            add(term, [key])
    for term, keys in GENERIC_TERMS.items():
        add(term, keys)
    for entries in index.values():
        entries.sort(key=lambda e: -len(e[0]))
    return index


def _term_at(tokens: Sequence[str], i: int, extra: dict[tuple[str, ...], str]
             ) -> Optional[tuple[int, frozenset[str]]]:
    """The category term starting at token i: (its length, the category keys it names)."""
    found: list[tuple[tuple[str, ...], frozenset[str]]] = list(_term_index().get(tokens[i], ()))
    found += [(seq, frozenset([key])) for seq, key in extra.items() if seq[0] == tokens[i]]
    for seq, keys in sorted(found, key=lambda e: -len(e[0])):
        if tuple(tokens[i:i + len(seq)]) == seq:
            return len(seq), keys
    return None


@functools.lru_cache(maxsize=1)
def _numbers() -> dict[tuple[str, ...], int]:
    """Number words 0..999 as token sequences (`pipeline.core.text.number_words`)."""
    return {tuple(_tokens(number_words(n))): n for n in range(1000)}


def _number_at(tokens: Sequence[str], i: int) -> Optional[tuple[int, int]]:
    """(value, length) of a number starting at token i: words, digits or a counting phrase."""
    tok = tokens[i]
    if tok.isdigit():
        if i > 0 and tokens[i - 1] in ("-", "#", "no", "number"):
            return None  # "vehicle-1", "#3": names and marks, not counts
        return int(tok), 1
    for table in (_COUNT_PHRASES, _numbers()):
        best = None
        for length in (4, 3, 2, 1):
            seq = tuple(tokens[i:i + length])
            if len(seq) == length and seq in table:
                best = (table[seq], length)
                break
        if best:
            return best
    return None


# =============================================================================================
# Scopes: the words around each phrase


@dataclass(frozen=True)
class _Scope:
    """A phrase's clause as lower-cased tokens, which of them are the phrase's own text, and
    the phrase's coordinated group (phrase indices, itself included)."""

    tokens: tuple[str, ...]
    own: tuple[bool, ...]
    group: tuple[int, ...]


_BOUNDARY_RE = re.compile(r"[A-Za-z]+|[,;:()\u2014\u2013]")


def _sentence_spans(caption: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for sentence in split_sentences(caption):
        start = caption.find(sentence, pos)
        if start >= 0:  # a stripped piece of the text: always found
            spans.append((start, start + len(sentence)))
            pos = start + len(sentence)
    return spans


def _marks(words: set[str], text: str) -> list[tuple[int, int]]:
    """Spans of the words (or punctuation) of `words` in `text`."""
    return [(m.start(), m.end()) for m in _BOUNDARY_RE.finditer(text)
            if m.group(0).lower() in words]


def _scopes(caption: str, n_phrases: int) -> dict[int, _Scope]:
    """The scope of each grounded phrase of `caption` (the first `n_phrases`)."""
    spans = [(m.start(), m.end(), m.start(1), m.end(1))
             for m in _GROUNDING_RE.finditer(caption)][:n_phrases]
    sentences = _sentence_spans(caption)
    by_sentence: dict[int, list[int]] = {}
    for i, span in enumerate(spans):
        k = next((k for k, (a, b) in enumerate(sentences) if a <= span[0] < b), None)
        if k is not None:
            by_sentence.setdefault(k, []).append(i)

    out: dict[int, _Scope] = {}
    for k, members in by_sentence.items():
        s_start = sentences[k][0]
        s_end = max(sentences[k][1], max(spans[i][1] for i in members))
        groups: list[list[int]] = [[members[0]]]
        for prev, cur in itertools.pairwise(members):
            if _COORDINATION_RE.match(caption[spans[prev][1]:spans[cur][0]]):
                groups[-1].append(cur)
            else:
                groups.append([cur])
        bounds = [[s_start, s_end] for _ in groups]
        for g in range(len(groups) - 1):
            gap_start, gap_end = spans[groups[g][-1]][1], spans[groups[g + 1][0]][0]
            gap = caption[gap_start:gap_end]
            boundaries = _marks(_CLAUSE_BOUNDARY, gap)
            if boundaries:
                bounds[g][1] = gap_start + boundaries[0][0]
                bounds[g + 1][0] = gap_start + boundaries[-1][1]
            else:
                determiners = _marks(_SCOPE_DETERMINERS, gap)
                cut = gap_start + determiners[-1][0] if determiners else gap_end
                bounds[g][1] = bounds[g + 1][0] = cut
        for group, (left, right) in zip(groups, bounds, strict=True):
            for i in group:
                out[i] = _scope_of(caption, spans, group, i, left, right)
    return out


def _scope_of(caption: str, spans: Sequence[tuple[int, int, int, int]], group: Sequence[int],
              i: int, left: int, right: int) -> _Scope:
    """Phrase i's scope: caption[left:right] with its own text inline and its coordinated
    partners opaque."""
    pieces: list[tuple[list[str], bool]] = []
    pos = left
    for j in group:
        outer_start, outer_end, inner_start, inner_end = spans[j]
        pieces.append((_tokens(caption[pos:outer_start]), False))
        pieces.append((_tokens(caption[inner_start:inner_end]), True) if j == i
                      else ([PARTNER], False))
        pos = outer_end
    pieces.append((_tokens(caption[pos:right]), False))
    return _Scope(tokens=tuple(t for found, _ in pieces for t in found),
                  own=tuple(mine for found, mine in pieces for _ in found), group=tuple(group))


# =============================================================================================
# What the masks say


@dataclass(frozen=True)
class _Phrase:
    """One phrase as the checks need it."""

    index: int
    key: str                                  # category key ('small_vehicle')
    known: bool                               # a category, not UNKNOWN_CATEGORY
    count: int                                # its instances
    group_count: int                          # instances of its coordinated group
    members: tuple[ObjectMeasurement, ...]    # its measured instances
    points: tuple[tuple[float, float], ...]   # their centroids, pixel-index coordinates
    peers: tuple[int, ...]                    # areas of its category's objects in the tile
    category: str
    width: int
    height: int
    extra_terms: dict                         # the category's own name when not in the table


def _category_terms(category: str) -> dict[tuple[str, ...], str]:
    """Terms for a category the table does not hold: its readable name and plural."""
    key = attr.category_key(category)
    if key in CATEGORY_TERMS or category == UNKNOWN_CATEGORY:
        return {}
    name = key.replace("_", " ")
    return {tuple(_tokens(name)): key, tuple(_tokens(_plural(name))): key}


def _mask_point(phrase: Phrase) -> Optional[tuple[float, float]]:
    """Centroid (pixel-index coordinates) of a phrase's own mask."""
    moments = cv2.moments(masks.decode(phrase.mask), binaryImage=True)
    if moments["m00"] == 0:
        return None
    return moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]


def _in_region(point: tuple[float, float], width: int, height: int,
               region: tuple[int, int, int, int]) -> bool:
    """Whether a pixel-index centroid lies in grid region (rows, cols, row, col): moved to pixel
    centres as `grid.pixel_position` does, then `grid.cell`."""
    rows, cols, row, col = region
    return cell(point[0] + 0.5, point[1] + 0.5, width, height, rows, cols) == (row, col)


@functools.lru_cache(maxsize=1)
def _regions() -> dict[str, list[tuple[int, int, int, int]]]:
    """Region name -> every (rows, cols, row, col) the planner's grids give that name."""
    found: dict[str, list[tuple[int, int, int, int]]] = {}
    for (rows, cols), names in REGION_NAMES.items():
        for r, line in enumerate(names):
            for c, name in enumerate(line):
                found.setdefault(name, []).append((rows, cols, r, c))
    return found


@functools.lru_cache(maxsize=64)
def _lab(rgb: tuple[int, int, int]) -> np.ndarray:
    pixel = np.asarray([[rgb]], dtype=np.float32) / 255.0
    return cv2.cvtColor(pixel, cv2.COLOR_RGB2Lab)[0, 0].astype(np.float64)


def colour_fits(name: str, rgb: Sequence[int], delta_e: float) -> bool:
    """Whether colour `name` (a namer name or a `COLOUR_REFERENCES` key) fits a measured RGB:
    the namer names it so (an unmodified name also fits its dark / light variants), or its
    CIELAB distance to the name's reference colour is at most `delta_e` (CIE76)."""
    rgb = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    measured = attr.colour_name(rgb)
    if measured == name:
        return True
    if " " not in name and measured.split()[-1] == name:
        return True
    reference = COLOUR_REFERENCES.get(name)
    return reference is not None and float(np.linalg.norm(_lab(rgb) - _lab(reference))) <= delta_e


def _size_ratio(area: int, category: str, peers: Sequence[int]
                ) -> Optional[tuple[float, float, float, str]]:
    """(area ratio, small bound, large bound, what it is measured against): the template's size
    notion (`attributes.object_size`: the tile's peers when there are enough, else the typical
    area)."""
    if len(peers) >= attr.MIN_PEERS_FOR_RELATIVE_SIZE:
        median = float(np.median(peers))
        if median > 0:
            return area / median, attr.RELATIVE_SMALL, attr.RELATIVE_LARGE, "median in the tile"
    typical = attr.TYPICAL_AREA.get(attr.category_key(category))
    if typical:
        return area / typical, attr.TYPICAL_SMALL, attr.TYPICAL_LARGE, "typical area"
    return None


def size_fits(band: str, ratio: float, small: float, large: float, tolerance: float) -> bool:
    """Whether a size band ('small', 'medium-sized', 'large') fits an area ratio, the band's
    bounds widened by the factor `tolerance`."""
    if band == "small":
        return ratio < small * tolerance
    if band == "large":
        return ratio > large / tolerance
    return small / tolerance <= ratio <= large * tolerance


# =============================================================================================
# Finding claims in a scope


def _compatible(scope: _Scope, k: int, ph: _Phrase) -> Optional[tuple[int, bool]]:
    """A category term at token k: (its length, whether it names the phrase's category or is
    the phrase's own text)."""
    term = _term_at(scope.tokens, k, ph.extra_terms)
    if term is None:
        return None
    length, keys = term
    return length, ph.key in keys or all(scope.own[k:k + length])


def _is_punct(token: str) -> bool:
    return not token[0].isalnum() and token != PARTNER


def _about_subject_before(tokens: Sequence[str], start: int) -> bool:
    """Whether the words before a colour / size word leave it about the phrase (not 'with a red
    roof', 'near a large building'; but 'a mix of grey and white', 'shades of grey')."""
    k = start - 1
    while k >= 0 and tokens[k] in _DETERMINERS:
        k -= 1
    if k >= 1 and tokens[k] == "of" and tokens[k - 1] in _COLOUR_MIXES:
        return _about_subject_before(tokens, k - 1)
    return k < 0 or tokens[k] not in _OTHER_THING_BEFORE


def _colour_at(tokens: Sequence[str], i: int) -> Optional[tuple[list[str], int]]:
    """The colour name(s) starting at token i and the tokens they take: 'dark grey', 'silver',
    'dark-grey', 'black-and-white', 'greyish', 'grey-coloured'."""
    tok = tokens[i]
    parts = [p for p in tok.split("-") if p not in _COLOUR_SUFFIXES]
    if tok == "off-white":
        return ["white"], 1
    if len(parts) > 1 and "and" in parts:  # 'black-and-white'
        names = [_colour_name("", p) for p in parts if p != "and"]
        return (names, 1) if all(names) else None
    if len(parts) == 2 and parts[0] in _COLOUR_MODIFIERS:
        name = _colour_name(parts[0], parts[1])
        return ([name], 1) if name else None
    if len(parts) == 1:
        if parts[0] in _COLOUR_MODIFIERS and i + 1 < len(tokens):
            name = _colour_name(parts[0], tokens[i + 1])
            return ([name], 2) if name else None
        name = _colour_name("", parts[0])
        return ([name], 1) if name else None
    return None


def _colour_name(modifier: str, word: str) -> Optional[str]:
    base = _COLOUR_ISH.get(word, word)
    if base not in _COLOUR_WORDS:
        return None
    base = COLOUR_SYNONYMS.get(base, base)
    mod = _COLOUR_MODIFIERS.get(modifier, "")
    if mod and " " not in base and base not in ("black", "white"):
        name = f"{mod} {base}"
        return name if name in COLOUR_REFERENCES else base
    return base


def _size_at(tokens: Sequence[str], i: int) -> Optional[tuple[str, int]]:
    """(size band, tokens taken) of a size word at token i ('medium sized' takes two)."""
    band = SIZE_WORDS.get(tokens[i])
    if band is None:
        return None
    if tokens[i] == "medium" and i + 1 < len(tokens) and tokens[i + 1] in ("sized", "size"):
        return band, 2
    return band, 1


def _about_subject_after(scope: _Scope, k: int, ph: _Phrase) -> bool:
    """Whether what follows a colour / size word at token k leaves it about the phrase: its
    noun, its own text, 'in colour', punctuation, the end, or a closed-class word; skipping a
    few other descriptive words."""
    tokens = scope.tokens
    for _ in range(4):
        if k < len(tokens) and tokens[k] == "in" and k + 1 < len(tokens) \
                and tokens[k + 1] in _COLOUR_TAIL | {"size"}:
            k += 2
            continue
        if k < len(tokens) and (tokens[k] in _COLOUR_TAIL or tokens[k] == "sized"):
            k += 1
            continue
        if k < len(tokens) and (tokens[k] in _SHAPE_WORDS or _size_at(tokens, k)
                                or _colour_at(tokens, k)) and not scope.own[k]:
            k += (_size_at(tokens, k) or _colour_at(tokens, k) or ("", 1))[1]
            continue
        break
    if k >= len(tokens) or tokens[k] in _PUNCTUATION_END:
        return True
    if tokens[k] == PARTNER:
        return False
    if scope.own[k]:
        return True
    term = _compatible(scope, k, ph)
    if term is not None:
        return term[1]
    return tokens[k] in _SUBJECT_AFTER


def _words(tokens: Sequence[str]) -> str:
    text = " ".join(t for t in tokens if t != PARTNER)
    return re.sub(r" ([,;:.!?)])", r"\1", text).replace("( ", "(")


# --- category ---------------------------------------------------------------------------------


def _category_claims(scope: _Scope, ph: _Phrase) -> list[Claim]:
    if not ph.known:
        return []
    tokens = scope.tokens
    for k, mine in enumerate(scope.own):
        if not mine:
            continue
        term = _term_at(tokens, k, ph.extra_terms)
        if term is None or not all(scope.own[k:k + term[0]]):
            continue
        length, keys = term
        verdict = "agree" if ph.key in keys else "disagree"
        return [Claim(ph.index, "category", _words(tokens[k:k + length]),
                      ph.category.replace("_", " ").lower(), verdict)]
    return []


# --- count ------------------------------------------------------------------------------------


def _noun_ahead(scope: _Scope, j: int, ph: _Phrase) -> Optional[tuple[int, bool]]:
    """The category noun within `_NOUN_LOOKAHEAD` words after token j: (its end, whether it is
    the phrase's); None when a stop word, punctuation, a number or another phrase comes first."""
    tokens = scope.tokens
    for k in range(j, min(len(tokens), j + _NOUN_LOOKAHEAD + 1)):
        tok = tokens[k]
        if tok == PARTNER or _is_punct(tok) or tok in _COUNT_STOPS or _number_at(tokens, k):
            return None
        found = _compatible(scope, k, ph)
        if found is not None:
            return k + found[0], found[1]
    return None


def _counts_the_phrase(tokens: Sequence[str], i: int) -> bool:
    """Whether a number or vague quantifier at token i may count the phrase (see
    `_COUNT_SKIP_BEFORE`)."""
    k = i - 1
    while k >= 0 and tokens[k] in ("the", "these", "those", "its", "their", "all"):
        k -= 1
    if k < 0 or tokens[k] not in _COUNT_SKIP_BEFORE:
        return True
    return tokens[k] == "of" and k > 0 and tokens[k - 1] in _COLLECTIVES


def _count_claims(scope: _Scope, ph: _Phrase) -> list[Claim]:
    tokens, claims = scope.tokens, []
    counts = sorted({ph.count, ph.group_count})
    expected = f"{ph.count} object" + ("" if ph.count == 1 else "s") + (
        f" ({ph.group_count} with its coordinated phrases)" if ph.group_count != ph.count else "")
    i = 0
    while i < len(tokens):
        number = _number_at(tokens, i)
        if number is not None:
            value, length = number
            j = i + length
            end, start = None, i
            before = next((s for s in _TOTAL_BEFORE
                           if tuple(tokens[max(0, i - len(s)):i]) == s), None)
            if before is not None:
                end, start = j, i - len(before)
            elif tuple(tokens[j:j + 2]) == ("of", "them") and i > 0 and tokens[i - 1] == "," \
                    and (j + 2 >= len(tokens) or tokens[j + 2] in _PUNCTUATION_END):
                end = j + 2  # ', seven of them,': the group, not a part of it
            else:
                total = next((s for s in _TOTAL_AFTER if tuple(tokens[j:j + len(s)]) == s), None)
                if total is not None:
                    end = j + len(total)
                elif _counts_the_phrase(tokens, i):
                    noun = _noun_ahead(scope, j, ph)
                    if noun is not None and noun[1]:
                        end = noun[0]
            if end is not None:
                claims.append(Claim(ph.index, "count", _words(tokens[start:end]), expected,
                                    "agree" if value in counts else "disagree"))
                i = end
                continue
            i = j
            continue
        vague = next((s for s in _VAGUE_PHRASES if tuple(tokens[i:i + len(s)]) == s), None)
        if vague is not None and _counts_the_phrase(tokens, i):
            noun = _noun_ahead(scope, i + len(vague), ph)
            if noun is not None and noun[1]:
                claims.append(Claim(ph.index, "count", _words(tokens[i:noun[0]]),
                                    expected + " (a vague count: two or more)",
                                    "agree" if max(counts) >= 2 else "disagree"))
                i = noun[0]
                continue
        i += 1
    return claims


# --- position ---------------------------------------------------------------------------------


def _position_words(tokens: Sequence[str], i: int) -> Optional[tuple[list[str], int]]:
    """The position words starting at token i ('top', 'left', 'corner' ...) and their end."""
    first = tokens[i].split("-")
    if not (first[0] in _VERTICAL or first[0] in _HORIZONTAL or first[0] in _MIDDLE):
        return None
    words: list[str] = []
    j = i
    while j < len(tokens) and len(words) < 4:
        parts = tokens[j].split("-")
        if all(p in _VERTICAL or p in _HORIZONTAL or p in _MIDDLE or p in _POSITION_QUALIFIERS
               for p in parts):
            words += parts
            j += 1
        else:
            break
    return words, j


def region_names(words: Sequence[str]) -> set[str]:
    """The planner's region names that position words may mean (see the module docstring)."""
    vertical = next((_VERTICAL[w] for w in words if w in _VERTICAL), None)
    horizontal = next((_HORIZONTAL[w] for w in words if w in _HORIZONTAL), None)
    middle = any(w in _MIDDLE for w in words)
    if vertical and horizontal:
        return {f"{vertical} {horizontal}"}
    if vertical:
        return {vertical} if middle else {vertical, f"{vertical} half"}
    if horizontal:
        return {horizontal} if middle else {horizontal, f"{horizontal} side"}
    return {"center"} if middle else set()


def _position_claims(scope: _Scope, ph: _Phrase, share: float) -> list[Claim]:
    if not ph.points:
        return []
    tokens, claims = scope.tokens, []
    i = 0
    while i < len(tokens):
        found = _position_words(tokens, i)
        if found is None:
            i += 1
            continue
        words, j = found
        midline = _midline_end(tokens, words, j)
        if midline is not None:  # 'right of the midline': a half
            claims.append(_position_claim(ph, _words(tokens[i:midline]), region_names(words),
                                          share))
            i = midline
            continue
        start = _place_start(tokens, i, j)
        if start is None:
            i = j
            continue
        end = j
        if end < len(tokens) and tokens[end] == "of":  # 'of the image' or relative
            k = end + 1
            while k < len(tokens) and tokens[k] in ("the", "this", "that", "a", "an", "entire",
                                                    "whole"):
                k += 1
            if k >= len(tokens) or tokens[k] not in _IMAGE_NOUNS:
                i = j
                continue
            end = k + 1
        if end < len(tokens) and tokens[end] in ("angle", "angles"):
            i = j
            continue
        names = region_names(words)
        # alternatives: 'on the left and right sides'
        while end + 1 < len(tokens) and tokens[end] in ("and", "or"):
            k = end + 1 + (tokens[end + 1] == "the")
            more = _position_words(tokens, k) if k < len(tokens) else None
            if more is None:
                break
            names |= region_names(more[0])
            end = more[1]
        if names:
            claims.append(_position_claim(ph, _words(tokens[start:end]), names, share))
        i = end
    return claims


def _midline_end(tokens: Sequence[str], words: Sequence[str], j: int) -> Optional[int]:
    """The end of 'left / right of the midline (center)' after position words that name one
    side only, else None."""
    if len(words) != 1 or words[0] not in _HORIZONTAL or tuple(tokens[j:j + 2]) != ("of", "the"):
        return None
    return j + 3 if j + 2 < len(tokens) and tokens[j + 2] in _MIDLINES else None


def _place_start(tokens: Sequence[str], i: int, j: int) -> Optional[int]:
    """Where the place phrase of position words tokens[i:j] starts ('at the', 'toward', 'the
    ... of the image'), or None when they are no place of the object in the image."""
    k = i - 1
    while k >= 0 and tokens[k] in ("very", "far", "extreme", "upper", "lower"):
        k -= 1
    article = k >= 0 and tokens[k] == "the"
    if article:
        k -= 1
    if k >= 0 and tokens[k] in _PLACE_PREPOSITIONS:
        start = k
    elif k >= 0 and tokens[k] == "across" and article and (
            any(p in _POSITION_QUALIFIERS for t in tokens[i:j] for p in t.split("-"))
            or tuple(tokens[j:j + 2]) == ("of", "the")):
        start = k  # 'across the right part'; not 'a net across the center' (of the court)
    elif article and (k < 0 or tokens[k] in _CLAUSE_OPENERS) and j + 2 < len(tokens) \
            and tokens[j] == "of" and (tokens[j + 1] in _IMAGE_NOUNS
                                       or tokens[j + 1] == "the" and tokens[j + 2] in _IMAGE_NOUNS):
        start = k + 1  # a clause's subject: ': the left side of the image holds ...'
    else:
        return None
    back = start - 1
    while back >= 0 and tokens[back] not in (",", ";", ":", "(", "\u2014", "\u2013"):
        if tokens[back] in _PART_VERBS:
            return None  # 'with a stripe on the left': a part of the object
        back -= 1
    return start


def _position_claim(ph: _Phrase, words: str, names: set[str], share: float) -> Claim:
    n = len(ph.points)
    best_name, best = "", -1
    for name in sorted(names):
        for region in _regions().get(name, []):
            inside = sum(_in_region(p, ph.width, ph.height, region) for p in ph.points)
            if inside > best:
                best_name, best = name, inside
    cells = Counter(pixel_position(x, y, ph.width, ph.height) for x, y in ph.points)
    where = min(cells, key=lambda c: (-cells[c], c))
    if n == 1:
        expected = f"{where} (3x3 cell of its centroid)"
    else:
        expected = (f"{best} of {n} in the {best_name}; most in the {where} "
                    f"({cells[where]} of {n}, 3x3)")
    return Claim(ph.index, "position", words, expected,
                 "agree" if n and best / n >= share and best > 0 else "disagree")


# --- colour and size --------------------------------------------------------------------------


def _colour_claims(scope: _Scope, ph: _Phrase, params: QAParams) -> list[Claim]:
    if not ph.members:
        return []
    tokens, claims = scope.tokens, []
    i = 0
    while i < len(tokens):
        item = _colour_at(tokens, i)
        if item is None:
            i += 1
            continue
        names, j = list(item[0]), i + item[1]
        while j + 1 < len(tokens) and tokens[j] in (",", "and", "or", "/", "&"):
            k = j + 1
            if tokens[k] in ("and", "or") and k + 1 < len(tokens):  # ', and'
                k += 1
            k = _after_mix_words(tokens, k)  # 'dark blue and shades of grey'
            more = _colour_at(tokens, k) if k < len(tokens) else None
            if more is None:
                break
            names += more[0]
            j = k + more[1]
        if _about_subject_before(tokens, i) and _about_subject_after(scope, j, ph):
            claims.append(_colour_claim(ph, _words(tokens[i:j]), names, params))
        i = j
    return claims


def _after_mix_words(tokens: Sequence[str], k: int) -> int:
    """Token k, or the token after 'shades of', 'a mix of', 'various shades of' there."""
    j = k
    while j < len(tokens) and tokens[j] in ("a", "various", "different", "several", "some"):
        j += 1
    if j + 1 < len(tokens) and tokens[j] in _COLOUR_MIXES and tokens[j + 1] == "of":
        return j + 2
    return k


def _colour_claim(ph: _Phrase, words: str, names: list[str], params: QAParams) -> Claim:
    tol, members = params.claim_colour_delta_e, ph.members
    fits = [[colour_fits(name, m.rgb, tol) for m in members] for name in names]
    if len(members) == 1:
        ok = any(f[0] for f in fits)
        m = members[0]
        r, g, b = m.rgb
        expected = f"{attr.colour_name((r, g, b))} (median RGB {r}, {g}, {b})"
    else:
        if len(names) == 1:
            ok = sum(fits[0]) / len(members) >= params.claim_group_share
        else:
            ok = all(any(f) for f in fits)
        measured = Counter(attr.colour_name(tuple(m.rgb)) for m in members)
        top = sorted(measured, key=lambda c: (-measured[c], c))[:4]
        expected = ", ".join(f"{c} {measured[c]}" for c in top) + f" of {len(members)}"
    return Claim(ph.index, "colour", words, expected, "agree" if ok else "disagree")


def _size_claims(scope: _Scope, ph: _Phrase, params: QAParams) -> list[Claim]:
    if not ph.members or not ph.known:
        return []
    tokens, claims = scope.tokens, []
    i = 0
    while i < len(tokens):
        found = _size_at(tokens, i)
        if found is None or _term_at(tokens, i, ph.extra_terms) is not None:
            i += 1  # not a size word, or the start of a category name ('small vehicle')
            continue
        band, length = found
        j = i + length
        if _about_subject_before(tokens, i) and _about_subject_after(scope, j, ph):
            claim = _size_claim(ph, _words(tokens[i:j]), band, params)
            if claim is not None:
                claims.append(claim)
        i = j
    return claims


def _size_claim(ph: _Phrase, words: str, band: str, params: QAParams) -> Optional[Claim]:
    measured = []
    for m in ph.members:
        ratio = _size_ratio(m.area, ph.category, ph.peers)
        if ratio is not None:
            measured.append((m, ratio))
    if not measured:
        return None
    fits = [size_fits(band, r, small, large, params.claim_size_tolerance)
            for _, (r, small, large, _basis) in measured]
    if len(measured) == 1:
        m, (r, _small, _large, basis) = measured[0]
        size = attr.object_size(m.area, ph.category, ph.peers)
        expected = f"{size.word if size else band} ({r:.2f} x the {basis})"
        ok = fits[0]
    else:
        words_of = Counter((attr.object_size(m.area, ph.category, ph.peers) or attr.Size(band, ""))
                           .word for m, _ in measured)
        expected = ", ".join(f"{w} {words_of[w]}" for w in sorted(words_of)) + \
            f" of {len(measured)}"
        ok = sum(fits) / len(fits) >= params.claim_group_share
    return Claim(ph.index, "size", words, expected, "agree" if ok else "disagree")


# =============================================================================================
# A record


def check_record(record: GroundedRecord, tile_measurements: Optional[TileMeasurements],
                 params: Optional[QAParams] = None) -> list[Claim]:
    """Every checkable claim of the record's caption about its grounded phrases, by phrase,
    checked against the phrases' instances in `tile_measurements` (the record's tile measured
    by `pipeline.geometry.measure`; None: only category, count and single-instance positions
    are checked). See the module docstring for the rules."""
    params = params or QAParams()
    found = _scopes(record.caption, len(record.phrases))
    by_id = {o.object_id: o for o in tile_measurements.objects} if tile_measurements else {}
    claims: list[Claim] = []
    for i in sorted(found):
        scope, phrase = found[i], record.phrases[i]
        ph = _phrase_facts(record, i, phrase, scope, by_id, tile_measurements)
        seen: set[tuple[str, str]] = set()
        for claim in (_category_claims(scope, ph) + _count_claims(scope, ph)
                      + _position_claims(scope, ph, params.claim_group_share)
                      + _colour_claims(scope, ph, params) + _size_claims(scope, ph, params)):
            if (claim.type, claim.words) not in seen:
                seen.add((claim.type, claim.words))
                claims.append(claim)
    return claims


def _phrase_facts(record: GroundedRecord, i: int, phrase: Phrase, scope: _Scope,
                  by_id: dict[int, ObjectMeasurement],
                  tile: Optional[TileMeasurements]) -> _Phrase:
    key = attr.category_key(phrase.category)
    members = tuple(by_id[o] for o in phrase.object_ids if o in by_id)
    if tile is not None:
        width, height = tile.width, tile.height
        points = tuple((m.cx, m.cy) for m in members)
        peers = tuple(o.area for o in tile.objects if attr.category_key(o.category) == key)
    else:
        height, width = phrase.mask.size
        point = _mask_point(phrase) if len(phrase.object_ids) == 1 else None
        points = (point,) if point is not None else ()
        peers = ()
    group_ids = {o for j in scope.group for o in record.phrases[j].object_ids}
    return _Phrase(index=i, key=key, known=phrase.category != UNKNOWN_CATEGORY,
                   count=len(phrase.object_ids), group_count=len(group_ids), members=members,
                   points=points, peers=peers, category=phrase.category, width=width,
                   height=height, extra_terms=_category_terms(phrase.category))


# =============================================================================================
# Stored verdicts: one row per claim (the qa stage writes them, the review notebook reads them)

CLAIMS_FILE = "claims.parquet"
CLAIMS_SCHEMA = arrow_schema(CheckedClaim)


@dataclass(frozen=True)
class RecordClaims:
    """A record's checked claims, before they are stored."""

    record_id: str
    tile_id: str
    split: str
    phrase_texts: tuple[str, ...]
    claims: tuple[Claim, ...]


def claim_rows(record: RecordClaims) -> list[CheckedClaim]:
    """One stored row per claim of a record."""
    return [CheckedClaim(record_id=record.record_id, tile_id=record.tile_id, split=record.split,
                         phrase_text=(record.phrase_texts[c.phrase]
                                      if c.phrase < len(record.phrase_texts) else ""),
                         **asdict(c)) for c in record.claims]


def write_claims(path: Path, rows: Sequence[CheckedClaim]) -> Path:
    """The claims file (`CheckedClaim` rows), written atomically."""
    return write_records(Path(path), rows, CheckedClaim)


def read_claims(path: Path) -> dict[str, list[Claim]]:
    """Record id -> its claims (in stored order), from a claims file (checked as a shard of
    `CheckedClaim`: another file is a BadShardError naming it)."""
    out: dict[str, list[Claim]] = {}
    for row in read_records(Path(path), CheckedClaim):
        out.setdefault(row.record_id, []).append(Claim(
            phrase=row.phrase, type=row.type, words=row.words, expected=row.expected,
            verdict=row.verdict))
    return out
