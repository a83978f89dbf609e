"""Guarded readers for every file a user hands the pipeline.

One place decides what a bad file looks like: missing, a folder, unreadable, too large, not
UTF-8, not JSON, nested too deep. Each problem is one `GeoPixelDError` naming the file, so the
CLI shows one line and exits 2 instead of a traceback. Stage code opens user files only through
these functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import BadAnnotationError, GeoPixelDError

# a JSON document larger than this is refused before it is read (iSAID's train json is ~1 GB)
MAX_JSON_BYTES = 4 << 30
# nesting deeper than this is refused (no real annotation file nests beyond ~10 levels)
MAX_JSON_DEPTH = 64


def read_user_bytes(path: str | Path, what: str, *, max_bytes: int | None = None,
                    error: type[GeoPixelDError] = BadAnnotationError) -> bytes:
    """The bytes of a user file; a missing file, a folder, an unreadable or oversized file is
    `error` naming `what` and the file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise error(f"{what} is a folder, not a file", path)
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"{what} is {size} bytes, more than the {max_bytes} allowed", path)
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found", path) from None
    except PermissionError:
        raise error(f"{what} is not readable (permission denied)", path) from None
    except IsADirectoryError:
        raise error(f"{what} is a folder, not a file", path) from None
    except OSError as exc:
        raise error(f"{what} cannot be read ({os.strerror(exc.errno or 0) or exc})",
                    path) from None


def read_user_text(path: str | Path, what: str, *, max_bytes: int | None = None,
                   error: type[GeoPixelDError] = BadAnnotationError) -> str:
    """A user text file decoded as UTF-8 (a leading BOM is dropped); anything else is `error`."""
    data = read_user_bytes(path, what, max_bytes=max_bytes, error=error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})", path) from None


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in `text` nests deeper than `limit` (strings skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, what: str, path: str | Path | None = None, *,
               max_depth: int = MAX_JSON_DEPTH,
               error: type[GeoPixelDError] = BadAnnotationError) -> object:
    """Parse JSON text with a nesting limit; NaN and Infinity (not JSON) are refused."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 text (byte {exc.start})", path) from None
    if not json_depth_ok(text, max_depth):
        raise error(f"{what} nests deeper than {max_depth} levels", path)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise error(f"{what} is not valid JSON ({reason})", path) from None


def read_user_json(path: str | Path, what: str, *, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH,
                   error: type[GeoPixelDError] = BadAnnotationError) -> object:
    """Read and parse a user JSON file through the guards above."""
    text = read_user_text(path, what, max_bytes=max_bytes, error=error)
    return parse_json(text, what, path, max_depth=max_depth, error=error)
