"""Record validation: each crafted bad composition gets its reason code; good ones get none."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.params import ComposeParams
from pipeline.core.validate import REASONS, has_leaked_mark, sanitize_fragment, validate_record
from pipeline.geometry import masks
from schemas import RLE, GroundedRecord, Phrase, Provenance

SIZE = 32
PROVENANCE = Provenance(backend="template", model="template-v1", prompt_versions=["v1"],
                        params_hash="0" * 16, pipeline_version="test")
SCENE = "The image shows a quiet harbour with calm water and a long pier. "


def box(y: int, x: int, size: int = SIZE) -> RLE:
    m = np.zeros((size, size), np.uint8)
    m[y:y + 4, x:x + 4] = 1
    return masks.encode(m)


def phrase(text: str, mask: RLE | None = None) -> Phrase:
    return Phrase(text=text, kind="instance", category="ship", object_ids=[1],
                  mask=mask or box(2, 2))


def record(caption: str, phrases: list[Phrase]) -> GroundedRecord:
    return GroundedRecord(record_id="t", tile_id="t", split="val", caption=caption,
                          phrases=phrases, provenance=PROVENANCE)


def reasons(caption: str, phrases: list[Phrase], **params) -> list[str]:
    return validate_record(record(caption, phrases), ComposeParams(**params), (SIZE, SIZE))


GOOD = SCENE + ("The <p> ship-1 </p> [SEG] at the top left is white. The <p> ship-2 </p> [SEG] "
                ", and <p> ship-3 </p> [SEG] are moored along a number of piers.")


def good_phrases() -> list[Phrase]:
    return [phrase("ship-1", box(0, 0)), phrase("ship-2", box(8, 8)), phrase("ship-3", box(16, 16))]


def test_a_well_formed_record_is_valid():
    assert reasons(GOOD, good_phrases()) == []


@pytest.mark.parametrize("caption, count, code", [
    (SCENE + "The <p> ship-1 [SEG] is white.", 1, "unbalanced_tags"),
    (SCENE + "The ship-1 </p> [SEG] is white.", 1, "unbalanced_tags"),
    (SCENE + "The <p> ship <p> ship-1 </p> [SEG] </p> [SEG] is white.", 2, "nested_tags"),
    (SCENE + "The <p> ship-1 </p> is white [SEG].", 1, "seg_not_after_tag"),
    (SCENE + "The <p> ship-1 </p>[SEG] is white.", 1, "seg_not_after_tag"),
    (SCENE + "The <p> ship-1 </p> [SEG] is white.", 2, "seg_count_mismatch"),
    (SCENE + "The <p> ship-1 </p> [SEG] is white [SEG].", 2, "tag_count_mismatch"),
    (SCENE + "The <p> ship-9 </p> [SEG] is white.", 1, "phrase_text_mismatch"),
    (SCENE + "The <p>ship-1</p> [SEG] is white.", 1, "phrase_text_mismatch"),
    (SCENE + "The <p> ship-1 </p> [SEG] is <b>white</b>.", 1, "stray_tag"),
    (SCENE + "The <p> ship-1 </p> [SEG] is white [SEG", 1, "stray_tag"),
    (SCENE + "The <p> ship-1 </p> [SEG] is 5 < 6 m long.", 1, "stray_tag"),
    (SCENE + "The <p> ship-1 </p> [SEG] marked with number 3 is white.", 1, "leaked_mark"),
    (SCENE + "The <p> ship-1 </p> [SEG] is white (mark 3).", 1, "leaked_mark"),
    (SCENE + "The <p> ship-1 </p> [SEG] #3 is white.", 1, "leaked_mark"),
    (SCENE + "The <p> ship-1 </p> [SEG] is number 3 of the row.", 1, "leaked_mark"),
    (SCENE + "The <p> ship-1 </p> [SEG] (3) is white.", 1, "leaked_mark"),
    (SCENE + "The <p> ship-1 </p> [SEG] labeled 3 is white.", 1, "leaked_mark"),
])
def test_bad_compositions_are_rejected_with_their_code(caption, count, code):
    phrases = [phrase("ship-1", box(2 + 8 * i, 2)) for i in range(count)]
    found = reasons(caption, phrases)
    assert code in found
    assert found == [r for r in REASONS if r in found]  # reported in the documented order


def test_empty_phrase():
    assert "empty_phrase" in reasons(SCENE + "The <p>   </p> [SEG] is white.", [phrase(" ")])


def test_masks_must_be_non_empty_readable_and_of_the_tile_size():
    caption = SCENE + "The <p> ship-1 </p> [SEG] is white."
    empty = masks.encode(np.zeros((SIZE, SIZE), np.uint8))
    assert reasons(caption, [phrase("ship-1", empty)]) == ["empty_mask"]
    assert reasons(caption, [phrase("ship-1", box(2, 2, size=SIZE * 2))]) == [
        "mask_size_mismatch"]
    assert reasons(caption, [phrase("ship-1", RLE(size=[SIZE, SIZE], counts="zzz"))]) == [
        "bad_mask"]
    # Without a tile size, masks must at least agree with each other.
    two = SCENE + "The <p> ship-1 </p> [SEG] and <p> ship-2 </p> [SEG] are white."
    mixed = record(two, [phrase("ship-1", box(0, 0)), phrase("ship-2", box(0, 0, SIZE * 2))])
    assert validate_record(mixed, ComposeParams()) == ["mask_size_mismatch"]


def test_length_and_phrase_limits_come_from_params():
    assert reasons(GOOD, good_phrases(), max_caption_chars=len(GOOD) - 1) == ["caption_too_long"]
    assert reasons(GOOD, good_phrases(), max_caption_chars=len(GOOD)) == []
    assert reasons(GOOD, good_phrases(), min_caption_chars=len(GOOD) + 1) == [
        "caption_too_short"]
    assert reasons(GOOD, good_phrases(), max_phrases=2) == ["too_many_phrases"]
    assert reasons(SCENE, []) == ["no_phrases"]
    assert reasons(SCENE, [], require_phrases=False) == []


def test_every_code_is_reported_once_in_order():
    caption = "<p> ship-1 </p> [SEG] marked 3 <i> " + "x" * 60
    found = reasons(caption, good_phrases(), max_phrases=1, max_caption_chars=50)
    assert found == ["seg_count_mismatch", "tag_count_mismatch", "stray_tag", "leaked_mark",
                     "too_many_phrases", "caption_too_long"]


@pytest.mark.parametrize("text", [
    "The ship [SEG] is white.", "the ship [seg] is white", "<p> ship </p>", "ends with </p",
    "a <b>bold</b> claim", "a stray < sign", "SEG] left over", "[ SEG ] spaced",
])
def test_sanitize_fragment_refuses_tag_like_text(text):
    assert sanitize_fragment(text) is None


def test_sanitize_fragment_collapses_whitespace_and_keeps_words():
    assert sanitize_fragment("  A white\n ship,\tdocked.  ") == "A white ship, docked."
    assert sanitize_fragment("") == ""


@pytest.mark.parametrize("text, leaked", [
    ("marked with number 3", True), ("mark 3", True), ("#3", True), ("# 12", True),
    ("number 3", True), ("(3)", True), ("[7]", True), ("the marked number 12", True),
    ("small vehicle-3", False), ("a number of ships", False), ("3 ships", False),
    ("marked by white lines", False), ("a 20 m long ship (white)", False),
])
def test_leaked_mark_patterns(text, leaked):
    assert has_leaked_mark(text) is leaked
