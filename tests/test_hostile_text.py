"""Hostile text: what reaches people (the terminal, the HTML report, a spreadsheet) and files
(the export, the plot CSVs).

The text rule lives in `pipeline.core.text`. In: a reviewer's edit holding an escape sequence, a
control, bidi or invisible character is refused (INVALID_EDIT, the record passes unchanged),
line breaks and tabs in it become spaces; a model's answer is cleaned of escape sequences,
bidi and invisible characters; validation refuses any record whose text is not clean. Out:
every line the CLI prints goes through `printable` (and no rich markup), CSV cells that a
spreadsheet would read as formulas get a leading `'`, HTML is escaped.

CLI cases run the real `geopixeld` in a copy of a built user folder (the `workspace` fixture).
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hostile import assert_refused, cli_env, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from annotators.cleaning import clean_output
from pipeline.core.errors import BadRecordError
from pipeline.core.params import ComposeParams
from pipeline.core.shards import list_shards, read_records, write_records
from pipeline.core.text import csv_cell, is_clean_text, is_unsafe_char, normalise_text, text_problem
from pipeline.core.validate import record_text_problem, sanitize_fragment, validate_record
from pipeline.formats.html_report import _index_script, caption_html
from pipeline.stages.qa import PhraseFacts, RecordFacts, write_plot
from pipeline.stages.review import decide, edit_problems, read_decisions, review_hash
from schemas import GroundedRecord, Request

DECISIONS = Path("reviews/decisions.jsonl")
# every character the rule must keep out of a record (beside the escape sequences)
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\U000e0041\ufe0f\u034f\u3164"
CONTROLS = "\x00\x07\x08\x1b\x7f\x9b\x80\x9f"


# ---------------------------------------------------------------------------------------------
# Helpers


def _records(ws: Path, folder: str = "build/records") -> list[GroundedRecord]:
    return [r for f in list_shards(ws / folder) for r in read_records(f, GroundedRecord)]


def _line(record: GroundedRecord, decision: str, caption: str | None = None, **extra) -> str:
    body = {"record_id": record.record_id, "content_sha256": review_hash(record),
            "decision": decision, **extra}
    if caption is not None:
        body["caption"] = caption
    return json.dumps(body, ensure_ascii=True)


def _write_decisions(ws: Path, *lines: str) -> None:
    (ws / DECISIONS).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _exported_text(ws: Path) -> str:
    """Every text the export holds: its JSON and text files, and the Parquet rows without the
    image bytes, as one string (JSON escapes decoded, so a character is itself)."""
    parts = []
    for path in sorted((ws / "build" / "export").rglob("*")):
        if path.suffix in (".json", ".txt"):
            text = path.read_text(encoding="utf-8")
            parts.append(text)
            if path.suffix == ".json":
                parts.append(json.dumps(json.loads(text), ensure_ascii=False))
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            rows = table.drop_columns([c for c in table.column_names if c == "image"]).to_pylist()
            parts.append(json.dumps(rows, ensure_ascii=False, default=str))
    assert parts
    return "\n".join(parts)


def _review_and_export(ws: Path) -> tuple[str, dict]:
    """`geopixeld review` then `geopixeld export`: (review's stderr, review's report)."""
    review = run_cli(["review"], ws)
    assert review.returncode == 0, review.stderr[-3000:]
    export = run_cli(["export"], ws)
    assert export.returncode == 0, export.stderr[-3000:]
    report = json.loads((ws / "build" / "reviewed" / "report.json").read_text())
    return review.stderr, report


def _assert_terminal_safe(text: str) -> None:
    """No escape, bidi, invisible or other control character reaches the terminal."""
    for ch in text:
        assert ch == "\n" or not is_unsafe_char(ch), (hex(ord(ch)), text[-2000:])


# ---------------------------------------------------------------------------------------------
# The text rule, class by class


@pytest.mark.parametrize("raw, one_line, multi_line", [
    # terminal escape sequences go whole: CSI (colour, clear screen), OSC 8 link, OSC title with
    # ST, C1 CSI, DCS, a two-character ESC sequence, an unterminated OSC (its ESC ] goes)
    ("a \x1b[31mred\x1b[0m car", "a red car", "a red car"),
    ("\x1b[2J\x1b[Hcleared", "cleared", "cleared"),
    ("see \x1b]8;;http://evil.example/\x07this\x1b]8;;\x07 link", "see this link",
     "see this link"),
    ("\x1b]0;title\x1b\\ship", "ship", "ship"),
    ("\x9b1mbold", "bold", "bold"),
    ("\x1bP+q\x1b\\x", "x", "x"),
    ("reset\x1bc now", "reset now", "reset now"),
    ("\x1b]0;never ended", "0;never ended", "0;never ended"),
    # other controls are removed: NUL, BEL, BS, DEL, a C1 control, a lone ESC
    ("a\x00b\x07c\x08d\x7fe\x80f\x1b", "abcdef", "abcdef"),
    # line breaks and tabs: spaces in a one-line field, newlines kept otherwise
    ("a\rb", "a b", "a\nb"),
    ("a\r\nb", "a b", "a\nb"),
    ("a\nb\x0bc\x0cd\x85e\u2028f\u2029g", "a b c d e f g", "a\nb\nc\nd\ne\nf\ng"),
    ("a\tb", "a b", "a b"),
    # bidi controls and invisible characters are removed
    ("the car is \u202eder\u202c.", "the car is der.", "the car is der."),
    ("ship" + BIDI + "-1", "ship-1", "ship-1"),
    ("zero\u200bwidth" + INVISIBLE + "!", "zerowidth!", "zerowidth!"),
    # NFC: a decomposed e + acute becomes one character
    ("cafe\u0301", "caf\u00e9", "caf\u00e9"),
    # and a removed character cannot leave a sequence that is not NFC
    ("cafe\u200b\u0301", "caf\u00e9", "caf\u00e9"),
])
def test_normalise_text_by_class(raw, one_line, multi_line):
    assert normalise_text(raw) == one_line
    assert normalise_text(raw, one_line=False) == multi_line
    assert text_problem(raw) is not None and not is_clean_text(raw)
    assert is_clean_text(one_line) and is_clean_text(multi_line, one_line=False)


@pytest.mark.parametrize("text", [
    "The <p> ship-1 </p> [SEG] is moored beside the pier.", "caf\u00e9 na\u00efve \u00e5",
    "", "a  b", "\u201cquoted\u201d \u2014 dash", "emoji \U0001f6a2 ship"])
def test_clean_text_is_left_as_it_is(text):
    assert normalise_text(text) is text or normalise_text(text) == text
    assert text_problem(text) is None


@pytest.mark.parametrize("raw, problem", [
    ("ab\x1b[2J", "escape sequence U+001B at character 2"),
    ("x\u202ey", "bidi control U+202E at character 1"),
    ("x\u200by", "invisible character U+200B at character 1"),
    ("x\x00y", "control character U+0000 at character 1"),
    ("x\ry", "line break U+000D at character 1"),
    ("x\ty", "tab U+0009 at character 1"),
    ("\ue000", "private-use character U+E000 at character 0"),
    ("e\u0301", "not in Unicode NFC"),
])
def test_text_problem_names_the_first_offending_character(raw, problem):
    assert text_problem(raw) == problem


def test_drop_unsafe_false_normalises_only_what_cannot_change_what_is_seen():
    assert normalise_text("a\r\nb\tc\u202e", drop_unsafe=False) == "a b c\u202e"
    assert normalise_text("e\u0301\x00", drop_unsafe=False) == "\u00e9\x00"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=60),
       st.booleans())
def test_rule_is_idempotent_and_clean_means_unchanged(text, one_line):
    once = normalise_text(text, one_line=one_line)
    assert normalise_text(once, one_line=one_line) == once
    assert is_clean_text(once, one_line=one_line)
    assert (text_problem(text, one_line=one_line) is None) == (once == text)
    assert not any(is_unsafe_char(ch) and ch != "\n" for ch in once)
    if one_line:
        assert "\n" not in once and "\r" not in once and "\t" not in once


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\x1b", "[", "]", "\x07", "\\", "3", "1", "m", ";",
                                 "\x9b", "\x9d", "\x9c", "P", "\n", "\r"]), max_size=30))
def test_escape_fragments_never_survive(parts):
    text = normalise_text("".join(parts))
    assert "\x1b" not in text and "\x9b" not in text and "\x9d" not in text
    assert "\x07" not in text and "\r" not in text and "\n" not in text


# ---------------------------------------------------------------------------------------------
# Model answers are cleaned (function level: the template backend never writes such text)


def _request(kind: str = "instance") -> Request:
    return Request(request_id="r", tile_id="P0003_0_800_0_800", kind=kind, prompt="p",
                   prompt_version="v1", image_sha256="0" * 64, object_ids=[7],
                   mark_number=3 if kind == "instance" else None)


@pytest.mark.parametrize("answer", [
    "A \x1b[1;31mwhite\x1b[0m car parked beside the road.",
    "A white car parked \u202ebeside\u202c the road.",
    "A white\u200b car parked\u2066 beside the road.\ufeff",
    "\x1b]8;;http://evil.example\x07A white car parked beside the road.\x1b]8;;\x07",
])
def test_model_answer_with_escapes_bidi_or_invisible_is_cleaned(answer):
    cleaned = clean_output(answer, _request())
    assert cleaned.ok, cleaned
    assert cleaned.text == "A white car parked beside the road."
    assert "unsafe_characters" in cleaned.fixes
    assert is_clean_text(cleaned.text)
    assert sanitize_fragment(answer) == normalise_text(answer)  # compose's gate cleans too
    assert is_clean_text(sanitize_fragment(answer))


def test_model_answer_with_a_bare_control_character_stays_junk():
    # a NUL or BEL outside an escape sequence is a broken decode: refused, the backend re-asks
    for answer in ("A white\x00 car parked beside the road.", "A car\x07 is white and parked."):
        cleaned = clean_output(answer, _request())
        assert (cleaned.ok, cleaned.reason) == (False, "junk"), cleaned


def test_clean_model_answers_are_unchanged():
    answer = "A white sedan parked beside a road."
    assert clean_output(answer, _request()).fixes == ()
    assert sanitize_fragment(answer) == answer


# ---------------------------------------------------------------------------------------------
# Validation refuses any record whose text is not clean (function level)


def _a_record(built_workspace: Path) -> GroundedRecord:
    return _records(built_workspace)[0]


@pytest.mark.parametrize("bad", ["\x1b[2J", "\u202e", "\u200b", "\x00", "\r", "\n", "\t",
                                 "e\u0301"])
def test_validation_refuses_unclean_caption_and_phrase_text(built_workspace, bad):
    record = _a_record(built_workspace)
    size = tuple(record.phrases[0].mask.size)
    assert validate_record(record, ComposeParams(), size) == []
    assert record_text_problem(record) is None
    at = record.caption.index(" is ") + 1
    caption = record.caption[:at] + bad + record.caption[at:]
    bad_caption = record.model_copy(update={"caption": caption})
    assert "unsafe_text" in validate_record(bad_caption, ComposeParams(), size)
    assert record_text_problem(bad_caption).startswith("caption: ")
    phrase = record.phrases[0]
    text = phrase.text[:2] + bad + phrase.text[2:]
    bad_phrase = record.model_copy(update={
        "caption": record.caption.replace(f"<p> {phrase.text} </p>", f"<p> {text} </p>", 1),
        "phrases": [phrase.model_copy(update={"text": text})] + list(record.phrases[1:])})
    assert "unsafe_text" in validate_record(bad_phrase, ComposeParams(), size)
    assert record_text_problem(bad_phrase).startswith(("caption: ", "phrase 0: "))


def test_decide_refuses_unsafe_edits_and_normalises_line_breaks(built_workspace):
    record = _a_record(built_workspace)
    with pytest.raises(BadRecordError, match=r"unsafe_text: .*bidi control U\+202E"):
        decide(record, "edit", caption=record.caption.replace(" is ", " is \u202e", 1))
    with pytest.raises(BadRecordError, match=r"unsafe_text: .*escape sequence U\+001B"):
        decide(record, "edit", caption=record.caption.replace(" is ", " is \x1b[2J", 1))
    d = decide(record, "edit", caption=record.caption.replace(" is ", " is\r\nreally ", 1))
    assert d.caption == record.caption.replace(" is ", " is really ", 1)
    _, reasons = edit_problems(record, record.caption.replace(" is ", " is\treally ", 1),
                               ComposeParams())
    assert reasons == []


# ---------------------------------------------------------------------------------------------
# A reviewer's edit, through the CLI: refused (unsafe), or normalised (line breaks)


def _edit_at(caption: str, insert: str) -> str:
    """`insert` at the start of the caption's second sentence (outside every phrase)."""
    at = caption.index(". ") + len(". ")
    return caption[:at] + insert + caption[at:]


