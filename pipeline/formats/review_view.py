"""What the review notebook shows: records and tile images read from an export, each phrase's
mask drawn on its tile in its phrase colour, and the caption, headings and status lines as HTML;
the claims the qa stage checked (`claims.parquet` in its report folder, `load_claims`), so that
the queue puts records with failed claims first (`failed_first`) and shows each failed claim
under its caption (`claims_html`).

The decisions the notebook writes (`decide`, `append_decisions`, `pending`, `rename_phrase`)
belong to the review stage that applies them (`pipeline.stages.review`); this module only reads
and draws. Colours are the HTML report's palette, so a phrase looks the same in both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import pyarrow.parquet as pq

from pipeline.core.errors import EmptyInputError
from pipeline.core.shards import list_shards, read_records
from pipeline.geometry.claims import Claim, read_claims
from pipeline.geometry.claims import failed_first as claims_failed_first
from schemas import RLE, GroundedRecord, Phrase, Provenance


def load_records(path: Path) -> list[GroundedRecord]:
    """Records from a Parquet export (a shard or its folder) or a GroundedRecord folder."""
    path = Path(path)
    files = [path] if path.is_file() else list_shards(path)
    if not files:
        raise EmptyInputError("no Parquet shards ({split}-NNNNN-of-NNNNN.parquet)", path)
    records: list[GroundedRecord] = []
    for file in files:
        metadata = pq.read_schema(file).metadata or {}
        if metadata.get(b"geopixeld.record") == b"GroundedRecord":
            records.extend(read_records(file, GroundedRecord))
        else:
            table = pq.read_table(file, columns=[c for c in _EXPORT_COLUMNS
                                                 if c in pq.read_schema(file).names])
            records.extend(_from_export_row(row) for row in table.to_pylist())
    return records


_EXPORT_COLUMNS = ("record_id", "tile_id", "split", "caption", "phrases", "phrase_kinds",
                   "phrase_categories", "masks", "object_ids", "provenance", "review")


def _from_export_row(row: dict) -> GroundedRecord:
    phrases = [Phrase(text=t, kind=k, category=c, object_ids=o, mask=RLE(**m))
               for t, k, c, o, m in zip(row["phrases"], row["phrase_kinds"],
                                        row["phrase_categories"], row["object_ids"],
                                        row["masks"])]
    return GroundedRecord(record_id=row["record_id"], tile_id=row["tile_id"],
                          split=row["split"], caption=row["caption"], phrases=phrases,
                          provenance=Provenance(**row["provenance"]),
                          review=row.get("review") or "unreviewed")


def export_images(path: Path, record_ids: Iterable[str]) -> dict[str, bytes]:
    """The tile PNG of each named record, from a Parquet export (a shard or its folder)."""
    path, wanted = Path(path), sorted(set(record_ids))
    found: dict[str, bytes] = {}
    for file in [path] if path.is_file() else list_shards(path):
        table = pq.read_table(file, columns=["record_id", "image"],
                              filters=[("record_id", "in", wanted)])
        found.update({r["record_id"]: r["image"]["bytes"] for r in table.to_pylist()})
    return found


def phrase_colour(i: int) -> str:
    """The hex colour of the i-th phrase: the HTML report's palette, so that a phrase has the
    same colour in the notebook's overlay and caption as in the report."""
    from pipeline.formats.html_report import phrase_colour as rgb

    return "#{:02x}{:02x}{:02x}".format(*rgb(i))


def overlay(record: GroundedRecord, image_png: bytes, opacity: float = 0.5,
            thickness: int = 0):
    """The tile (PIL image) with each phrase's mask in its phrase colour, outlined when
    `thickness` > 0: the HTML report's `draw_phrases` (supervision), at the tile's size."""
    import cv2
    from PIL import Image

    from pipeline.core.imaging import decode_png
    from pipeline.formats.html_report import draw_phrases
    from pipeline.geometry import masks

    scene = cv2.cvtColor(decode_png(image_png), cv2.COLOR_RGB2BGR)  # RGB uint8 -> BGR
    scene = draw_phrases(scene, [masks.decode(p.mask) for p in record.phrases], opacity,
                         thickness)
    return Image.fromarray(cv2.cvtColor(scene, cv2.COLOR_BGR2RGB))


def caption_html(record: GroundedRecord) -> str:
    """The caption as HTML: each grounded phrase on its mask's colour, [SEG] as its index
    (template review/caption.html.j2, autoescaped)."""
    from pipeline.formats.templating import render

    parts, last = [], 0
    for i, m in enumerate(re.finditer(r"<p>(.*?)</p> \[SEG\]", record.caption, re.DOTALL)):
        parts.append({"text": record.caption[last:m.start()]})
        colour = phrase_colour(i)
        r, g, b = (int(colour[k:k + 2], 16) for k in (1, 3, 5))
        ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"  # readable on it
        parts.append({"phrase": m.group(1).strip(), "index": i, "colour": colour, "ink": ink})
        last = m.end()
    parts.append({"text": record.caption[last:]})
    return render("review/caption.html.j2", parts=parts)


def heading_html(record: GroundedRecord) -> str:
    """A tile's heading in the review notebook: record id, backend and phrase count (record ids
    and backend names are text from files: escaped)."""
    from pipeline.formats.templating import render

    return render("review/heading.html.j2", record_id=record.record_id,
                  backend=record.provenance.backend, phrases=len(record.phrases))


def decision_html(kind: str, file: Optional[Path] = None, refused: Optional[str] = None) -> str:
    """The status line under a tile's buttons: "<kind> written to <file>", or why a decision
    was refused (escaped)."""
    from pipeline.formats.templating import render

    return render("review/message.html.j2", kind=kind, file=Path(file).name if file else "",
                  refused=refused or "")


def load_claims(path: Path) -> dict[str, list[Claim]]:
    """Record id -> the claims the qa stage checked on it (its `claims.parquet`); empty when
    the file does not exist (the qa stage has not run): the queue then keeps its order."""
    path = Path(path)
    return read_claims(path) if path.is_file() else {}


def failed_first(records: Sequence[GroundedRecord],
                 claims: Mapping[str, Sequence[Claim]]) -> list[GroundedRecord]:
    """The records with failed claims first, then the others, each in their given order (the
    HTML report's order; `pipeline.geometry.claims.failed_first`)."""
    return claims_failed_first(records, lambda r: claims.get(r.record_id, ()))


def claims_html(record: GroundedRecord, claims: Sequence[Claim]) -> str:
    """The record's failed claims as HTML, each after its phrase in the phrase's colour (template
    review/claims.html.j2, autoescaped); empty when none failed."""
    from pipeline.formats.html_report import failed_claim_items
    from pipeline.formats.templating import render

    failed = failed_claim_items(record.phrases, claims)
    return render("review/claims.html.j2", failed=failed, checked=len(claims)) if failed else ""
