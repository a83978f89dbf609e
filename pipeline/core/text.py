"""The text rule: what a caption, a phrase or a reviewer's note may hold, and how text leaves.

In: `normalise_text` is the one function every text passes before it is stored in a record
(annotator answers in `annotators.cleaning` and `pipeline.core.validate.sanitize_fragment`, a
reviewer's edit and the decisions file in `pipeline.stages.review`). It

  1. removes terminal escape sequences whole: CSI (ESC [ ... final, and its C1 form U+009B),
     OSC, DCS, SOS, PM, APC (ESC ] / P / X / ^ / _ ... up to BEL or ST, and their C1 forms)
     and every other ESC sequence (ESC c, ESC ( B, ESC 7 ...);
  2. turns line breaks (CR LF, CR, LF, VT, FF, NEL, U+2028, U+2029) into one space (into a
     newline when `one_line=False`), and a tab into a space;
  3. removes the UNSAFE characters: every other control character (C0, DEL, C1), every format
     character (category Cf: the bidi controls U+202A-U+202E, U+2066-U+2069, U+200E, U+200F,
     U+061C; the zero-width U+200B-U+200D, U+2060, U+FEFF; the soft hyphen U+00AD; the tag
     characters U+E0000-U+E007F ...), lone surrogates, private-use and unassigned code points,
     and the invisible characters outside those categories (`INVISIBLE`: variation selectors,
     the combining grapheme joiner, the Hangul fillers, ...);
  4. NFC-normalises what is left.

With `drop_unsafe=False` steps 1 and 3 are skipped: only the changes that cannot alter what a
reader sees (line breaks and tabs as spaces, NFC) are made, and the unsafe characters stay for
the caller to refuse. Text is CLEAN when `normalise_text` leaves it as it is;
`text_problem` says why a text is not, and `pipeline.core.validate.validate_record` refuses a
record whose caption or phrase text is not clean ("unsafe_text"), so nothing is exported with
such characters whatever path it came by. Clean text is never changed: valid records stay
byte-identical.

Out: text a person or a program reads later is escaped where it leaves, never in the record:
the terminal through `pipeline.core.errors.printable` (and no rich markup on user text), HTML
through autoescaped jinja2 templates (`pipeline.formats.templating`), CSV cells through
`csv_cell` (`pipeline.stages.qa` writes every CSV file of the repository through `write_plot`).

Also here: the one sentence splitter (`split_sentences`) and English words (`plural_noun`,
`number_words`).
"""

from __future__ import annotations

import hashlib
import operator
import re
import unicodedata
from typing import Optional

# Step 1: terminal escape sequences (ECMA-48), removed whole.
_STRING_BODY = r"[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
ESCAPE_SEQUENCE_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"                 # CSI: ESC [ parameters intermediates final
    r"|\x9b[0-?]*[ -/]*[@-~]"                  # CSI, C1 form
    r"|\x1b[\]PX^_]" + _STRING_BODY +          # OSC, DCS, SOS, PM, APC ... BEL or ST
    r"|[\x90\x98\x9d\x9e\x9f]" + _STRING_BODY +  # the same, C1 forms
    r"|\x1b[ -/]*[0-~]")                       # any other: ESC intermediates final

# Step 2: line breaks (CR LF first, so that it is one break) and tabs.
_BREAK_RE = re.compile("\r\n|[\n\r\x0b\x0c\x85\u2028\u2029]")

# Bidi controls: they reorder what is shown, so that a text reads otherwise than it is.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                          "\u200e\u200f\u061c")
# Invisible characters that are not control or format characters (those are all unsafe).
INVISIBLE = frozenset(
    "\u034f"                                   # combining grapheme joiner
    "\u115f\u1160\u3164\uffa0"                 # Hangul fillers (blank letters)
    "\u17b4\u17b5"                             # Khmer inherent vowels
    "\u180b\u180c\u180d\u180f"                 # Mongolian free variation selectors
    + "".join(map(chr, range(0xFE00, 0xFE10)))   # variation selectors 1-16
    + "".join(map(chr, range(0xE0100, 0xE01F0))))  # variation selectors 17-256
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def is_unsafe_char(ch: str) -> bool:
    """Whether `ch` is removed (or refused) by the text rule: a control character other than
    the line breaks and tab, a format, surrogate, private-use or unassigned code point, or an
    invisible character."""
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES or ch in INVISIBLE


def _line_break(one_line: bool) -> str:
    return " " if one_line else "\n"


def normalise_text(text: str, *, one_line: bool = True, drop_unsafe: bool = True) -> str:
    """`text` under the text rule (see the module docstring): escape sequences and unsafe
    characters removed (kept when `drop_unsafe` is False), line breaks and tabs made spaces
    (line breaks made newlines when `one_line` is False), NFC. Idempotent; clean text comes
    back unchanged."""
    if text.isascii() and not _ASCII_CONTROL_RE.search(text):
        return text  # the common case, fast: printable ASCII is clean
    if drop_unsafe:
        text = ESCAPE_SEQUENCE_RE.sub("", text)
    text = _BREAK_RE.sub(_line_break(one_line), text).replace("\t", " ")
    if drop_unsafe:
        text = "".join(ch for ch in text if ch == "\n" or not is_unsafe_char(ch))
    # NFC last: removing a character can leave a sequence that composes.
    return unicodedata.normalize("NFC", text)