# two classes through review + export in the default run; the invisible and NUL cases take the
# same path (slow), and every class of the rule is checked in-process above
@pytest.mark.parametrize("insert, code", [
    ("\x1b[31mreally \x1b[0m", "U+001B"),
    ("\u202eyllaer ", "U+202E"),
    pytest.param("really\u200b ", "U+200B", marks=pytest.mark.slow),
    pytest.param("really\x00 ", "U+0000", marks=pytest.mark.slow),
])
def test_edit_with_unsafe_characters_is_refused_and_never_exported(workspace, insert, code):
    record = _records(workspace)[0]
    _write_decisions(workspace, _line(record, "edit", _edit_at(record.caption, insert),
                                      reviewer="ann"))
    stderr, report = _review_and_export(workspace)
    assert (report["invalid_edit"], report["edited"], report["applied"]) == (1, 0, 0)
    detail = report["details"][0]
    assert detail["outcome"] == "invalid_edit" and detail["reasons"] == ["unsafe_text"]
    warnings = [ln for ln in stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "invalid_edit" in warnings[0] and code in warnings[0]
    _assert_terminal_safe(stderr)
    exported = _exported_text(workspace)
    for ch in insert:
        if is_unsafe_char(ch):
            assert ch not in exported, hex(ord(ch))
    # the record passed unchanged
    rows = pq.read_table(workspace / "build" / "export" / "parquet",
                         columns=["record_id", "caption", "review"]).to_pylist()
    assert {r["record_id"]: (r["caption"], r["review"]) for r in rows}[record.record_id] == \
        (record.caption, "unreviewed")


def test_edit_with_a_bare_cr_is_normalised_to_a_space(workspace):
    record = _records(workspace)[0]
    _write_decisions(workspace, _line(record, "edit", _edit_at(record.caption, "really\r"),
                                      reviewer="ann"))
    stderr, report = _review_and_export(workspace)
    assert (report["edited"], report["invalid_edit"]) == (1, 0)
    assert "warning" not in stderr
    assert "\r" not in _exported_text(workspace)
    rows = pq.read_table(workspace / "build" / "export" / "parquet",
                         columns=["record_id", "caption", "review"]).to_pylist()
    assert {r["record_id"]: (r["caption"], r["review"]) for r in rows}[record.record_id] == \
        (_edit_at(record.caption, "really "), "edited")


def test_edit_with_bidi_inside_a_phrase_is_refused(workspace):
    record = _records(workspace)[0]
    phrase = record.phrases[0].text
    caption = record.caption.replace(f"<p> {phrase} </p>", f"<p> {phrase}\u202e </p>", 1)
    _write_decisions(workspace, _line(record, "edit", caption))
    stderr, report = _review_and_export(workspace)
    assert report["invalid_edit"] == 1 and "U+202E" in stderr
    assert "\u202e" not in _exported_text(workspace)


def test_record_with_unsafe_text_in_the_records_folder_is_not_exported(workspace):
    """A record compose did not make (or made before the rule): review drops it."""
    shard = list_shards(workspace / "build" / "records")[0]
    records = read_records(shard, GroundedRecord)
    bad = records[0].model_copy(update={"caption": _edit_at(records[0].caption, "\u202e")})
    write_records(shard, [bad] + records[1:], GroundedRecord)
    stderr, report = _review_and_export(workspace)
    assert report["records_out"] == len(records) - 1
    assert "\u202e" not in _exported_text(workspace)
    assert "not exported: unsafe_text: caption: bidi control U+202E" in stderr
    _assert_terminal_safe(stderr)


# ---------------------------------------------------------------------------------------------
# User text printed to the terminal cannot forge lines or restyle it


def test_record_id_with_clear_screen_escape_prints_escaped(workspace):
    record = _records(workspace)[0]
    forged = record.model_copy(update={"record_id": "\x1b[2J\x1b[31mP0003\x1b]8;;http://x\x07"})
    _write_decisions(workspace, _line(forged, "accept"))
    stderr, report = _review_and_export(workspace)
    assert report["unknown"] == 1
    _assert_terminal_safe(stderr)
    warning = [ln for ln in stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "\\x1b[2J\\x1b[31mP0003\\x1b]8;;http://x\\x07" in warning[0]


def test_record_id_with_newlines_cannot_forge_a_line(workspace):
    record = _records(workspace)[0]
    forged_id = "x\nreview -> build/reviewed  all good\r\nexport: ok\u2028done"
    forged = record.model_copy(update={"record_id": forged_id})
    _write_decisions(workspace, _line(forged, "accept"))
    proc = run_cli(["review"], workspace)
    assert proc.returncode == 0, proc.stderr
    _assert_terminal_safe(proc.stderr)
    lines = proc.stderr.splitlines()
    assert len([ln for ln in lines if "warning" in ln]) == 1
    assert not any(ln.startswith(("review -> build/reviewed  all", "export: ok", "done"))
                   for ln in lines), lines
    # the stage's own line and the warning: nothing else
    assert len(lines) == 2, lines


def test_rich_markup_in_user_text_prints_literally(workspace):
    record = _records(workspace)[0]
    marked = "[red]x[/red][link=http://evil.example]y[/link]:smile:"
    _write_decisions(workspace, _line(record.model_copy(update={"record_id": marked}), "accept"))
    decisions = workspace / "reviews" / "[bold]d[blink]:smile:.jsonl"  # no "/": a file name
    decisions.write_text((workspace / DECISIONS).read_text())
    out = "build/rev[red]x[blink]\x1b[2J"
    env = cli_env(COLUMNS="500", TERM="xterm-256color", FORCE_COLOR="1")
    proc = run_cli(["review", "--decisions", decisions.relative_to(workspace), "--out", out],
                   workspace, env)
    assert proc.returncode == 0, proc.stderr
    assert marked in proc.stderr  # the warning names the record id as written
    done = [ln for ln in proc.stderr.splitlines() if "->" in ln]
    assert len(done) == 1 and "build/rev[red]x[blink]\\x1b[2J" in done[0], done
    # the only escape sequences are the stage name's bold, none from user text
    assert proc.stderr.replace("\x1b[1m", "").replace("\x1b[0m", "").count("\x1b") == 0
    summary = run_cli(["summary", "build"], workspace, env)
    assert summary.returncode == 0, summary.stderr
    assert "[bold]d[blink]:smile:.jsonl" in summary.stdout
    assert "rev[red]x[blink]\\x1b[2J" in summary.stdout
    assert "\U0001f604" not in summary.stdout  # no :smile: emoji substitution either


# ---------------------------------------------------------------------------------------------
# The decisions file: one line naming the file (and the line), exit 2, nothing changed


@pytest.mark.parametrize("content, needles", [
    (b'{"record_id": "a", "content_sha256": "b", "decision": "accept"}\n\xff\xfe bad\n',
     ["line 2: not UTF-8 text"]),
    (b'{"record_id": "a", "content_sha256": "b", "decision": "accept"}\n{not json\n',
     ["line 2 is not valid JSON"]),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", ["line 1 nests deeper than 64 levels"]),
    (b'{"record_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     ["line 1 nests deeper than 64 levels"]),
    (b'{"record_id": 17, "content_sha256": "b", "decision": "accept"}\n',
     ["line 1: record_id: Input should be a valid string"]),
    (b'\n\n{"record_id": "a", "content_sha256": "b", "decision": "approve"}\n',
     ["line 3: decision: Input should be 'accept', 'reject' or 'edit'"]),
    (b'["record_id", "a"]\n', ["line 1: a decision is a JSON object, not list"]),
    (b'{"record_id": "a", "content_sha256": "b", "decision": "accept", "x": NaN}\n',
     ["line 1 is not valid JSON"]),
])
def test_malformed_decisions_file_is_one_line_exit_2(workspace, content, needles):
    (workspace / DECISIONS).write_bytes(content)
    line = assert_refused(["review"], workspace, "bad decisions", str(DECISIONS), *needles)
    _assert_terminal_safe(line)


def test_decisions_file_that_is_a_folder_is_refused(workspace):
    (workspace / DECISIONS).unlink()
    (workspace / DECISIONS).mkdir()
    assert_refused(["review"], workspace, "bad decisions", str(DECISIONS),
                   "decisions file is a folder")


def test_hostile_field_names_in_a_decisions_line_print_escaped(workspace):
    (workspace / DECISIONS).write_text(
        '{"record_id": "a", "content_sha256": "b", "decision": "accept", '
        '"\\u001b[2Jx\\nforged: line": 1}\n')
    line = assert_refused(["review"], workspace, "bad decisions", "line 1",
                          "Extra inputs are not permitted")
    assert "\\x1b[2Jx forged: line" in line


def test_reviewer_and_note_are_normalised(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"record_id": "a", "content_sha256": "b", "decision": "reject",
                                "reviewer": "ann\x1b[31m\u202e", "note": "bad\r\ntile\u200b"}))
    (_, d), = read_decisions(path)
    assert (d.reviewer, d.note) == ("ann", "bad tile")


# ---------------------------------------------------------------------------------------------
# Files people open: plot CSVs (spreadsheets) and the HTML report


FORMULA = '=HYPERLINK("http://x","y")'
HTML_CATEGORY = '"><img src=x onerror=alert(1)></script><script>alert(2)</script>'


def test_formula_and_markup_categories_are_neutralised_in_csv_and_html(workspace):
    """A source category named like a formula or like HTML reaches the plot CSV as text and the
    report escaped (records edited in place, then the real `geopixeld qa`)."""
    names = [FORMULA, "@SUM(1+1)", "+cmd|' /C calc'!A0", "-2+3", HTML_CATEGORY]
    for shard in list_shards(workspace / "build" / "reviewed"):
        records = read_records(shard, GroundedRecord)
        changed = []
        for i, record in enumerate(records):
            phrases = [p.model_copy(update={"category": names[(i + j) % len(names)]})
                       for j, p in enumerate(record.phrases)]
            changed.append(record.model_copy(update={"phrases": phrases}))
        write_records(shard, changed, GroundedRecord)
    proc = run_cli(["qa", "--metrics", "build/metrics/qa.json", "--plots", "build/metrics/plots",
                    "--report", "build/qa"], workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workspace / "build/metrics/plots/phrases_per_category.csv", newline="",
              encoding="utf-8") as f:
        cells = {row["category"] for row in csv.DictReader(f)}
    assert cells == {"'" + n for n in names[:-1]} | {HTML_CATEGORY}
    raw = (workspace / "build/metrics/plots/phrases_per_category.csv").read_text()
    assert not any(ln.startswith(("=", "+", "-", "@")) for ln in raw.splitlines())
    for page in (workspace / "build" / "qa").glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "<script>alert" not in text and "<img src=x" not in text, page
    index = (workspace / "build" / "qa" / "index.html").read_text(encoding="utf-8")
    # jinja2's autoescape (markupsafe) writes a double quote as &#34;
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in index and "=HYPERLINK(&#34;" in index
    script = (workspace / "build" / "qa" / "data" / "index.js").read_text(encoding="utf-8")
    assert "</script" not in script and "<\\/script>" in script


@pytest.mark.parametrize("value, cell", [
    (FORMULA, "'" + FORMULA), ("@x", "'@x"), ("+1+1", "'+1+1"), ("-1+1", "'-1+1"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("\uff1d1+1", "'\uff1d1+1"),
    ("-3", "-3"), ("+1.5e3", "+1.5e3"), (-3, -3), (2.5, 2.5), ("ship", "ship"), ("", ""),
])
def test_csv_cell(value, cell):
    assert csv_cell(value) == cell


def test_write_plot_keeps_numbers_and_plain_text_byte_identical(tmp_path):
    rows = [{"category": "ship", "phrases": 3}, {"category": "small vehicle", "phrases": -1}]
    write_plot(tmp_path / "p.csv", rows, ("category", "phrases"))
    assert (tmp_path / "p.csv").read_bytes() == \
        b"category,phrases\nship,3\nsmall vehicle,-1\n"


def test_caption_html_and_index_script_escape_everything():
    phrase = PhraseFacts(text="ship", kind="instance", category='x"><script>', objects=1,
                         area_share=0.1)
    html_text = caption_html("A <p> ship </p> [SEG] & </script> \"q\"", [phrase])
    assert "<script>" not in html_text and "</script>" not in html_text
    assert "&#34;&gt;&lt;script&gt;" in html_text and "&amp;" in html_text
    record = RecordFacts(record_id="r", tile_id="t", split="val", backend="b</script>",
                         model="m", review="unreviewed", caption="c",
                         phrases=(phrase,), image="tiles/t.jpg")
    script = _index_script([record], {"t": 0}, 1)
    assert "</script" not in script and "<!--" not in script
    blob = script[len("window.QA_INDEX = "):-2]
    assert json.loads(blob)["facets"]["backend"] == ["b</script>"]


def test_printable_output_of_unicode_text_is_unchanged_for_clean_text():
    # clean, non-ASCII text prints as itself (only unsafe characters are escaped)
    from pipeline.core.errors import printable
    text = "caf\u00e9 \u201cship\u201d \u2014 \U0001f6a2"
    assert printable(text) == text
    assert unicodedata.is_normalized("NFC", text)
    assert os.linesep not in printable("a\nb\r\nc")
