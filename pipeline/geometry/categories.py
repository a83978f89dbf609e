"""iSAID categories: the devkit's palette and ids, and the readable names used as the
category prior."""

from __future__ import annotations

from typing import Iterable, Optional

from pipeline.core.text import plural_noun

# Devkit category name -> colour (R, G, B) in `_instance_color_RGB.png`, in the devkit's label
# order (see ISAID_CATEGORY_IDS).
ISAID_PALETTE: dict[str, tuple[int, int, int]] = {
    "ship": (0, 0, 63),
    "storage_tank": (0, 63, 63),
    "baseball_diamond": (0, 63, 0),
    "tennis_court": (0, 63, 127),
    "basketball_court": (0, 63, 191),
    "Ground_Track_Field": (0, 63, 255),
    "Bridge": (0, 127, 63),
    "Large_Vehicle": (0, 127, 127),
    "Small_Vehicle": (0, 0, 127),
    "Helicopter": (0, 0, 191),
    "Swimming_pool": (0, 0, 255),
    "Roundabout": (0, 191, 127),
    "Soccer_ball_field": (0, 127, 191),
    "plane": (0, 127, 255),
    "Harbor": (0, 100, 155),
}


# Devkit category name -> iSAID's category id: the label ids of the iSAID devkit
# (CAPTAIN-WHU/iSAID_Devkit, preprocess/cityscapesScripts/cityscapesscripts/helpers/labels.py:
# 0 unlabeled, 1 ship ... 15 Harbor, the order of the palette above; trainId = id - 1). The
# devkit's own COCO conversion (preprocess.py) numbers categories in order of first appearance,
# so its json files do not agree with one another: these label ids are the stable ones.
ISAID_CATEGORY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(ISAID_PALETTE)}


class CategoryIdConflict(ValueError):
    """The sources give one category two ids, or one id to two categories."""


def category_ids(objects: Iterable[tuple[str, Optional[int]]]) -> dict[str, int]:
    """COCO category ids for an export whose objects have the (category, source id) pairs
    `objects`, the same in every build:

    - a category keeps the id its source gives it (iSAID's label ids, a COCO label file's
      ids, a GeoJSON integer class; `ObjectInstance.category_id`);
    - when every given id is iSAID's own (or none is given) and an iSAID category is present,
      all 15 of iSAID's categories are listed with iSAID's ids, so that an id never depends
      on which categories a build happens to hold;
    - every other category, sorted by name, gets the next ids from 16 up (from above the
      largest given id, where one is larger).

    A category given two ids, or an id given to two categories, is a `CategoryIdConflict`."""
    given: dict[str, int] = {}
    names: set[str] = set()
    for name, given_id in objects:
        names.add(name)
        if given_id is None or given_id < 1:
            continue
        if given.setdefault(name, given_id) != given_id:
            raise CategoryIdConflict(f"category {name!r} has two ids in the sources: "
                                     f"{given[name]} and {given_id}")
    by_id: dict[int, str] = {}
    for name, given_id in given.items():
        if by_id.setdefault(given_id, name) != name:
            raise CategoryIdConflict(f"category id {given_id} names two categories in the "
                                     f"sources: {by_id[given_id]!r} and {name!r}")
    ids = dict(given)
    if names & ISAID_CATEGORY_IDS.keys() and all(
            ISAID_CATEGORY_IDS.get(name) == i for name, i in given.items()):
        ids.update(ISAID_CATEGORY_IDS)
    first = max([len(ISAID_CATEGORY_IDS), *ids.values()]) + 1
    ids.update({name: first + i for i, name in enumerate(sorted(names - ids.keys()))})
    return ids


# Category of an object whose class is not known (new imagery masked by SAM): such objects are
# described with the category-free prompt variant, never with an invented category.
UNKNOWN_CATEGORY = "object"


def colour_value(rgb: tuple[int, int, int]) -> int:
    """The devkit's scalar for an RGB colour: R + 256 G + 65536 B."""
    r, g, b = rgb
    return r + 256 * g + 65536 * b


# Scalar colour value -> devkit category name.
ISAID_COLOUR_TO_CATEGORY: dict[int, str] = {colour_value(c): n for n, c in ISAID_PALETTE.items()}


def readable(category: str) -> str:
    """Category prior wording: 'Small_Vehicle' -> 'small vehicle'."""
    return category.replace("_", " ").strip().lower()


def plural(category: str) -> str:
    """'Small_Vehicle' -> 'small vehicles' (the cluster prompt speaks of groups): the plural
    of the readable name (`pipeline.core.text.plural_noun`)."""
    return plural_noun(readable(category))
