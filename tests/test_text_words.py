"""Words and sentences: plurals and number words checked against inflect, edit distance
(rapidfuzz), and the one sentence splitter that both the annotator cleaning and QA use.

Plurals and number words are written by hand in pipeline/core/text.py (inflect's import costs
seconds of CPU per process); inflect is the reference they must agree with, and the words the
captions have always used are pinned, so that exported captions stay byte-identical."""

from __future__ import annotations

import random

import inflect
import pytest

from pipeline.core.text import number_words, plural_noun, split_sentences
from pipeline.geometry.categories import ISAID_PALETTE, UNKNOWN_CATEGORY, plural, readable

# The plurals our captions have always used for the iSAID categories (and unknown objects).
ISAID_PLURALS = {
    "ship": "ships", "storage_tank": "storage tanks", "baseball_diamond": "baseball diamonds",
    "tennis_court": "tennis courts", "basketball_court": "basketball courts",
    "Ground_Track_Field": "ground track fields", "Bridge": "bridges",
    "Large_Vehicle": "large vehicles", "Small_Vehicle": "small vehicles",
    "Helicopter": "helicopters", "Swimming_pool": "swimming pools",
    "Roundabout": "roundabouts", "Soccer_ball_field": "soccer ball fields", "plane": "planes",
    "Harbor": "harbors", UNKNOWN_CATEGORY: "objects",
}
# DOTA's other categories and common GeoJSON label names (new imagery)
OTHER_CATEGORIES = ["container-crane", "airport", "helipad", "storage-tank", "building", "tree",
                    "road", "house", "bus", "box", "bench"]


@pytest.fixture(scope="module")
def english():
    return inflect.engine()


def test_plurals_are_the_captions_words_and_inflects(english):
    assert set(ISAID_PLURALS) - {UNKNOWN_CATEGORY} == set(ISAID_PALETTE)
    for category, expected in ISAID_PLURALS.items():
        assert plural(category) == expected, category
        assert english.plural_noun(readable(category)) == expected, category
    for name in OTHER_CATEGORIES:
        assert plural_noun(name) == english.plural_noun(name), name


def test_number_words_are_inflects(english):
    def reference(n: int) -> str:
        return english.number_to_words(n, comma="")

    assert [number_words(n) for n in range(1000)] == [reference(n) for n in range(1000)]
    rng = random.Random(0)
    for n in [1000, 1001, 1099, 1100, 1101, 2020, 10_000, 100_000, 100_001, 999_999] + \
            rng.sample(range(1000, 1_000_000), 300):
        assert number_words(n) == reference(n), n
    assert number_words(21) == "twenty-one" and number_words(105) == "one hundred and five"


def test_number_words_refuse_what_has_no_words():
    for bad in (-1, 1_000_000):
        with pytest.raises(ValueError):
            number_words(bad)
    with pytest.raises(TypeError):
        number_words(2.5)


def test_annotators_number_word_is_the_shared_function():
    from annotators.attributes import counted, number_word

    assert number_word(42) == number_words(42) == "forty-two"
    assert counted(3, "Small_Vehicle") == "three small vehicles"
    assert counted(1, "storage_tank") == "one storage tank"


@pytest.mark.parametrize("paragraph, sentences", [
    ("A ship. Two cars!  A road? ", ["A ship.", "Two cars!", "A road?"]),
    ("Boats, e.g. ferries, are docked. A road runs north.",
     ["Boats, e.g. ferries, are docked.", "A road runs north."]),
    ("It is approx. 20 m long. The pier is 1.5 km away.",
     ["It is approx. 20 m long.", "The pier is 1.5 km away."]),
    ('He said "a ship." Then left.', ['He said "a ship."', "Then left."]),
    ("Plot A. Smith owns it. No. 3 is gone.", ["Plot A. Smith owns it.", "No. 3 is gone."]),
    ("no end", ["no end"]),
    ("", []),
])
def test_split_sentences(paragraph, sentences):
    assert split_sentences(paragraph) == sentences


def test_one_sentence_splitter_for_cleaning_and_qa():
    import annotators.cleaning as cleaning
    from pipeline.stages.qa import sentences

    assert cleaning.split_sentences is split_sentences
    assert sentences("A ship, e.g. a ferry. 12 34. Two cars.") == ["A ship, e.g. a ferry.",
                                                                   "Two cars."]


def test_edit_distance_is_levenshtein():
    from pipeline.stages.review import edit_distance

    def levenshtein(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, cb in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
        return row[-1]

    rng = random.Random(1)
    for _ in range(200):
        a = "".join(rng.choice("ab é") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab é") for _ in range(rng.randint(0, 12)))
        assert edit_distance(a, b) == levenshtein(a, b), (a, b)
