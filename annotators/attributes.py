"""Measured attributes of objects and scenes: the facts the template backend may state.

Every word the template backend writes about a tile comes from the tile's measurements
(`pipeline.geometry.measure`, taken once by plan and stored in `TilePlan.measurements`), so nothing is
invented: a colour is the median colour under the mask, a size is an area ratio, an orientation
is the long side of `cv2.minAreaRect`, an arrangement is a fit of the members' centroids, the
ground is the share of each measured cover class.

The thresholds below define the vocabulary (what "large", "in a row", "green vegetation" mean).
They are part of the template model: changing one changes the words, so it should go with a new
`annotate.backend.model` name (e.g. "template-v2").

The scene a tile shows ("a bus or truck depot", "a port") and its hedged reading ("This could
be a school bus yard.") come from SCENE_RULES, one table of evidence -> scene, at the end.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import cv2
import numpy as np

from pipeline.core.errors import BadMaskError
from pipeline.core.imaging import decode_png
from pipeline.geometry import measure
from pipeline.geometry.categories import plural, readable
from pipeline.geometry.grid import pixel_position, region_name
from pipeline.geometry.priors import instance_masks
from schemas import Tile, TileMeasurements

# --- colour names (OpenCV HSV: hue 0..179, saturation and value 0..255) ---------------------
BLACK_MAX_VALUE = 50          # darker than this is black whatever the hue
GREY_MAX_SATURATION = 45      # less saturated than this is white / grey
# ... and up to this when also dim (dark colours look grey). 55, not 70: the navy car at the
# bottom left of P0003_0_800_0_800 (median RGB 50, 51, 65: saturation 59, value 65) is plainly
# blue in the image; on the bundled samples no other object changes name.
DIM_GREY_MAX_SATURATION = 55
DIM_MAX_VALUE = 90
WHITE_MIN_VALUE = 200
LIGHT_GREY_MIN_VALUE = 150
GREY_MIN_VALUE = 90
DARK_MAX_VALUE = 110          # chromatic colours dimmer than this get "dark"
LIGHT_MIN_VALUE = 175         # ... brighter than this and pale get "light"
PALE_MAX_SATURATION = 120
BEIGE_MAX_SATURATION = 70     # pale yellow-orange and bright is beige
BROWN_MAX_VALUE = 150         # dim orange is brown
# hue band upper bounds (exclusive), in OpenCV units (degrees / 2)
HUE_BANDS: tuple[tuple[int, str], ...] = (
    (8, "red"), (20, "orange"), (34, "yellow"), (85, "green"), (100, "teal"),
    (130, "blue"), (165, "purple"), (180, "red"))

# --- sizes --------------------------------------------------------------------------------------
# Rough typical areas (pixels) of iSAID instances at the Google Earth scales of DOTA imagery
# (about 0.1 to 0.5 m per pixel). Chosen by this project as anchors for "small" / "large" when a
# tile holds too few objects of a category to compare them with each other; not published figures.
TYPICAL_AREA: dict[str, int] = {
    "small_vehicle": 400,
    "large_vehicle": 1500,
    "plane": 5000,
    "helicopter": 2500,
    "ship": 1500,
    "storage_tank": 2500,
    "harbor": 15000,
    "bridge": 20000,
    "swimming_pool": 2000,
    "roundabout": 40000,
    "tennis_court": 10000,
    "basketball_court": 10000,
    "baseball_diamond": 40000,
    "soccer_ball_field": 80000,
    "ground_track_field": 150000,
}
MIN_PEERS_FOR_RELATIVE_SIZE = 3  # objects of the category in the tile, itself included
RELATIVE_SMALL, RELATIVE_LARGE = 0.67, 1.5   # area / median area of the category in the tile
TYPICAL_SMALL, TYPICAL_LARGE = 0.5, 2.0      # area / TYPICAL_AREA of the category

# --- shape and orientation ----------------------------------------------------------------------
ELONGATED_MIN_RATIO = 1.6     # long side / short side of the min-area rectangle
MIN_SHORT_SIDE = 3            # px; thinner shapes give no reliable orientation
ORIENTATION_TOLERANCE_DEG = 22.5

# --- arrangement --------------------------------------------------------------------------------
NEIGHBOUR_RADIUS = 3.0        # same-category neighbours within this many long sides
PARALLEL_TOLERANCE_DEG = 15.0
SIDE_BY_SIDE_ACROSS = 2.5     # centre spacing across the long axes, in short sides
SIDE_BY_SIDE_ALONG = 0.5      # offset along the long axes, in long sides
ROW_MIN_EXPLAINED = 0.9       # PCA: share of centroid variance along the first axis
ROW_MAX_GAP = 3.0             # largest gap along the row, in median gaps
TIGHT_MAX_SPACING = 2.0       # median nearest-neighbour distance / median object size
SCATTERED_MIN_SPACING = 5.0
MOSTLY_MIN_SHARE = 0.75       # a colour this common among members is "mostly"
PARKED_CATEGORIES = {"small_vehicle", "large_vehicle", "plane", "helicopter"}

# --- ground cover (the classes are counted by pipeline.geometry.measure) ---------------------------------
COVER_MOSTLY_MIN_SHARE = 0.5      # a dominant cover this common is "mostly"
COVER_SECONDARY_MIN_SHARE = 0.12   # a second cover this common is mentioned
COVER_EVERYWHERE_MIN_SHARE = 0.8   # dominant in every cell at this share = "across the image"
CONCENTRATED_MIN_SHARE = 0.3       # one 3x3 cell holding this share of object area
TEXTURE_UNIFORM_MAX_STD, TEXTURE_VARIED_MIN_STD = 25.0, 50.0
TONE_DARK_MAX_MEAN, TONE_BRIGHT_MIN_MEAN = 85.0, 170.0
# Fractions in words: (at least this share, words), first match wins.
FRACTION_WORDS: tuple[tuple[float, str], ...] = (
    (0.9, "nearly all"), (0.7, "most"), (0.55, "more than half"), (0.42, "about half"),
    (0.28, "about a third"), (0.18, "about a quarter"), (0.08, "about a tenth"),
    (0.0, "a small part"))

# =============================================================================================
# Words


def number_word(n: int) -> str:
    """Cardinal number in English words (0 .. 999,999): counts never appear as digits, so no
    text can be mistaken for a leaked set-of-marks number."""
    from pipeline.core.text import number_words

    return number_words(n)


def counted(n: int, category: str) -> str:
    """'three small vehicles', 'one storage tank'."""
    return f"{number_word(n)} {readable(category) if n == 1 else plural(category)}"


def with_article(phrase: str) -> str:
    """'a red ship', 'an orange ship'."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def fraction_words(share: float) -> str:
    for least, words in FRACTION_WORDS:
        if share >= least:
            return words
    return FRACTION_WORDS[-1][1]


