"""Record validation: is a grounded caption exactly what GeoPixel's loader and a reader expect?

`validate_record` returns reason codes (empty = valid). `compose` drops any record that fails,
and the review stage runs the same check on human edits, so a record is never exported half
right. `sanitize_fragment` refuses annotator text that could forge grounding tags before it is
woven into a caption, and normalises it under the text rule (`pipeline.core.text.normalise_text`:
escape sequences, control, bidi and invisible characters removed, NFC); the full
output-cleaning module is `annotators.cleaning`.

Reason codes, in the order they are reported:
  unbalanced_tags      a </p> without its <p>, or a <p> never closed
  nested_tags          a <p> opened inside another
  seg_not_after_tag    a </p> not followed by " [SEG]"
  seg_count_mismatch   number of [SEG] != number of phrases
  tag_count_mismatch   number of <p> != number of phrases
  phrase_text_mismatch text between the i-th tags != " " + phrases[i].text + " "
  empty_phrase         a phrase with no text
  unsafe_text          caption or phrase text that the text rule would change: an escape
                       sequence, a control, bidi or invisible character, a line break or tab,
                       text not in Unicode NFC (`pipeline.core.text.text_problem` says which)
  stray_tag            tag-like text outside the grounding tags ("<", ">", "[SEG" pieces)
  leaked_mark          a set-of-marks number in the text ("marked with number 3", "#3", "(3)")
  bad_mask             a mask that pycocotools cannot read
  empty_mask           a mask with no pixel
  mask_size_mismatch   a mask not of the tile's size
  no_phrases           nothing grounded while compose.require_phrases
  too_many_phrases     more phrases than compose.max_phrases
  caption_too_short    fewer characters than compose.min_caption_chars
  caption_too_long     more characters than compose.max_caption_chars
"""

from __future__ import annotations

import re
from typing import Optional

from pipeline.core.params import ComposeParams
from pipeline.core.text import is_clean_text, normalise_text, text_problem
from pipeline.geometry import masks
from schemas import PHRASE_CLOSE, PHRASE_OPEN, SEG, GroundedRecord

REASONS = (
    "unbalanced_tags", "nested_tags", "seg_not_after_tag", "seg_count_mismatch",
    "tag_count_mismatch", "phrase_text_mismatch", "empty_phrase", "unsafe_text", "stray_tag",
    "leaked_mark",
    "bad_mask", "empty_mask", "mask_size_mismatch", "no_phrases", "too_many_phrases",
    "caption_too_short", "caption_too_long",
)

_TOKEN_RE = re.compile(r"<p>|</p>|\[SEG\]")
# One well-formed grounding: "<p> phrase </p> [SEG]" (the phrase itself is checked separately).
_GROUNDING_RE = re.compile(r"<p>.*?</p> \[SEG\]", re.DOTALL)
# Anything that looks like markup or a piece of the grounding token.
_TAG_LIKE_RE = re.compile(r"[<>]|\[\s*/?\s*seg|seg\s*\]", re.IGNORECASE)
# Set-of-marks numbers the instance prompt asks the model not to repeat.
_LEAKED_MARK_RE = re.compile(
    r"\b(?:mark(?:ed|ing|er)?|label(?:l?ed|l?ing)?|tagged|numbered)\s+"
    r"(?:(?:with|as|by)\s+)?(?:the\s+)?(?:(?:number|no\.?)\s*|#\s*)?\d+"
    r"|#\s*\d+"
    r"|\bnumber\s*\d+"
    r"|\bno\.\s*\d+"
    r"|[(\[]\s*\d{1,3}\s*[)\]]",
    re.IGNORECASE)


def sanitize_fragment(text: str) -> Optional[str]:
    """Annotator text ready to weave into a caption, or None if it carries tag-like text.

    Tag-like text ("<p>", "[SEG]", HTML, a stray "<") would forge or break the text <-> mask
    alignment, so the fragment is refused as a whole rather than repaired. The text rule is
    applied (`pipeline.core.text.normalise_text`: a model's escape sequences, control, bidi and
    invisible characters are removed, not refused) and whitespace collapsed to single spaces.
    """
    text = normalise_text(text)
    if _TAG_LIKE_RE.search(text):
        return None
    return " ".join(text.split())


