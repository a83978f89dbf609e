"""User-facing errors: one type per kind of mistake, caught once in the CLI, shown as one line."""

from __future__ import annotations

from pathlib import Path


class GeoPixelDError(Exception):
    """A problem with the user's input or parameters, tied to a file where there is one."""

    kind = "error"

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def __reduce__(self):
        # keep `path` when the error crosses a process boundary (dask workers)
        return (type(self), (self.message, self.path))

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.kind}: {where}{self.message}".replace("\n", " ")


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