def category_key(category: str) -> str:
    """'Small_Vehicle' / 'small vehicle' -> 'small_vehicle' (the TYPICAL_AREA key)."""
    return readable(category).replace(" ", "_")


# =============================================================================================
# Colour


def to_hsv(rgb: Sequence[int]) -> tuple[int, int, int]:
    h, s, v = cv2.cvtColor(np.uint8([[list(rgb)]]), cv2.COLOR_RGB2HSV)[0, 0]
    return int(h), int(s), int(v)


def colour_name(rgb: Sequence[int]) -> str:
    """Name an RGB colour from a small palette by HSV rules, with dark/light qualifiers."""
    h, s, v = to_hsv(rgb)
    if v < BLACK_MAX_VALUE:
        return "black"
    if s < GREY_MAX_SATURATION or (s < DIM_GREY_MAX_SATURATION and v < DIM_MAX_VALUE):
        if v >= WHITE_MIN_VALUE:
            return "white"
        if v >= LIGHT_GREY_MIN_VALUE:
            return "light grey"
        return "grey" if v >= GREY_MIN_VALUE else "dark grey"
    hue = next(name for upper, name in HUE_BANDS if h < upper)
    if hue in ("orange", "yellow") and s < BEIGE_MAX_SATURATION and v >= LIGHT_GREY_MIN_VALUE:
        return "beige"
    if hue == "orange" and v < BROWN_MAX_VALUE:
        return "brown"
    if hue == "yellow" and v < DARK_MAX_VALUE:
        return "olive"
    if v < DARK_MAX_VALUE:
        return f"dark {hue}"
    if hue in ("green", "blue") and v >= LIGHT_MIN_VALUE and s < PALE_MAX_SATURATION:
        return f"light {hue}"
    return hue


@dataclass(frozen=True)
class ColourMix:
    """The colours of a group's members, as facts: `colours` most common first (ties by
    name): the one colour when all share it (`uniform`), the dominant one when at least
    MOSTLY_MIN_SHARE of them have it (`mostly`), else the three most common at most."""

    colours: tuple[str, ...]
    uniform: bool
    mostly: bool
    members: int


def mix_colours(names: Sequence[str]) -> ColourMix:
    """The `ColourMix` of a group's member colours."""
    if not names:
        raise ValueError("no colours to mix")
    counts = Counter(names)
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    if len(ranked) == 1:
        return ColourMix((ranked[0],), uniform=True, mostly=False, members=len(names))
    if counts[ranked[0]] / len(names) >= MOSTLY_MIN_SHARE:
        return ColourMix((ranked[0],), uniform=False, mostly=True, members=len(names))
    return ColourMix(tuple(ranked[:3]), uniform=False, mostly=False, members=len(names))


def colour_mix(names: Sequence[str]) -> str:
    """Colours of a group's members: 'all white', 'mostly yellow', 'white and yellow',
    'yellow, white and grey' (`mix_colours`, at most three, most common first)."""
    mix = mix_colours(names)
    top = mix.colours
    if mix.uniform:
        return f"all {top[0]}" if mix.members > 1 else top[0]
    if mix.mostly:
        return f"mostly {top[0]}"
    return " and ".join(top) if len(top) == 2 else f"{top[0]}, {top[1]} and {top[2]}"