def record_text_problem(record: GroundedRecord) -> Optional[str]:
    """Why the caption or a phrase text of `record` is not clean text (`pipeline.core.text`), or
    None when all are."""
    for where, text in [("caption", record.caption)] + [
            (f"phrase {i}", p.text) for i, p in enumerate(record.phrases)]:
        problem = text_problem(text)
        if problem is not None:
            return f"{where}: {problem}"
    return None


def has_leaked_mark(text: str) -> bool:
    """True if `text` names a set-of-marks number."""
    return _LEAKED_MARK_RE.search(text) is not None


def _tag_structure(caption: str) -> tuple[list[str], list[str]]:
    """Reason codes about tag nesting and order, and the text inside each <p>...</p>."""
    reasons: list[str] = []
    inner: list[str] = []
    open_at: Optional[int] = None
    for token in _TOKEN_RE.finditer(caption):
        kind = token.group()
        if kind == PHRASE_OPEN:
            if open_at is not None:
                reasons.append("nested_tags")
            open_at = token.end()
        elif kind == PHRASE_CLOSE:
            if open_at is None:
                reasons.append("unbalanced_tags")
                continue
            inner.append(caption[open_at:token.start()])
            open_at = None
            if not caption.startswith(" " + SEG, token.end()):
                reasons.append("seg_not_after_tag")
    if open_at is not None:
        reasons.append("unbalanced_tags")
    return reasons, inner


def validate_record(record: GroundedRecord, params: ComposeParams,
                    tile_size: Optional[tuple[int, int]] = None) -> list[str]:
    """Reason codes why `record` is not a valid GeoPixelD record; empty when it is.

    `tile_size` is (height, width); without it every mask must have the first mask's size.
    """
    caption, phrases = record.caption, record.phrases
    found, inner = _tag_structure(caption)
    if caption.count(PHRASE_OPEN) != caption.count(PHRASE_CLOSE):
        found.append("unbalanced_tags")
    if caption.count(SEG) != len(phrases):
        found.append("seg_count_mismatch")
    if caption.count(PHRASE_OPEN) != len(phrases):
        found.append("tag_count_mismatch")
    if len(inner) == len(phrases) and any(
            text != f" {p.text} " for text, p in zip(inner, phrases)):
        found.append("phrase_text_mismatch")
    if any(not p.text.strip() for p in phrases):
        found.append("empty_phrase")
    if not is_clean_text(caption) or any(not is_clean_text(p.text) for p in phrases):
        found.append("unsafe_text")

    outside = _GROUNDING_RE.sub(" ", caption)
    if _TAG_LIKE_RE.search(outside) or any(_TAG_LIKE_RE.search(p.text) for p in phrases):
        found.append("stray_tag")
    if has_leaked_mark(outside) or any(has_leaked_mark(p.text) for p in phrases):
        found.append("leaked_mark")

    found.extend(_mask_reasons(record, tile_size))
    if params.require_phrases and not phrases:
        found.append("no_phrases")
    if len(phrases) > params.max_phrases:
        found.append("too_many_phrases")
    if len(caption) < params.min_caption_chars:
        found.append("caption_too_short")
    if len(caption) > params.max_caption_chars:
        found.append("caption_too_long")
    return [r for r in REASONS if r in found]


def _mask_reasons(record: GroundedRecord, tile_size: Optional[tuple[int, int]]) -> list[str]:
    found = []
    expected = list(tile_size) if tile_size else None
    for phrase in record.phrases:
        size = list(phrase.mask.size)
        expected = expected or size
        if size != expected:
            found.append("mask_size_mismatch")
        # pycocotools reads some malformed counts without complaint: a valid RLE is canonical.
        valid, empty = masks.is_canonical(phrase.mask)
        if not valid:
            found.append("bad_mask")
        elif empty:
            found.append("empty_mask")
    return found
