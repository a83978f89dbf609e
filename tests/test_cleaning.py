"""Output cleaning: each kind of malformed LMM answer is fixed or refused, with its reason."""

from __future__ import annotations

import random
import re

import pytest

from annotators.cleaning import CleaningLimits, clean_output, drop_unfinished_sentence
from pipeline.core.validate import has_leaked_mark, sanitize_fragment
from schemas import Request


def request(kind: str = "instance", mark: int | None = 3) -> Request:
    return Request(request_id="r", tile_id="P0003_0_800_0_800", kind=kind, prompt="p",
                   prompt_version="v1", image_sha256="0" * 64, object_ids=[7],
                   mark_number=mark if kind == "instance" else None)


# (kind, model output, expected reason, expected text when accepted)
CASES = [
    # leaked set-of-marks numbers: removed where the sentence stays sound, refused otherwise
    ("instance", "The small vehicle marked with number 3 is white.", "ok",
     "The small vehicle is white."),
    ("instance", "The white car, marked as number 3, is parked beside the road.", "ok",
     "The white car is parked beside the road."),
    ("instance", "Vehicle #3 is a white sedan parked by the curb.", "ok",
     "Vehicle is a white sedan parked by the curb."),
    ("instance", "The car (3) is white with a dark windshield.", "ok",
     "The car is white with a dark windshield."),
    ("instance", "The white car labelled 3 is parked beside the road.", "ok",
     "The white car is parked beside the road."),
    ("instance", "A white car with the label 3 parked near a road.", "ok",
     "A white car parked near a road."),
    ("instance", "Mark 3: a white car parked beside the road.", "ok",
     "A white car parked beside the road."),
    ("instance", "The small vehicle marked with number three is white.", "ok",
     "The small vehicle is white."),
    ("instance", "Number 3 is a white car.", "mark_number", None),
    ("instance", "It is marked with number 3.", "mark_number", None),
    ("instance", "The vehicle at number 3 is red.", "mark_number", None),
    ("instance", "The mark 3 shows a white car.", "mark_number", None),
    ("instance", "The plane is marked with 2 stripes.", "mark_number", None),
    # tag-like text is refused whole; markdown is stripped
    ("instance", "<p> hi </p> [SEG] marked with number 3", "tags", None),
    ("instance", "A white car [SEG] parked beside the road.", "tags", None),
    ("instance", "A <b>white</b> car parked beside the road.", "tags", None),
    ("holistic", "A harbour with boats.<|im_end|>", "tags", None),
    ("instance", "[INST] A white car parked beside the road.", "tags", None),
    ("instance", "```\nA white car parked beside the road.\n```", "ok",
     "A white car parked beside the road."),
    ("holistic", "## Description\n- The image shows a port.\n- **Ships** are docked.\n"
                 "- A road runs along the coast", "ok",
     "The image shows a port. Ships are docked. A road runs along the coast."),
    # refusals
    ("instance", "I'm sorry, but I cannot see any marked object in this image.", "refusal", None),
    ("instance", "As an AI language model, I describe: a white car.", "refusal", None),
    ("cluster", "I am unable to identify the vehicles at the left side.", "refusal", None),
    ("instance", "There is no marked object in the image.", "refusal", None),
    # empty
    ("instance", "   \n\t ", "empty", None),
    ("instance", "...", "empty", None),
    # more sentences than asked: the first N kept
    ("holistic", "The image shows a harbour. Boats are docked. A road runs along. Trees line "
                 "it. Cars park nearby. A crane stands.", "ok",
     "The image shows a harbour. Boats are docked. A road runs along. Trees line it."),
    ("cluster", "Numerous small vehicles are parked in rows at the left side. Most are white.",
     "ok", "Numerous small vehicles are parked in rows at the left side."),
    # run-away repetition: cut after complete sentences, or refused
    ("instance", "A white car parked. the the the the the the the the", "ok",
     "A white car parked."),
    ("instance", "The car is very very very very very very very very very very", "repetition",
     None),
    ("instance", "A " + "large white car near the road " * 10, "repetition", None),
    ("holistic", "Cars are parked. Cars are parked. Cars are parked. A road runs north.", "ok",
     "Cars are parked. A road runs north."),
    # over-long and too short
    ("instance", "The small vehicle appears to be a compact white hatchback with a slightly "
                 "sloped rear window, dark tinted side glass, silver alloy wheels, a black "
                 "plastic front bumper, chrome door handles, a narrow roof rack running along "
                 "both edges, visible shadows cast toward the northeast by low afternoon sun, "
                 "and it is parked diagonally across two painted bays near a grassy verge.",
     "too_long", None),
    ("instance", "Car.", "too_short", None),
    # non-text junk
    ('instance', '{"description": "a white car parked beside the road"}', "junk", None),
    ("instance", "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCB0ZXh0", "junk", None),
    ("instance", "The car is Ã©lÃ©gant and white.", "junk", None),
    ("instance", "A white\x00 car parked beside the road.", "junk", None),
    ("instance", "12 34 56 78 90 !!! %% ... 1.5", "junk", None),
    ("instance", "这是一辆白色的汽车，停在路边。", "junk", None),
    # preambles and wrapping quotes
    ("instance", "Sure! Here's a description: \"A grey car parked beside a road.\"", "ok",
     "A grey car parked beside a road."),
    ("instance", "Certainly. Here is a short sentence describing the vehicle. A red truck "
                 "parked by a warehouse.", "ok", "A red truck parked by a warehouse."),
    ("instance", "\u201cA grey car parked beside a road\u201d.", "ok",
     "A grey car parked beside a road."),
    ("instance", "Description: a grey car parked beside a road", "ok",
     "A grey car parked beside a road."),
    ("instance", "Sure, the car is white and parked.", "ok", "The car is white and parked."),
    # clean answers pass untouched
    ("instance", "A white sedan parked beside a road.", "ok",
     "A white sedan parked beside a road."),
    ("instance", "The runway is marked with two white stripes.", "ok",
     "The runway is marked with two white stripes."),
]