# =============================================================================================
# Size


@dataclass(frozen=True)
class Size:
    """A size word and what it was measured against: 'tile' (the category's median area in
    this tile) or 'typical' (TYPICAL_AREA)."""

    word: str
    basis: str


def _size_word(ratio: float, small: float, large: float) -> str:
    if ratio < small:
        return "small"
    if ratio > large:
        return "large"
    return "medium-sized"


def relative_size(area: float, category_areas: Sequence[float]) -> Size | None:
    """Area against the median of its category in the tile (areas include the object)."""
    if len(category_areas) < MIN_PEERS_FOR_RELATIVE_SIZE:
        return None
    median = float(np.median(category_areas))
    if median <= 0:
        return None
    return Size(_size_word(area / median, RELATIVE_SMALL, RELATIVE_LARGE), "tile")


def absolute_size(area: float, category: str) -> Size | None:
    """Area against the category's typical area; None for a category without one."""
    typical = TYPICAL_AREA.get(category_key(category))
    if not typical:
        return None
    return Size(_size_word(area / typical, TYPICAL_SMALL, TYPICAL_LARGE), "typical")


def object_size(area: float, category: str, category_areas: Sequence[float]) -> Size | None:
    """Relative to the tile's peers when there are enough of them, else to the typical area."""
    return relative_size(area, category_areas) or absolute_size(area, category)


# =============================================================================================
# Shape, orientation, position


@dataclass(frozen=True)
class Shape:
    """Minimum-area rectangle of a mask: centre (x, y), side lengths, long-axis angle.

    `angle` is in degrees in [0, 180), image axes (x right, y down): 0 = horizontal,
    90 = vertical, 45 = from top left to bottom right."""

    cx: float
    cy: float
    long: float
    short: float
    angle: float

    @property
    def elongation(self) -> float:
        return self.long / max(self.short, 1e-6)

    @property
    def elongated(self) -> bool:
        return self.short >= MIN_SHORT_SIDE and self.elongation >= ELONGATED_MIN_RATIO


def mask_shape(mask: np.ndarray) -> Shape:
    """The Shape of a binary mask (`pipeline.geometry.measure.mask_shape`), in its own coordinates."""
    cx, cy, long, short, angle = measure.mask_shape(mask)
    return Shape(cx=cx, cy=cy, long=long, short=short, angle=angle)


def orientation_words(shape: Shape) -> str | None:
    """'oriented horizontally' ... for elongated shapes; None for round or square ones."""
    if not shape.elongated:
        return None
    a, tol = shape.angle, ORIENTATION_TOLERANCE_DEG
    if a < tol or a >= 180 - tol:
        return "oriented horizontally"
    if 90 - tol <= a < 90 + tol:
        return "oriented vertically"
    if a < 90:
        return "oriented diagonally from top left to bottom right"
    return "oriented diagonally from bottom left to top right"


def cell_shares(counts: Sequence[int], grid: int = 3) -> dict[str, float]:
    """Share of the pixels in each grid cell, from per-cell pixel counts (row-major)."""
    total = float(sum(counts))
    return {region_name(grid, grid, k // grid, k % grid): (counts[k] / total if total else 0.0)
            for k in range(grid * grid)}


def concentration(object_pixels: Sequence[int], grid: int = 3) -> tuple[str, float] | None:
    """The cell with the most object area and its share of all object area."""
    shares = cell_shares(object_pixels, grid)
    if not any(shares.values()):
        return None
    cell = max(shares, key=lambda c: shares[c])
    return cell, shares[cell]


# =============================================================================================
# Arrangement


def side_by_side(a: Shape, b: Shape) -> bool:
    """Two elongated shapes parallel and next to each other across their long axes."""
    if not (a.elongated and b.elongated):
        return False
    diff = abs(a.angle - b.angle) % 180.0
    if min(diff, 180.0 - diff) > PARALLEL_TOLERANCE_DEG:
        return False
    theta = math.radians(a.angle)
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along = abs(dx * math.cos(theta) + dy * math.sin(theta))
    across = abs(-dx * math.sin(theta) + dy * math.cos(theta))
    short, long = (a.short + b.short) / 2, (a.long + b.long) / 2
    return across <= SIDE_BY_SIDE_ACROSS * short and along <= SIDE_BY_SIDE_ALONG * long


def paired_count(shapes: Sequence[Shape]) -> int:
    """How many shapes are `side_by_side` with at least one other (all pairs at once)."""
    rows = [(s.cx, s.cy, s.long, s.short, s.angle) for s in shapes if s.elongated]
    if len(rows) < 2:
        return 0
    cx, cy, long, short, angle = np.array(rows).T
    diff = np.abs(angle[:, None] - angle[None, :]) % 180.0
    parallel = np.minimum(diff, 180.0 - diff) <= PARALLEL_TOLERANCE_DEG
    theta = np.radians(angle)[:, None]  # row i: shape i's long axis, as side_by_side(i, j)
    dx, dy = cx[None, :] - cx[:, None], cy[None, :] - cy[:, None]
    along = np.abs(dx * np.cos(theta) + dy * np.sin(theta))
    across = np.abs(-dx * np.sin(theta) + dy * np.cos(theta))
    pairs = (parallel
             & (across <= SIDE_BY_SIDE_ACROSS * ((short[:, None] + short[None, :]) / 2))
             & (along <= SIDE_BY_SIDE_ALONG * ((long[:, None] + long[None, :]) / 2)))
    np.fill_diagonal(pairs, False)
    return int(pairs.any(axis=1).sum())


def in_a_row(points: np.ndarray) -> bool:
    """Centroids (N x 2) fit a line: PCA explained variance high and no large hole along it."""
    if len(points) < 3:
        return False
    centred = points - points.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    if variance.sum() <= 0 or variance[0] / variance.sum() < ROW_MIN_EXPLAINED:
        return False
    gaps = np.diff(np.sort(centred @ vt[0]))
    median_gap = float(np.median(gaps))
    return median_gap > 0 and float(gaps.max()) <= ROW_MAX_GAP * median_gap


def spacing(points: np.ndarray, sizes: Sequence[float]) -> float:
    """Median nearest-neighbour centroid distance in units of the median object size."""
    d = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(axis=1))) / max(float(np.median(sizes)), 1e-6)


