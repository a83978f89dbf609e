"""Versioned prompt templates. Version `v1` is the paper's wording (GeoPixel, Figure 3).

A prompt change is a new version folder: old versions stay so that records keep naming the exact
text they were made with. Templates use `str.format` fields.

The grounded-description instructions (the human turn of an exported record) are versioned
lists, `instructions/<version>.txt`, one instruction a line; `pick_instruction` gives each
record one of them, the same one on every run.
"""

from __future__ import annotations

import string
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

from pipeline.core.errors import BadParamsError
from pipeline.core.text import stable_choice
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


# ---------------------------------------------------------------------------------------------
# Grounded-description instructions

INSTRUCTIONS = "instructions"


class Instruction(NamedTuple):
    """An instruction and its id: "<list version>/<n>" (n counts from 01 in its list), or
    "custom" for a text given as a parameter."""

    id: str
    text: str


@lru_cache(maxsize=1)
def _instruction_versions() -> tuple[str, ...]:
    folder = resources.files(__name__).joinpath(INSTRUCTIONS)
    return tuple(sorted(p.name.removesuffix(".txt") for p in folder.iterdir()
                        if p.is_file() and p.name.startswith("v") and p.name.endswith(".txt")))


def instruction_versions() -> list[str]:
    """The instruction list versions: the files instructions/v*.txt of this package."""
    return list(_instruction_versions())


@lru_cache(maxsize=None)
def instructions(version: str = "v1") -> tuple[str, ...]:
    """The instructions of a list version, in file order (comment and blank lines left out)."""
    if version not in _instruction_versions():
        raise UnknownPromptVersion(f"instruction list {version!r} not found; available: "
                                   f"{', '.join(_instruction_versions())} "
                                   f"(prompts/{INSTRUCTIONS}/*.txt)")
    text = resources.files(__name__).joinpath(INSTRUCTIONS, f"{version}.txt").read_text(
        encoding="utf-8")
    found = tuple(line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    if not found:
        raise UnknownPromptVersion(f"instruction list {version!r} holds no instruction")
    return found


def numbered_instruction(number: int, version: str = "v1") -> Instruction:
    """Instruction `number` (1-based) of a list version."""
    texts = instructions(version)
    if not 1 <= number <= len(texts):
        raise KeyError(f"instruction list {version!r} has instructions 1 to {len(texts)}, "
                       f"not {number}")
    return Instruction(f"{version}/{number:02d}", texts[number - 1])


def pick_instruction(record_id: str, version: str = "v1") -> Instruction:
    """The instruction of a record: chosen from the list by the sha256 of its id, so the same
    record gets the same instruction on every run and machine (never Python's `hash()`,
    which is salted per process), and a set of records spreads over the whole list."""
    return numbered_instruction(stable_choice(record_id, len(instructions(version))) + 1,
                                version)
