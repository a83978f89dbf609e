"""Versioned prompt templates. Version `v1` is the paper's wording (GeoPixel, Figure 3).

A prompt change is a new version folder: old versions stay so that records keep naming the exact
text they were made with. Templates use `str.format` fields.
"""

from __future__ import annotations

import string
from functools import lru_cache
from importlib import resources

from pipeline.core.errors import BadParamsError
from schemas import PASSES


class UnknownPromptVersion(BadParamsError, KeyError):
    """A prompt version with no folder here (a KeyError too, as before)."""

    def __str__(self) -> str:
        return self.message


@lru_cache(maxsize=None)
def template(kind: str, version: str = "v1") -> str:
    """The raw template text for a request kind at a prompt version (one of `versions()`:
    a version is a folder name here, never a path)."""
    if kind not in PASSES and not kind.replace("_", "").isalnum():
        raise KeyError(f"unknown prompt kind {kind!r}")
    if version not in versions():
        raise UnknownPromptVersion(f"prompt version {version!r} not found; available: "
                                   f"{', '.join(versions())} (folders of prompts/)")
    path = resources.files(__name__).joinpath(version, f"{kind}.txt")
    if not path.is_file():
        raise KeyError(f"no prompt {kind!r} at version {version!r}")
    return path.read_text(encoding="utf-8")


def fields(kind: str, version: str = "v1") -> set[str]:
    """The `{field}` names a template expects."""
    return {f for _, f, _, _ in string.Formatter().parse(template(kind, version)) if f}


def render(kind: str, version: str = "v1", **values: object) -> str:
    """Fill a template; every field must be given, and no extra ones."""
    expected = fields(kind, version)
    if set(values) != expected:
        raise KeyError(f"prompt {kind}/{version} needs {sorted(expected)}, got {sorted(values)}")
    return template(kind, version).format(**values)


@lru_cache(maxsize=1)
def _versions() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in resources.files(__name__).iterdir()
                        if p.is_dir() and p.name.startswith("v")))


def versions() -> list[str]:
    """The prompt versions: the folders v* of this package."""
    return list(_versions())