@pytest.mark.parametrize("kind,text,reason,expected", CASES)
def test_malformed_output_is_fixed_or_refused(kind, text, reason, expected):
    cleaned = clean_output(text, request(kind))
    assert cleaned.reason == reason, (cleaned, text)
    assert cleaned.text == expected
    assert cleaned.ok == (reason == "ok")


def test_fixes_are_named():
    cleaned = clean_output("Sure! - **The car marked 3** is white.\n- It is new",
                           request("holistic"))
    assert cleaned.ok
    assert {"preamble", "markdown_bullet", "markdown_emphasis", "mark_number_removed",
            "joined_lines"} <= set(cleaned.fixes)
    assert clean_output("A white sedan parked beside a road.", request()).fixes == ()


def test_limits_are_configurable():
    text = "One car is red. Two cars are blue. Three trucks are grey."
    assert clean_output(text, request("instance")).text == "One car is red."
    limits = CleaningLimits(max_sentences={"instance": 2}, max_chars={"instance": 20},
                            min_words=1)
    assert clean_output(text, request("instance"), limits).reason == "too_long"
    limits = CleaningLimits(max_sentences={"instance": 2}, max_chars={"instance": 200})
    assert clean_output(text, request("instance"), limits).text == \
        "One car is red. Two cars are blue."


def test_unfinished_sentence_dropped_after_token_limit():
    assert drop_unfinished_sentence("A red car. A blue tr") == "A red car."
    assert drop_unfinished_sentence("A red car parked") == "A red car parked"
    assert drop_unfinished_sentence("A red car.") == "A red car."


# -- property: whatever goes in, nothing tag-like or mark-like comes out ----------------------

GOOD = ["A white car is parked beside the road.", "The vehicle has a dark roof.",
        "Several trees line the street.", "A grey truck drives north along the highway.",
        "The roof is flat and light grey.", "Boats are moored at the pier."]
BAD = ["<p>", "</p>", "[SEG]", "<p> car </p> [SEG]", "marked with number 3", "marked 3", "#3",
       "mark 3", "number 3", "(3)", "label 3", "No. 3", "<br/>", "<|im_end|>", "[/INST]",
       "I'm sorry,", "As an AI,", "**", "## ", "- ", "```", "\"", "Sure! Here is the answer:",
       "the the the the", "{", "\x07", "marked with the number 12", "[3]", "labelled as #7",
       "numbered 5", "#", "<", ">", "seg]", "[seg", "Number 4", "tagged 9"]
MARK_NEXT_TO_WORD = re.compile(r"(?:mark\w*|number|label\w*|#)\W{0,3}\d", re.I)


def _sample(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.5:
            parts.append(rng.choice(GOOD))
        else:
            good = rng.choice(GOOD).split()
            at = rng.randint(0, len(good))
            parts.append(" ".join(good[:at] + [rng.choice(BAD)] + good[at:]))
    return rng.choice([" ", "\n", "\n- ", ". "]).join(parts)


def test_no_cleaned_output_carries_tags_or_mark_numbers():
    rng = random.Random(0)
    accepted = 0
    for _ in range(3000):
        text = _sample(rng)
        for kind in ("holistic", "instance", "cluster"):
            cleaned = clean_output(text, request(kind))
            if not cleaned.ok:
                assert cleaned.reason != "ok"
                continue
            accepted += 1
            out = cleaned.text
            assert "<" not in out and ">" not in out, (text, out)
            assert "[SEG]" not in out.upper() and "</p>" not in out, (text, out)
            assert not MARK_NEXT_TO_WORD.search(out), (text, out)
            # the same checks compose runs on finished records
            assert not has_leaked_mark(out), (text, out)
            assert sanitize_fragment(out) is not None, (text, out)
            assert out == out.strip() and out[-1] in ".!?"
    assert accepted > 1000  # the property is not vacuous: many samples were accepted