def group_arrangement(shapes: Sequence[Shape], areas: Sequence[float],
                      category: str) -> str | None:
    """How a group of same-category objects is laid out: 'parked side by side in a row',
    'in a row', 'in a tight group', 'loosely grouped', 'scattered'; None for one object."""
    if len(shapes) < 2:
        return None
    points = np.array([[s.cx, s.cy] for s in shapes])
    paired = paired_count(shapes)
    verb = "parked " if category_key(category) in PARKED_CATEGORIES else ""
    row = in_a_row(points)
    if paired * 2 >= len(shapes):
        return f"{verb}side by side" + (" in a row" if row else "")
    if row:
        return f"{verb}in a row" if verb else "lined up in a row"
    ratio = spacing(points, [math.sqrt(a) for a in areas])
    if ratio <= TIGHT_MAX_SPACING:
        return "in a tight group"
    if ratio >= SCATTERED_MIN_SPACING:
        return "scattered"
    return "loosely grouped"


def neighbourhood(index: int, shapes: Sequence[Shape], category: str) -> str | None:
    """An object among its same-category neighbours (within NEIGHBOUR_RADIUS long sides):
    'parked side by side with two other small vehicles', 'lined up with ...', 'near ...',
    'with no other ... nearby'. `shapes` are all objects of the category in the tile."""
    me = shapes[index]
    radius = NEIGHBOUR_RADIUS * me.long
    near = [s for i, s in enumerate(shapes) if i != index
            and math.hypot(s.cx - me.cx, s.cy - me.cy) <= radius]
    if not near:
        return f"with no other {plural(category)} nearby" if len(shapes) > 1 else None
    partners = [s for s in near if side_by_side(me, s)]
    verb = "parked " if category_key(category) in PARKED_CATEGORIES else ""
    if partners:
        return f"{verb}side by side with {_others(len(partners), category)}"
    if in_a_row(np.array([[s.cx, s.cy] for s in [me, *near]])):
        return f"lined up with {_others(len(near), category)}"
    return f"near {_others(len(near), category)}"


def _others(n: int, category: str) -> str:
    return f"another {readable(category)}" if n == 1 else f"{number_word(n)} other {plural(category)}"


# =============================================================================================
# Ground cover


@dataclass(frozen=True)
class GroundCover:
    """Shares of each cover class over the pixels outside every object, the dominant cover's
    best cell and share per cell, and the tone of that ground."""

    shares: dict[str, float]
    dominant: str
    secondary: str | None
    dominant_cell: str
    dominant_everywhere: bool
    texture: str
    tone: str


def ground_cover(m: TileMeasurements) -> GroundCover:
    """Words-ready summary of a tile's measured ground-cover counts."""
    grid, names = m.grid, m.cover_classes
    per_cell = np.asarray(m.ground_cover, dtype=np.int64).reshape(grid * grid, len(names))
    counts = per_cell.sum(axis=0)
    total = float(counts.sum())
    shares = {name: float(counts[i]) / total for i, name in enumerate(names) if counts[i]}
    ranked = sorted(shares, key=lambda c: (-shares[c], c))
    dominant = ranked[0]
    secondary = next((c for c in ranked[1:] if shares[c] >= COVER_SECONDARY_MIN_SHARE), None)
    dominant_pixels = per_cell[:, names.index(dominant)]
    cells = cell_shares(dominant_pixels.tolist(), grid)
    ground_pixels = per_cell.sum(axis=1)
    everywhere = all(not n or d / n >= COVER_EVERYWHERE_MIN_SHARE
                     for d, n in zip(dominant_pixels.tolist(), ground_pixels.tolist()))
    std, mean = m.ground_value_std, m.ground_value_mean
    texture = ("uniform" if std <= TEXTURE_UNIFORM_MAX_STD else
               "strongly varied" if std >= TEXTURE_VARIED_MIN_STD else "moderately varied")
    tone = ("dark" if mean <= TONE_DARK_MAX_MEAN else
            "bright" if mean >= TONE_BRIGHT_MIN_MEAN else "of medium brightness")
    return GroundCover(shares=shares, dominant=dominant, secondary=secondary,
                       dominant_cell=max(cells, key=lambda c: cells[c]),
                       dominant_everywhere=everywhere, texture=texture, tone=tone)


