"""Output cleaning, in one place: every LMM answer passes here before composition.

`clean_output(text, request, limits)` either returns the text ready to weave into a caption
(with the list of fixes it applied) or refuses it with a reason code. Fixes are made only where
they cannot change what the answer says: the text rule (`pipeline.core.text.normalise_text`:
terminal escape sequences, bidi controls, zero-width and other invisible characters removed,
NFC), markdown, "Sure, here is..." preambles, wrapping quotes, a leaked set-of-marks number
whose removal leaves a sound sentence, sentences beyond what the prompt asked for, a run-away
repetition after complete sentences. Anything else that is wrong is refused, so that the
backend can re-ask and, failing that, record the failure.

Reason codes:
  ok           accepted (possibly with fixes)
  empty        nothing but whitespace or punctuation
  junk         not prose: control characters (outside an escape sequence: NUL, BEL, a lone
               ESC, DEL, C1; a broken decode, not something a model copied from text),
               surrogates, private-use or unassigned code points, mojibake, JSON,
               base64-like runs, mostly non-letters, another script
  tags         markup that could forge or break grounding: "<p>", "</p>", "[SEG]", any
               HTML/XML tag, special tokens, any "<" or ">"
  refusal      "I'm sorry", "I cannot", "As an AI", "unable to" ...
  mark_number  a set-of-marks number that cannot be removed without breaking the sentence
  repetition   a run-away loop with no complete sentence before it, or a text of few words
               repeated over and over
  too_short    fewer words than `min_words`
  too_long     more characters than allowed for the request's kind, after trimming sentences
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Optional

from pipeline.core.text import ESCAPE_SEQUENCE_RE, normalise_text, split_sentences
from schemas import Request

REASONS = ("ok", "empty", "junk", "tags", "refusal", "mark_number", "repetition", "too_short",
           "too_long")


@dataclass(frozen=True)
class CleaningLimits:
    """What a clean answer may look like. The per-kind limits follow the paper's prompts: four
    sentences for the holistic pass, one for an instance or a cluster."""

    max_sentences: Mapping[str, int] = field(
        default_factory=lambda: {"holistic": 4, "instance": 1, "cluster": 1})
    max_chars: Mapping[str, int] = field(
        default_factory=lambda: {"holistic": 1000, "instance": 300, "cluster": 300})
    min_words: int = 3
    # A word or n-gram (n <= max_ngram) repeated this many times in a row is a run-away loop.
    max_repeats: int = 3
    max_ngram: int = 8
    # A text of at least `diversity_min_words` words with fewer distinct words than this share
    # of its length is a loop too, even when the copies are not adjacent.
    min_distinct_share: float = 0.25
    diversity_min_words: int = 40
    # Share of letters among non-space characters, and of ASCII letters among letters.
    min_letter_share: float = 0.6
    min_ascii_letter_share: float = 0.9
    # Longest run of non-space characters a word may be (longer = base64, URLs, hashes).
    max_token_chars: int = 40

    @classmethod
    def from_params(cls, section: object) -> "CleaningLimits":
        """Limits from a params section that has `max_sentences`, `max_chars`, `min_words`."""
        return cls(max_sentences=dict(section.max_sentences),  # type: ignore[attr-defined]
                   max_chars=dict(section.max_chars),  # type: ignore[attr-defined]
                   min_words=section.min_words)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Cleaned:
    """The outcome of cleaning one answer: text (None when refused), reason, fixes applied."""

    text: Optional[str]
    reason: str = "ok"
    fixes: tuple[str, ...] = ()
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.text is not None


# --------------------------------------------------------------------------------------------
# Patterns

_NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUM = r"(?:\d{1,3}|" + "|".join(_NUMBER_WORDS) + r")\b"
_DIGITS = r"\d{1,3}\b"
_MARK_NOUN = r"(?:\bmark(?:er)?\b|\bnumber\b|\blabel\b|\btag\b|\bno\.|#)"
_MARK_VERB = r"\b(?:marked|marking|labell?ed|labell?ing|numbered|tagged)\b"
# A number followed by a noun ("marked with 2 stripes") counts something: not a mark, so the
# phrase is left alone (and the final check refuses the answer rather than guess).
_NOT_A_COUNT = (r"(?!\s+(?!(?:is|are|was|were|has|have|and|or|at|in|on|near|next|with|which|"
                r"that|appears|sits|stands|lies|looks|seems|parked|located|positioned)\b)"
                r"[a-z])")
# What follows a marking verb: "number 3", "the mark #3", "a 3", "3".
_MARK_TARGET = (r"(?:(?:the|a|an)\s+)?(?:" + _MARK_NOUN + r"\s*#?\s*" + _NUM + r"|#?\s*" +
                _DIGITS + r")" + _NOT_A_COUNT)

# Phrases that name a set-of-marks number, most specific first; each is removed whole.
_LEAK_PHRASES = [
    # "(3)", "[3]", "(marked 3)", "(number 3)", "(#3)", "(labeled as mark 3)"
    re.compile(r"\s*[(\[]\s*(?:" + _MARK_VERB + r"\s+(?:(?:with|as|by)\s+)?)?(?:the\s+)?"
               r"(?:" + _MARK_NOUN + r"\s*)?#?\s*" + _NUM + r"\s*[)\]]", re.I),
    # ", marked as number 3," / ", which is labeled 3,"
    re.compile(r",\s*(?:(?:which|that)\s+(?:is|was|has\s+been)\s+|is\s+)?" + _MARK_VERB +
               r"\s+(?:(?:with|as|by)\s+)?" + _MARK_TARGET + r"\s*,", re.I),
    # "that is marked with the number 3", "marked 3", "labelled as #3"
    re.compile(r"\s*(?:\b(?:which|that)\s+(?:is|was|has\s+been)\s+)?" + _MARK_VERB +
               r"\s+(?:(?:with|as|by)\s+)?" + _MARK_TARGET, re.I),
    # "with the number 3", "bearing mark 3"
    re.compile(r"\s*\b(?:with|bearing|having|showing|carrying)\s+(?:the\s+|a\s+)?" + _MARK_NOUN +
               r"\s*#?\s*" + _NUM + _NOT_A_COUNT, re.I),
    # "the mark 3", "label 3", "marker #3", "number 3", "No. 3", "#3"
    re.compile(r"\s*(?:\bthe\s+)?\b(?:mark(?:er)?|label|tag)\s*(?:(?:number|no\.)\s*)?#?\s*" +
               _NUM + _NOT_A_COUNT, re.I),
    re.compile(r"\s*(?:\bthe\s+)?(?:\bnumber|\bno\.)\s*#?\s*" + _NUM + _NOT_A_COUNT, re.I),
    re.compile(r"\s*#\s*\d+", re.I),
]
# Last line of defence: any digit still standing next to a mark word.
_LEAK_LEFT = re.compile(
    r"(?:\b(?:mark\w*|label\w*|number\w*|tag\w*|no\.)|#)\W{0,3}(?:(?:with|as|by|the|a)\s+)*"
    r"(?:(?:number|no\.)\s*)?#?\s*\d|[(\[]\s*\d{1,3}\s*[)\]]", re.I)

_TAGS = re.compile(
    r"[<>]"                                   # any markup: <p>, </p>, <br/>, <|im_end|>, &lt;
    r"|\[\s*/?\s*seg\b|\bseg\s*\]"            # pieces of the grounding token
    r"|\[\s*/?\s*[A-Z][A-Z_]{1,}\s*\]"        # special tokens: [INST], [/INST], [IMG]
    r"|&(?:lt|gt|amp|nbsp|#\d+);", re.I)

_REFUSALS = re.compile(
    r"\bI(?:'m|\u2019m|\s+am)\s+(?:sorry|afraid|unable|not\s+able)\b"
    r"|\bI\s+(?:cannot|can't|can\u2019t|can\s+not|could\s+not|couldn't|won't|will\s+not)\b"
    r"|\bas\s+an?\s+(?:AI|artificial\s+intelligence|(?:large\s+)?language\s+model|assistant)\b"
    r"|\bunable\s+to\b"
    r"|\bI\s+apologi[sz]e\b|^\s*(?:sorry|apologies)\b"
    r"|\bI\s+do(?:n't|\u2019t|\s+not)\s+(?:see|have|know)\b"
    r"|\bthere\s+(?:is|are)\s+no\s+(?:visible\s+)?(?:marks?|marked|numbered|numbers?)\b"
    r"|\bnot\s+(?:possible|able)\s+to\s+(?:see|determine|identify|describe|tell)\b",
    re.I)

_PREAMBLES = [
    re.compile(r"^(?:sure|certainly|of\s+course|absolutely|okay|ok|alright)\s*[,!.:\u2014-]+\s*",
               re.I),
    # "Here is a short description of the vehicle:" / "Here's the answer -"
    re.compile(r"^here(?:'s|\u2019s|\s+is|\s+are)\b[^:\n]{0,120}?(?::|\s[\u2014-]\s)\s*", re.I),
    # "Here is a description of the image." followed by the description itself
    re.compile(r"^here(?:'s|\u2019s|\s+is|\s+are)\s[^.!?\n]{0,120}?\b(?:description|sentence|"
               r"sentences|summary|answer|caption|attributes|details)\b[^.!?\n]{0,80}[.!]\s+",
               re.I),
    re.compile(r"^(?:description|answer|caption|output|response|attributes|result)\s*:\s*", re.I),
]
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "\u2018": "\u2019", "\u00ab": "\u00bb"}

_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.S)
_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25e6]|\d{1,2}[.)])\s+")
_RULE = re.compile(r"^\s*(?:[-*_]\s*){3,}$")
_EMPHASIS = [re.compile(r"\*\*(.+?)\*\*"), re.compile(r"__(.+?)__"),
             re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"),
             re.compile(r"`([^`]+)`")]

_MOJIBAKE = re.compile(
    r"\ufffd|\u00c3[\u0080-\u00bf\u00a0-\u00bf]|\u00e2\u20ac|\u00c2[\u0080-\u00bf]")
_LONG_TOKEN_CHARS = r"[A-Za-z0-9+/=_\-]"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_TERMINAL = ".!?"
# Words a sound sentence does not end on; and a determiner directly before a verb means the
# subject was cut out.
_DANGLING_END = {"a", "an", "the", "is", "are", "was", "were", "be", "with", "by", "of", "at",
                 "as", "to", "and", "or", "its", "this", "that", "which", "from", "in", "on",
                 "for", "marked", "labeled", "labelled", "numbered", "tagged"}
_DETERMINER_VERB = re.compile(
    r"\b(?:a|an|the|this|that|its)\s+(?:is|are|was|were|has|have|shows|appears|seems|looks|"
    r"can|sits|stands|lies|of|with|by|at|in|on|and|or)\b"
    r"|\b(?:at|in|on|of|with|by|near|beside|to|from|as)\s+(?:is|are|was|were|has|have)\b", re.I)


# --------------------------------------------------------------------------------------------
# The cleaning passes, in order; each returns the new text (or a refusal) and the fixes made.

class _Refused(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def clean_output(text: str, request: Request,
                 limits: CleaningLimits = CleaningLimits()) -> Cleaned:
    """The answer to `request` ready for composition, or the reason it cannot be used."""
    fixes: list[str] = []
    try:
        if not isinstance(text, str) or not text.strip():
            raise _Refused("empty")
        _refuse_junk_characters(text)
        text = _normalise(text, fixes)
        text = _strip_markdown(text, fixes)
        if _TAGS.search(text):
            raise _Refused("tags", _TAGS.search(text).group())
        text = _strip_preambles(text, fixes)
        if not re.search(r"[^\W_]", text):
            raise _Refused("empty")
        if _REFUSALS.search(text):
            raise _Refused("refusal", _REFUSALS.search(text).group().strip())
        _refuse_non_prose(text, limits)
        sentences = _remove_mark_numbers(split_sentences(text), fixes)
        text = _cut_repetition(" ".join(sentences), limits, fixes)
        sentences = _limit_sentences(split_sentences(text), request.kind, limits, fixes)
        text = " ".join(sentences)
        if text and text[-1] not in _TERMINAL:
            text += "."
            fixes.append("added_period")
        if len(_WORD.findall(text)) < limits.min_words:
            raise _Refused("too_short", f"{len(_WORD.findall(text))} words")
        max_chars = limits.max_chars.get(request.kind)
        if max_chars is not None and len(text) > max_chars:
            raise _Refused("too_long", f"{len(text)} > {max_chars} chars")
        # Invariants, whatever the passes above did.
        if _TAGS.search(text):
            raise _Refused("tags", _TAGS.search(text).group())
        if _LEAK_LEFT.search(text):
            raise _Refused("mark_number", _LEAK_LEFT.search(text).group())
    except _Refused as refused:
        return Cleaned(None, refused.reason, tuple(fixes), refused.detail)
    return Cleaned(text, "ok", tuple(fixes))


def _normalise(text: str, fixes: list[str]) -> str:
    """The text rule, lines kept for the markdown pass: escape sequences, bidi controls,
    zero-width and other invisible characters removed (fix "unsafe_characters"), NFC."""
    normalised = normalise_text(text, one_line=False)
    if normalised != normalise_text(text, one_line=False, drop_unsafe=False):
        fixes.append("unsafe_characters")
    if not normalised.strip():
        raise _Refused("empty")
    return normalised


def _refuse_junk_characters(text: str) -> None:
    # an escape sequence is removed by the text rule; a control character outside one is junk
    for ch in ESCAPE_SEQUENCE_RE.sub("", text):
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in "\n\t\r") or cat in ("Cs", "Co", "Cn"):
            raise _Refused("junk", f"control character U+{ord(ch):04X}")
    if _MOJIBAKE.search(text):
        raise _Refused("junk", "mojibake")
    stripped = text.strip().strip("`").strip()
    if stripped[:1] in "{[" and stripped[-1:] in "}]":
        try:
            json.loads(stripped)
            raise _Refused("junk", "JSON")
        except ValueError:
            pass
    if "{" in text or "}" in text:
        raise _Refused("junk", "JSON-like braces")


def _strip_markdown(text: str, fixes: list[str]) -> str:
    """Code fences, headers, bullets, rules and emphasis off; lines joined into one paragraph."""
    if "```" in text:
        text = _FENCE.sub(lambda m: m.group(1), text).replace("```", "")
        fixes.append("code_fence")
    lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    headers = [i for i, ln in enumerate(lines) if _HEADER.match(ln)]
    if headers:
        fixes.append("markdown_header")
        if len(headers) == len(lines):
            lines = [_HEADER.match(ln).group(1) for ln in lines]
        else:
            lines = [ln for i, ln in enumerate(lines) if i not in headers]
    kept = []
    for ln in lines:
        if _RULE.match(ln):
            fixes.append("markdown_rule")
            continue
        if _BULLET.match(ln):
            ln = _BULLET.sub("", ln, count=1)
            fixes.append("markdown_bullet")
        for pattern in _EMPHASIS:
            ln, n = pattern.subn(r"\1", ln)
            if n:
                fixes.append("markdown_emphasis")
        kept.append(" ".join(ln.split()))
    if len(kept) > 1:
        # One item per line: each becomes a sentence of the paragraph.
        kept = [ln if ln[-1] in _TERMINAL + ":;," else ln + "." for ln in kept]
        fixes.append("joined_lines")
    return " ".join(kept).strip()


def _strip_preambles(text: str, fixes: list[str]) -> str:
    """"Sure, here is..." openings and quotes around the whole answer off (until none is left)."""
    while True:
        before = text
        for pattern in _PREAMBLES:
            stripped = pattern.sub("", text, count=1).strip()
            if stripped != text and stripped:
                text = stripped[:1].upper() + stripped[1:]  # "Sure, the car" -> "The car"
                fixes.append("preamble")
        text = _strip_quotes(text, fixes)
        if text == before:
            return text


def _strip_quotes(text: str, fixes: list[str]) -> str:
    if len(text) < 2 or text[0] not in _QUOTES:
        return text
    close = _QUOTES[text[0]]
    body, tail = text, ""
    if text[-1] in _TERMINAL and text[-2] == close:  # "A red car".
        body, tail = text[:-1], text[-1]
    if len(body) < 2 or body[-1] != close:
        return text
    inner = body[1:-1]
    if text[0] == '"' and '"' in inner:
        return text
    fixes.append("quotes")
    inner = inner.strip()
    return inner + tail if tail and inner[-1:] not in _TERMINAL else inner


def _refuse_non_prose(text: str, limits: CleaningLimits) -> None:
    long_token = re.search(r"\S{%d,}" % (limits.max_token_chars + 1), text)
    if long_token or re.search(_LONG_TOKEN_CHARS + "{%d,}" % 32, text):
        raise _Refused("junk", "base64-like or over-long token")
    visible = [ch for ch in text if not ch.isspace()]
    letters = [ch for ch in visible if ch.isalpha()]
    if not visible or len(letters) < limits.min_letter_share * len(visible):
        raise _Refused("junk", "mostly non-letters")
    ascii_letters = sum(ch.isascii() for ch in letters)
    if ascii_letters < limits.min_ascii_letter_share * len(letters):
        raise _Refused("junk", "not English text")


def _remove_mark_numbers(sentences: list[str], fixes: list[str]) -> list[str]:
    """Remove phrases naming a set-of-marks number; refuse when what is left is not a sound
    sentence (its subject or object was the number)."""
    kept = []
    for sentence in sentences:
        cleaned = sentence
        for pattern in _LEAK_PHRASES:
            cleaned = pattern.sub("", cleaned)
        if cleaned == sentence:
            kept.append(sentence)
            continue
        fixes.append("mark_number_removed")
        if re.match(r"\s*[:\u2014-]", cleaned):
            # "Mark 3: a white car ..." -> "A white car ..."
            cleaned = re.sub(r"^\s*[:\u2014-]\s*", "", cleaned)
            cleaned = cleaned[:1].upper() + cleaned[1:]
        cleaned = _tidy(cleaned)
        if not re.search(r"[^\W\d_]", cleaned):
            continue  # the sentence was nothing but the mark ("Mark 3.")
        problem = _unsound(cleaned)
        if problem:
            raise _Refused("mark_number", f"{problem}: {sentence!r}")
        kept.append(cleaned)
    return kept


def _tidy(sentence: str) -> str:
    """Spaces and punctuation put right after a phrase was cut out."""
    s = re.sub(r"\s+", " ", sentence)
    s = re.sub(r"\(\s*\)|\[\s*\]", "", s)
    s = re.sub(r"\s+([,.;:!?])", r"\1", s)
    s = re.sub(r",\s*([,.;:!?])", r"\1", s)
    s = re.sub(r"^[\s,.;:!?\-\u2014]+", "", s)
    return s.strip()


def _unsound(sentence: str) -> str:
    """Why a sentence that lost a phrase no longer reads, or '' when it still does."""
    words = _WORD.findall(sentence)
    if len(words) < 2:
        return "too few words left"
    if sentence[0].islower():
        return "subject removed"
    if words[-1].lower() in _DANGLING_END:
        return "dangling end"
    if _DETERMINER_VERB.search(sentence):
        return "determiner or preposition without its noun"
    if re.search(r"\b(?:with|by|as|of)\s*[,.;:!?]", sentence, re.I):
        return "preposition without its object"
    return ""


def _cut_repetition(text: str, limits: CleaningLimits, fixes: list[str]) -> str:
    """Drop exact duplicate sentences; cut a run-away loop after the last complete sentence
    before it, or refuse."""
    seen, unique = set(), []
    for sentence in split_sentences(text):
        key = " ".join(_WORD.findall(sentence.lower()))
        if key in seen:
            fixes.append("duplicate_sentence")
            continue
        seen.add(key)
        unique.append(sentence)
    text = " ".join(unique)
    words = [(m.group().lower(), m.start()) for m in _WORD.finditer(text)]
    tokens = [w for w, _ in words]
    cut = _first_loop(tokens, limits)
    if cut is not None:
        head = text[:words[cut][1]]
        end = max(head.rfind(c) for c in _TERMINAL)
        head = head[:end + 1].strip() if end >= 0 else ""
        if not _WORD.search(head):
            raise _Refused("repetition", f"loop from word {cut}")
        fixes.append("cut_repetition")
        text = head
        tokens = [m.group().lower() for m in _WORD.finditer(text)]
    if (len(tokens) >= limits.diversity_min_words
            and len(set(tokens)) < limits.min_distinct_share * len(tokens)):
        raise _Refused("repetition", f"{len(set(tokens))} distinct words of {len(tokens)}")
    return text


def _first_loop(tokens: list[str], limits: CleaningLimits) -> Optional[int]:
    """Index of the first word of the second copy of the earliest n-gram repeated
    `max_repeats` times in a row, or None."""
    best: Optional[int] = None
    for n in range(1, limits.max_ngram + 1):
        for i in range(len(tokens) - n * limits.max_repeats + 1):
            if best is not None and i + n >= best:
                break
            gram = tokens[i:i + n]
            if all(tokens[i + k * n:i + (k + 1) * n] == gram for k in range(1, limits.max_repeats)):
                best = i + n if best is None else min(best, i + n)
                break
    return best


def _limit_sentences(sentences: list[str], kind: str, limits: CleaningLimits,
                     fixes: list[str]) -> list[str]:
    most = limits.max_sentences.get(kind)
    if most is not None and len(sentences) > most:
        fixes.append("extra_sentences")
        return sentences[:most]
    return sentences


def drop_unfinished_sentence(text: str) -> str:
    """Text cut off by the token limit, without its unfinished last sentence (kept whole when it
    is the only one)."""
    stripped = text.rstrip()
    if not stripped or stripped[-1] in _TERMINAL:
        return text
    end = max(stripped.rfind(c + " ") for c in _TERMINAL)
    return stripped[:end + 1] if end >= 0 else text