def _kind(ch: str) -> str:
    if ch in "\x1b\x9b\x9d\x90\x98\x9e\x9f":
        return "escape sequence"
    if ch == "\t":
        return "tab"
    if _BREAK_RE.fullmatch(ch):
        return "line break"
    if ch in BIDI_CONTROLS:
        return "bidi control"
    category = unicodedata.category(ch)
    if category == "Cc":
        return "control character"
    if category == "Cs":
        return "lone surrogate"
    if category == "Co":
        return "private-use character"
    if category == "Cn":
        return "unassigned code point"
    return "invisible character"


def text_problem(text: str, *, one_line: bool = True) -> Optional[str]:
    """Why `text` is not clean (its first offending character, by kind, code point and
    0-based position; or "not in Unicode NFC"), or None when it is: exactly when
    `normalise_text(text, one_line=one_line)` would change it."""
    if normalise_text(text, one_line=one_line) == text:
        return None
    for i, ch in enumerate(text):
        if (is_unsafe_char(ch) and ch != "\n") or ch == "\t" or (
                _BREAK_RE.fullmatch(ch) and (one_line or ch != "\n")):
            return f"{_kind(ch)} U+{ord(ch):04X} at character {i}"
    return "not in Unicode NFC"


def is_clean_text(text: str, *, one_line: bool = True) -> bool:
    """Whether the text rule leaves `text` unchanged."""
    return text_problem(text, one_line=one_line) is None


# ---------------------------------------------------------------------------------------------
# Out: CSV cells a spreadsheet opens

# OWASP "CSV injection": a cell starting with one of these is read as a formula by spreadsheet
# programs (the full-width forms by some East Asian locales of them).
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a text cell starting with a formula character
    (`FORMULA_LEADS`) gets a leading `'`; numbers, and text that is a plain number ("-3",
    "+1.5e3"), are left alone. Quoting is the csv module's."""
    if isinstance(value, str) and value.startswith(FORMULA_LEADS) \
            and not _NUMBER_RE.fullmatch(value):
        return "'" + value
    return value


# ---------------------------------------------------------------------------------------------
# Sentences: the one splitter (annotator cleaning, QA's sentence counts)

# Words after which a period does not end a sentence ("e.g.", "approx. 20 m"); a single letter
# before a period ("J. Smith", "a. b.") does not end one either.
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "approx", "vs", "mr", "mrs", "dr", "st", "no",
                           "ca", "fig", "m", "km", "ft", "sq"})
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)]*\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph, stripped: a sentence ends at a run of . ! ? (closing quotes
    and brackets kept with it) followed by whitespace or the end of the text, except a period
    after an abbreviation (`ABBREVIATIONS`) or a single letter; so no split inside a decimal
    number ("1.5") either. Empty pieces are dropped.

    Hand-written on purpose: pysbd and syntok (pure-Python segmenters) were measured on the
    bundled answers and the cleaning tests' generated answers: they split markdown remnants and
    runs like "grey.. A" differently, which changed cleaned answers, and were 2.5-4x slower;
    nltk's punkt needs a data download."""
    sentences, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        before = text[start:m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if text[m.start()] == "." and (last in ABBREVIATIONS or len(last) == 1 and last.isalpha()):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return [s for s in sentences if s]


# ---------------------------------------------------------------------------------------------
# English words: plurals and cardinal numbers
#
# Written here, not taken from inflect: inflect gives the same words for our whole vocabulary
# (every iSAID category, every number 0 .. 999,999 with comma=""; tests/test_text_words.py
# checks it against inflect), but importing it costs 1-6 s of CPU per process (typeguard
# instruments its functions at import, jaraco/inflect#212), which every worker and every CLI
# run that writes a caption would pay: on the 2-core dev machine `geopixeld build` of the
# bundled sample took ~42 s with it, ~24 s with that import cost taken out, and
# tests/test_hostile_text.py 76 s against 57 s.

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MAX_NUMBER_WORDS = 999_999


def plural_noun(noun: str) -> str:
    """The plural of a singular English noun phrase: its last word + "es" after s, x, ch or
    sh, else + "s" ('small vehicle' -> 'small vehicles', 'bus' -> 'buses'). Enough for the
    category names captions count (no irregular plurals among them)."""
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def number_words(n: int) -> str:
    """Cardinal number in English words, 0 .. 999,999: 'twenty-one', 'one hundred and five',
    'one thousand two hundred' (British "and", no commas: inflect's
    `number_to_words(n, comma="")`)."""
    n = operator.index(n)  # any integer type (numpy's too); a float is a TypeError
    if not 0 <= n <= MAX_NUMBER_WORDS:
        raise ValueError(f"no words for {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    tail = "" if not rest else (" and " if rest < 100 else " ") + number_words(rest)
    return f"{number_words(thousands)} thousand{tail}"


def stable_choice(key: str, n: int) -> int:
    """A choice among `n` wordings that depends on `key` alone: the first 8 bytes of its
    sha256, modulo n, the same on every run and machine (never Python's `hash()`, which is
    salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n