# =============================================================================================
# A tile, measured once


@dataclass(frozen=True)
class ObjectMeasure:
    """One instance measured in its tile."""

    object_id: int
    category: str
    area: int
    shape: Shape
    rgb: tuple[int, int, int]
    colour: str
    cell: str


@dataclass
class TileMeasure:
    """A tile's measurements (`TileMeasurements`, taken once by plan) in this vocabulary."""

    tile_id: str
    measurements: TileMeasurements = field(repr=False)
    objects: dict[int, ObjectMeasure] = field(init=False)

    def __post_init__(self):
        grid = self.measurements.grid
        self.objects = {}
        for o in self.measurements.objects:
            shape = Shape(cx=o.cx, cy=o.cy, long=o.long, short=o.short, angle=o.angle)
            rgb = (o.rgb[0], o.rgb[1], o.rgb[2])
            self.objects[o.object_id] = ObjectMeasure(
                object_id=o.object_id, category=o.category, area=o.area, shape=shape, rgb=rgb,
                colour=colour_name(rgb), cell=pixel_position(o.cx, o.cy, self.width, self.height, grid))

    @property
    def grid(self) -> int:
        return self.measurements.grid

    @property
    def width(self) -> int:
        return self.measurements.width

    @property
    def height(self) -> int:
        return self.measurements.height

    def of_category(self, category: str) -> list[ObjectMeasure]:
        key = category_key(category)
        return [o for o in self.objects.values() if category_key(o.category) == key]

    def category_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.objects.values():
            counts[o.category] = counts.get(o.category, 0) + 1
        return counts

    def cover(self) -> GroundCover:
        return ground_cover(self.measurements)

    def concentration(self) -> tuple[str, float] | None:
        return concentration(self.measurements.object_pixels, self.grid)


def measure_tile(tile: Tile, grid: int = 3) -> TileMeasure:
    """Decode a tile and measure it (what plan stores in `TilePlan.measurements`)."""
    image = decode_png(tile.image_png)
    if image.shape[:2] != (tile.height, tile.width):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, "
                         f"record says {tile.width}x{tile.height}")
    try:
        instances = instance_masks(tile.tile_id, tile.height, tile.width, tile.objects)
    except BadMaskError as exc:
        raise ValueError(exc.message) from None
    return TileMeasure(tile_id=tile.tile_id, measurements=measure.measure_tile(
        image, instances, tile.image_sha256, grid))


def describe_object(measure: TileMeasure, object_id: int, category: str) -> dict[str, object]:
    """The measured attributes of one object among its tile's objects of the same category."""
    me = measure.objects[object_id]
    peers = measure.of_category(category) or [me]
    index = next(i for i, o in enumerate(peers) if o.object_id == object_id)
    return {
        "colour": me.colour,
        "size": object_size(me.area, category, [o.area for o in peers]),
        "orientation": orientation_words(me.shape),
        "cell": me.cell,
        "neighbours": neighbourhood(index, [o.shape for o in peers], category),
    }


def describe_group(measure: TileMeasure, object_ids: Sequence[int],
                   category: str) -> dict[str, object]:
    """The measured attributes of a group: count, arrangement, colour mix, cell of its centre."""
    members = [measure.objects[i] for i in object_ids]
    total = float(sum(o.area for o in members))
    cx = sum(o.shape.cx * o.area for o in members) / total
    cy = sum(o.shape.cy * o.area for o in members) / total
    return {
        "count": len(members),
        "arrangement": group_arrangement([o.shape for o in members],
                                         [o.area for o in members], category),
        "colours": colour_mix([o.colour for o in members]),
        "cell": pixel_position(cx, cy, measure.width, measure.height, measure.grid),
    }


def dominant_category(counts: Mapping[str, int]) -> str:
    """The category with the most objects (ties by name, for determinism)."""
    return min(counts, key=lambda c: (-counts[c], readable(c)))


# =============================================================================================
# Scene: what kind of place the tile shows, named from evidence
#
# The holistic answer opens with the scene and ends with a hedged reading of it ("This could be
# ..."), as GeoPixelD's captions do. Both come from SCENE_RULES below: the first rule whose
# evidence the tile shows names it. Evidence is only what plan measured: the ground-truth
# categories and their counts (the category prior), how many of them stand side by side
# (`paired_count`), their colour names and the ground-cover shares. A rule never names what its
# evidence cannot show: no roads without a roundabout or a bridge, no water without a
# water-bound category or water cover, and no vegetation at all (trees, grass, greenery) unless
# green vegetation covers at least VEGETATION_MIN_SHARE of the ground (`vegetation_named`).

