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
through `html.escape` (`pipeline.formats.html_report`), CSV cells through `csv_cell` (`pipeline.stages.qa`
writes every CSV file of the repository through `write_plot`).
"""

from __future__ import annotations

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
