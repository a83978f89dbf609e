"""When a stage's failures make the whole run a failure: the one place that decides.

A run that answered nothing (API down, 5xx to everything, empty answers, every answer refused by
output cleaning) must not end as a success that replaces a good output with an empty one. Each
stage hands its counts here inside its `staged_folder` block, after its shards are done: a
refusal raises there, so the staged output is thrown away and the previous output stays.

- annotate: the share of a pass's requests that still failed after their retries may not exceed
  `annotate.max_failed_share` (default 0: any failure fails the stage). Exit 3
  (`BackendFailureError`): not the user's input; answers already paid for are in the response
  cache, and the next run asks only the failed ones again. One rule for every backend: a
  local model whose answers cleaning refuses fails the stage too (raise the share to accept
  them, e.g. while trying a small model).
- compose: the share of the tiles with objects that ended without a record (dropped: a failed
  holistic answer, an injected tag, a caption outside the length limits, ...) may not exceed
  `compose.max_dropped_share`. Exit 2 (`BadRecordError`): those records failed validation, and
  running compose again on the same answers drops them again; what fixes it is a parameter or
  the answers (the reasons are counted per tile in compose's dropped/ shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pipeline.core.errors import BackendFailureError, BadRecordError


def too_many(failed: int, total: int, max_share: float) -> bool:
    """Whether `failed` of `total` is above the share `max_share` allows (none of none is not)."""
    return total > 0 and failed > 0 and failed / total > max_share


def check_annotate(kind: str, report: dict, max_share: float, out_dir: Path) -> None:
    """Raise BackendFailureError when too many of an annotate pass's requests failed."""
    failed, total = report.get("failed", 0), report.get("requests", 0)
    if not too_many(failed, total, max_share):
        return
    first = _first(report.get("failures", ()))
    raise BackendFailureError(
        f"{failed} of {total} {kind} requests failed after their retries (first: {first}); "
        f"annotate.max_failed_share is {max_share:g}. Kept {out_dir} as it was; answers "
        "already paid for are kept in the response cache and the next run asks only the "
        "failed ones again")


def check_compose(report: dict, first_drop: Optional[dict], max_share: float,
                  out_dir: Path) -> None:
    """Raise BadRecordError when too many tiles with objects ended without a record."""
    dropped = report.get("dropped_with_objects", 0)
    total = report.get("tiles_with_objects", 0)
    if not too_many(dropped, total, max_share):
        return
    first = "?"
    if first_drop:
        said = first_drop.get("detail") or ""
        detail = f" ({said})" if said and said != first_drop["reason"] else ""
        first = f"tile {first_drop['tile_id']}: {first_drop['reason']}{detail}"
    raise BadRecordError(
        f"{dropped} of {total} tiles with objects made no record (first: {first}); "
        f"compose.max_dropped_share is {max_share:g}. Kept {out_dir} as it was; the answers "
        "are kept: change the parameters or the answers that make these drops and run "
        "compose again")


def _first(failures: Sequence[dict]) -> str:
    for failure in failures:
        return f"{failure.get('request_id', '?')}: {failure.get('error') or 'failed'}"
    return "?"