SCENE_MIN_SHARE = 0.5          # a rule's objects are at least this share of the tile's objects
SIDE_BY_SIDE_MIN_SHARE = 0.5   # ... and, for parking rules, this share stand side by side
DEPOT_MIN_VEHICLES = 8         # large vehicles that make a depot or a yard
PARKING_MIN_VEHICLES = 8       # small vehicles that make a parking lot
TANK_FARM_MIN_TANKS = 3
WATER_MIN_SHARE = 0.08         # water cover that lets a bridge cross water
VEGETATION_MIN_SHARE = COVER_SECONDARY_MIN_SHARE  # green cover that may be named at all
BUILT_MIN_SHARE = 0.4          # paved, pale or reddish (roof-like) cover of a residential area
BUILT_COVER = ("grey paved surfaces", "bright pale surfaces", "reddish surfaces")
YELLOWISH = ("yellow", "olive", "orange")   # school-bus colours under sun and shade
SPORTS = ("ground_track_field", "soccer_ball_field", "baseball_diamond", "tennis_court",
          "basketball_court")
VEGETATION_WORDS = ("vegetation", "vegetated", "greenery", "green areas", "tree", "trees",
                    "grass", "grassy", "lawn", "lawns", "foliage", "wooded", "woodland",
                    "forest", "parkland", "leafy", "shrubs", "hedges")


@dataclass(frozen=True)
class SceneEvidence:
    """What a scene may be named from, per category key: objects, objects standing side by side
    with another of their category, colour names; and the ground-cover shares."""

    counts: Mapping[str, int]
    side_by_side: Mapping[str, int]
    colours: Mapping[str, Mapping[str, int]]
    cover: Mapping[str, float]
    dominant_cover: str

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class SceneRule:
    """One row of SCENE_RULES: the evidence a scene needs, and its words.

    The rule's objects are those of `categories`; it holds when there are at least
    `min_objects` of them, of at least `min_kinds` categories, making at least `min_share` of
    the tile's objects; each of `with_categories` is present; at least `min_side_by_side` of
    them stand side by side; more than half are of a colour in `colours` (when given); each
    (cover classes, least share) of `cover` holds; and the dominant cover is `dominant_cover`
    (when given). `names` open the holistic answer ("an aerial view of <name>"); `readings`
    close it, hedged ("This could be <reading>.")."""

    key: str
    names: tuple[str, ...]
    readings: tuple[str, ...]
    categories: tuple[str, ...] = ()
    min_objects: int = 1
    min_kinds: int = 1
    min_share: float = 0.0
    with_categories: tuple[str, ...] = ()
    min_side_by_side: float = 0.0
    colours: tuple[str, ...] = ()
    cover: tuple[tuple[tuple[str, ...], float], ...] = ()
    dominant_cover: str | None = None

    def holds(self, ev: SceneEvidence) -> bool:
        n = sum(ev.counts.get(c, 0) for c in self.categories)
        if n < self.min_objects or (n and n < self.min_share * ev.total):
            return False
        if self.categories and sum(1 for c in self.categories
                                   if ev.counts.get(c)) < self.min_kinds:
            return False
        if any(not ev.counts.get(c) for c in self.with_categories):
            return False
        if n and sum(ev.side_by_side.get(c, 0) for c in self.categories) < \
                self.min_side_by_side * n:
            return False
        if self.colours and 2 * sum(ev.colours.get(c, {}).get(name, 0)
                                    for c in self.categories for name in self.colours) <= n:
            return False
        if any(sum(ev.cover.get(k, 0.0) for k in classes) < least for classes, least in self.cover):
            return False
        return self.dominant_cover is None or self.dominant_cover == ev.dominant_cover


def _rule(key: str, names: Sequence[str], readings: Sequence[str], **evidence) -> SceneRule:
    return SceneRule(key, tuple(names), tuple(readings), **evidence)


_WATER = (("water",), WATER_MIN_SHARE)
_BUILT = (BUILT_COVER, BUILT_MIN_SHARE)
_LARGE, _SMALL = ("large_vehicle",), ("small_vehicle",)

