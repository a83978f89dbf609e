"""User-facing errors: one type per kind of mistake, caught once in the CLI, shown as one line."""

from __future__ import annotations

import unicodedata
from pathlib import Path


class GeoPixelDError(Exception):
    """A problem with the user's input or parameters, tied to a file where there is one."""

    kind = "error"
    # the CLI's exit code: 2 = a problem with the user's input, parameters or output folder
    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def __reduce__(self):
        # keep `path` when the error crosses a process boundary (dask workers)
        return (type(self), (self.message, self.path))

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return printable(f"{self.kind}: {where}{self.message}")


# secrets of this process (API keys): never written or printed, whole or by an 8+ char prefix
_SECRETS: set[str] = set()
SECRET_PREFIX = 8
REDACTED = "[redacted]"


def register_secret(value: str | None) -> None:
    """Remember a secret (an API key) so that `scrub` removes it from every text."""
    if value and len(value) >= SECRET_PREFIX:
        _SECRETS.add(value)


def scrub(text: str, secrets: "set[str] | None" = None) -> str:
    """`text` with every registered secret, and any prefix of one of 8 or more characters,
    replaced by [redacted]."""
    for secret in secrets if secrets is not None else _SECRETS:
        head = secret[:SECRET_PREFIX]
        start = text.find(head)
        while start != -1:
            end = start + SECRET_PREFIX
            while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
                end += 1
            text = text[:start] + REDACTED + text[end:]
            start = text.find(head, start + len(REDACTED))
    return text


def printable(text: str) -> str:
    """`text` safe to show on a terminal as one line: line breaks become spaces, and control,
    format (bidi overrides, zero-width) and other invisible characters are shown as escapes
    (`\\x1b`, `\\u202e`), so user text can neither forge lines nor restyle the terminal."""
    out = []
    for ch in scrub(str(text)):
        if ch in "\r\n\t":
            out.append(" ")
        elif unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


class BadImageError(GeoPixelDError):
    """Unreadable, truncated, oversized or unsupported image."""

    kind = "bad image"


class BadMaskError(GeoPixelDError):
    """Missing mask, mask of another size, colour outside the palette."""

    kind = "bad mask"


class BadAnnotationError(GeoPixelDError):
    """A malformed annotation file (COCO json, polygons, ...)."""

    kind = "bad annotation"


class EmptyInputError(GeoPixelDError):
    """Nothing to work on: empty folder, no images for a split."""

    kind = "empty input"


class DuplicateNameError(GeoPixelDError):
    """Two inputs that would produce the same tile or file name."""

    kind = "duplicate name"


class UnsafePathError(GeoPixelDError):
    """A name that would write outside the output folder."""

    kind = "unsafe path"


class BadParamsError(GeoPixelDError):
    """A parameter out of range or of the wrong type."""

    kind = "bad parameters"


class BadRecordError(GeoPixelDError):
    """A record that fails validation (tags, [SEG] count, ...)."""

    kind = "bad record"


class OutputFolderError(GeoPixelDError):
    """An output folder the stage may not replace: the user's own files, an input, a file,
    or a folder another run is writing."""

    kind = "output folder"


class BadShardError(GeoPixelDError):
    """A shard that is not Parquet, or holds another record type than the stage reads."""

    kind = "bad shard"


class BadCacheError(GeoPixelDError):
    """A response cache that is corrupt, a folder, or cannot be written."""

    kind = "response cache"


class BadDecisionsError(GeoPixelDError):
    """A review decisions file that cannot be read or holds a malformed decision."""

    kind = "bad decisions"


class SchedulerError(GeoPixelDError):
    """A dask scheduler that cannot be reached."""

    kind = "scheduler"


class BackendFailureError(GeoPixelDError):
    """Too many requests still failed after their retries (API down, 5xx, empty or refused
    answers). Paid answers are kept in the response cache; the next run re-asks only the
    failed ones. Exit code 3: not the user's input, try again later."""

    kind = "backend failed"
    exit_code = 3


class EmptyResultError(GeoPixelDError):
    """A run that produced nothing where the previous output it would replace has records."""

    kind = "empty result"


class BadReportError(GeoPixelDError):
    """A stage's report.json that cannot be read (summary)."""

    kind = "bad report"
