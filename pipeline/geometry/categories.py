"""iSAID categories: the devkit's palette and the readable names used as the category prior."""

from __future__ import annotations

from pipeline.core.text import plural_noun

# Devkit category name -> colour (R, G, B) in `_instance_color_RGB.png`.
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