# Evidence -> scene, first match wins (the most specific evidence first). Read as a table:
#   key            | evidence                                                     | scene
SCENE_RULES: tuple[SceneRule, ...] = (
    # ships + harbour -> a port
    _rule("port", ("a port", "a harbour with ships", "a port area"),
          ("a commercial port or a marina", "part of a seaport or a river port",
           "a working harbour where vessels berth"),
          categories=("ship",), with_categories=("harbor",)),
    # harbour structures alone -> a harbour
    _rule("harbour", ("a harbour", "a waterfront with piers"),
          ("a marina or a small port", "a harbour for boats and ships"),
          categories=("harbor",)),
    # ships -> waters with ships
    _rule("waters", ("water with ships", "a stretch of water with ships"),
          ("a shipping lane or an anchorage", "a waterway used by ships and boats"),
          categories=("ship",)),
    # two or more planes -> an airport apron; one -> part of an airfield
    _rule("apron", ("an airport apron", "an apron with aircraft", "part of an airport"),
          ("part of a commercial airport", "an airport's aircraft stands",
           "the apron of a regional airport"),
          categories=("plane",), min_objects=2),
    _rule("airfield", ("part of an airfield", "an airfield with an aircraft"),
          ("an airport or a small airfield", "a general aviation airfield"),
          categories=("plane",)),
    _rule("helicopters", ("a helicopter landing area", "an area with helicopters"),
          ("a heliport or part of an airfield", "a base for helicopter flights"),
          categories=("helicopter",)),
    # pitches and courts of two kinds or more -> a sports complex; one kind -> its venue
    _rule("sports", ("a sports complex", "a sports ground with pitches and courts"),
          ("a school sports ground or a public recreation park",
           "a recreational facility with courts and pitches"),
          categories=SPORTS, min_kinds=2),
    _rule("track", ("a sports ground with a running track", "an athletics ground"),
          ("a school or a public sports ground", "a stadium for athletics and field sports"),
          categories=("ground_track_field",)),
    _rule("soccer", ("a soccer field", "a football pitch"),
          ("a school or club sports field", "a public playing field"),
          categories=("soccer_ball_field",)),
    _rule("baseball", ("a baseball field", "a baseball ground"),
          ("a community sports park", "a school or club baseball ground"),
          categories=("baseball_diamond",)),
    _rule("tennis", ("a tennis court complex", "a group of tennis courts"),
          ("a recreational facility or a tennis club",
           "a sports club or a professional training ground"),
          categories=("tennis_court",), min_objects=2),
    _rule("tennis_court", ("a tennis court", "a single tennis court"),
          ("a private court or part of a sports club", "a recreational facility"),
          categories=("tennis_court",)),
    _rule("basketball", ("basketball courts", "a group of basketball courts"),
          ("a school playground or a public park", "a community recreation area"),
          categories=("basketball_court",), min_objects=2),
    _rule("basketball_court", ("a basketball court", "a single basketball court"),
          ("a school playground or a public park", "a community recreation area"),
          categories=("basketball_court",)),
    # roundabout -> a road junction; bridge over water cover -> a water crossing
    _rule("roundabout", ("a road junction with a roundabout", "a roundabout junction"),
          ("a junction where several roads meet", "part of a local road network"),
          categories=("roundabout",)),
    _rule("river_crossing", ("a bridge over water", "a water crossing"),
          ("a road or rail crossing over a river or a canal", "a river crossing"),
          categories=("bridge",), cover=(_WATER,)),
    _rule("bridge", ("an elevated crossing", "a crossing point"),
          ("an overpass or a crossing over a river or a railway",
           "part of a road or rail link"),
          categories=("bridge",)),
    # storage tanks, most of the objects -> an industrial storage site
    _rule("tank_farm", ("an industrial storage site", "a tank farm"),
          ("an oil or chemical storage depot", "a fuel storage facility"),
          categories=("storage_tank",), min_objects=TANK_FARM_MIN_TANKS,
          min_share=SCENE_MIN_SHARE),
    # swimming pools among roof-like and paved cover -> a residential area
    _rule("residential", ("a residential area with swimming pools",
                          "a neighbourhood with swimming pools"),
          ("a suburban neighbourhood of houses with private pools",
           "a residential district or a holiday resort"),
          categories=("swimming_pool",), min_objects=2, cover=(_BUILT,)),
    _rule("pools", ("an area with swimming pools", "a site with swimming pools"),
          ("a residential area or a leisure facility", "a hotel or a private estate"),
          categories=("swimming_pool",)),
    # many large vehicles parked side by side -> a depot (yellow ones: school buses)
    _rule("bus_depot", ("a bus depot", "a bus yard", "a vehicle depot", "a bus parking yard",
                        "a depot for buses"),
          ("a depot where school buses are parked", "a school bus yard",
           "the yard of a school bus operator", "a school district's bus depot",
           "where a fleet of school buses is kept"),
          categories=_LARGE, min_objects=DEPOT_MIN_VEHICLES, min_share=SCENE_MIN_SHARE,
          min_side_by_side=SIDE_BY_SIDE_MIN_SHARE, colours=YELLOWISH),
    _rule("depot", ("a bus or truck depot", "a truck yard", "a vehicle depot", "a lorry park",
                    "a heavy-vehicle depot", "a depot for trucks"),
          ("a truck or trailer yard at a freight site", "a lorry park or a bus depot",
           "a logistics yard for trailers", "a haulage company's depot",
           "where trailers wait to be collected"),
          categories=_LARGE, min_objects=DEPOT_MIN_VEHICLES, min_share=SCENE_MIN_SHARE,
          min_side_by_side=SIDE_BY_SIDE_MIN_SHARE),
    _rule("yard", ("an open yard with large vehicles", "a lot with large vehicles"),
          ("a loading or freight yard", "a yard for trucks or buses"),
          categories=_LARGE, min_objects=DEPOT_MIN_VEHICLES, min_share=SCENE_MIN_SHARE),
    # many small vehicles parked side by side -> a parking lot
    _rule("parking_lot", ("a parking lot", "a car park"),
          ("a public car park", "the car park of a shopping or office area"),
          categories=_SMALL, min_objects=PARKING_MIN_VEHICLES, min_share=SCENE_MIN_SHARE,
          min_side_by_side=SIDE_BY_SIDE_MIN_SHARE),
    _rule("parking_area", ("a parking area", "a parking area for cars and larger vehicles"),
          ("a car and truck park", "the parking area of a business or a depot"),
          categories=_LARGE + _SMALL, min_objects=PARKING_MIN_VEHICLES,
          min_share=SCENE_MIN_SHARE, min_side_by_side=SIDE_BY_SIDE_MIN_SHARE),
    _rule("vehicles", ("an area with vehicles", "a site with vehicles"),
          ("part of a settled area where vehicles park or pass",
           "a place where vehicles stop or pass through"),
          categories=_LARGE + _SMALL, min_share=SCENE_MIN_SHARE),
    # nothing above: the dominant ground cover names the scene
    _rule("paved", ("a paved area", "an expanse of grey paving"),
          ("part of a built-up area", "a paved yard or an open lot"),
          min_objects=0, dominant_cover="grey paved surfaces"),
    _rule("green", ("a green, vegetated area", "an area of greenery"),
          ("parkland or farmland", "a rural or park landscape"),
          min_objects=0, dominant_cover="green vegetation"),
    _rule("water", ("open water", "an expanse of water"),
          ("a lake, a river or the sea", "part of a large body of water"),
          min_objects=0, dominant_cover="water"),
    _rule("soil", ("bare brown ground", "an area of bare soil"),
          ("farmland or a construction site", "open land cleared for building or farming"),
          min_objects=0, dominant_cover="bare brown soil"),
    _rule("sand", ("sandy ground", "a sandy area"),
          ("a beach or a dry open area", "dry open land"),
          min_objects=0, dominant_cover="light sandy ground"),
    _rule("pale", ("an area of bright pale surfaces", "bright pale ground"),
          ("rooftops or concrete yards", "a built-up area of pale rooftops and yards"),
          min_objects=0, dominant_cover="bright pale surfaces"),
    _rule("dark", ("dark ground", "a dark, shadowed area"),
          ("shaded ground or dark water", "a shadowed part of a larger scene"),
          min_objects=0, dominant_cover="dark areas"),
    _rule("reddish", ("an area of reddish surfaces", "reddish ground"),
          ("tiled rooftops or red earth", "an area of red roofs or bare red soil"),
          min_objects=0, dominant_cover="reddish surfaces"),
)


def scene_evidence(measure: TileMeasure) -> SceneEvidence:
    """The evidence SCENE_RULES weigh, from a tile's measurements."""
    counts: dict[str, int] = {}
    colours: dict[str, dict[str, int]] = {}
    shapes: dict[str, list[Shape]] = {}
    for o in measure.objects.values():
        key = category_key(o.category)
        counts[key] = counts.get(key, 0) + 1
        colours.setdefault(key, {})[o.colour] = colours.get(key, {}).get(o.colour, 0) + 1
        shapes.setdefault(key, []).append(o.shape)
    cover = measure.cover()
    return SceneEvidence(counts=counts,
                         side_by_side={k: paired_count(v) for k, v in shapes.items()},
                         colours=colours, cover=dict(cover.shares),
                         dominant_cover=cover.dominant)


def scene_rule(evidence: SceneEvidence) -> SceneRule:
    """The first rule of SCENE_RULES the evidence satisfies (a cover rule always does)."""
    return next(rule for rule in SCENE_RULES if rule.holds(evidence))


def vegetation_named(cover: Mapping[str, float]) -> bool:
    """Whether words of VEGETATION_WORDS may describe a tile with these cover shares."""
    return cover.get("green vegetation", 0.0) >= VEGETATION_MIN_SHARE


def cover_cells(m: TileMeasurements, name: str) -> dict[str, float]:
    """Per 3x3 (grid) cell, the share of that cell's ground that is of cover class `name`."""
    grid, names = m.grid, m.cover_classes
    per_cell = np.asarray(m.ground_cover, dtype=np.int64).reshape(grid * grid, len(names))
    ground = per_cell.sum(axis=1)
    column = per_cell[:, names.index(name)] if name in names else np.zeros(grid * grid)
    return {region_name(grid, grid, k // grid, k % grid):
            (float(column[k]) / float(ground[k]) if ground[k] else 0.0)
            for k in range(grid * grid)}
