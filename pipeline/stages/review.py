"""Review: apply people's decisions (accept, reject, edit) to the composed records.

Decisions live in a JSONL file (`review.decisions`, committed to git: decisions are data), one
`ReviewDecision` per line, written by the review notebook through `decide` and
`append_decisions`. Each decision names its record and `review_hash` of the content the
reviewer saw (caption, phrase texts, object ids, masks), so a decision never lands on a record
that has changed since.

Applying the decisions of one record, in file order (a later line overrides an earlier one):
- a decision whose hash is that of the record as compose made it starts over from that
  record; one whose hash is that of the record as the decisions before it left it (an edited
  caption a reviewer saw in the export) continues from there; any other is STALE: reported,
  not applied;
- accept: the record is exported as is (review "accepted", or "edited" if an earlier edit
  changed it);
- reject: the record is not exported (`review/dropped`, reason "rejected_by_reviewer");
- edit: the new caption is validated like any record (`pipeline.core.validate.validate_record`
  with the compose limits). The text rule (`pipeline.core.text`) applies: what cannot change what
  the reviewer saw is normalised (line breaks and tabs become spaces, Unicode NFC), and an edit
  holding a character that could hide or disguise text (a terminal escape sequence, a control
  character such as NUL, a bidi control such as U+202E, a zero-width or other invisible
  character) is REFUSED ("unsafe_text", naming the character), not cleaned: the record must
  never hold words other than those the reviewer saw. The text inside each `<p> ... </p>` may
  change and becomes the phrase's text; the number and order of the groundings may not,
  since the i-th [SEG] owns the i-th mask. A refused edit (INVALID_EDIT) is reported with its
  reasons, printed as a warning line, and not applied: the record keeps what the decisions
  before it made of it (unreviewed when there are none). The stage does not fail: one typo
  must not stop a build.
- a decision naming no record of the input is reported as UNKNOWN.
Whatever the decisions, a record whose caption or phrase text is not clean text (a record made
before the text rule, or put in the records folder by hand) is not exported
(`review/dropped`, reason "unsafe_text").
Records nobody reviewed go on when `review.export_unreviewed`, else they are held back
(`review/dropped`, reason "unreviewed"). Edit distance is the character Levenshtein distance
between the composed caption and the exported one.

The decisions file is read through `pipeline.core.user_files` (UTF-8, not a folder, each line JSON
nested at most `MAX_JSON_DEPTH` deep); a malformed line (bad JSON, not a decision object, a
field of the wrong type, an unknown decision) is a `BadDecisionsError` naming the file and the
line: the stage stops with exit code 2. A decision's `reviewer` and `note` are normalised by
the text rule; its `record_id` is kept as written (it only has to match a record). Every
warning the stage prints goes through `pipeline.core.errors.printable`: a record id or a caption
with escape sequences or line breaks cannot forge terminal lines.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Optional, Sequence

from pydantic import ValidationError
from rapidfuzz.distance import Levenshtein

from pipeline.core.errors import BadDecisionsError, BadRecordError, printable
from pipeline.core.params import ComposeParams, Params, ReviewParams
from pipeline.core.shards import atomic_path, read_records, write_records
from pipeline.core.stage import Stage
from pipeline.core.text import normalise_text, text_problem
from pipeline.core.user_files import parse_json, read_user_bytes, read_user_text
from pipeline.core.validate import record_text_problem, validate_record
from schemas import DroppedRecord, GroundedRecord, ReviewDecision

STAGE = "review"
REJECTED = "rejected_by_reviewer"
HELD = "unreviewed"
UNSAFE = "unsafe_text"
# a decisions file larger than this is refused before it is read (a decision is ~300 bytes)
MAX_DECISIONS_BYTES = 1 << 30

_PHRASE_RE = re.compile(r"<p>(.*?)</p>", re.DOTALL)
_EXPLAINED = {
    "unbalanced_tags": "every <p> needs its </p>",
    "nested_tags": "a <p> is opened inside another",
    "seg_not_after_tag": "every </p> must be followed by ' [SEG]'",
    "seg_count_mismatch": "the number of [SEG] must stay the number of masks",
    "tag_count_mismatch": "the number of <p> ... </p> must stay the number of masks",
    "phrase_text_mismatch": "a phrase must be written '<p> text </p>' (one space inside each tag)",
    "phrase_moved": "a tag now holds another phrase's text: the i-th [SEG] owns the i-th mask, "
                    "so phrases cannot be reordered",
    "empty_phrase": "a phrase has no text",
    "unsafe_text": "a terminal escape sequence, a control, bidi or invisible character",
    "stray_tag": "tag-like text ('<', '>', '[SEG' pieces) outside the grounding tags",
    "leaked_mark": "the text names a set-of-marks number",
    "bad_mask": "a mask cannot be read",
    "empty_mask": "a mask has no pixel",
    "mask_size_mismatch": "masks of different sizes",
    "no_phrases": "nothing is grounded",
    "too_many_phrases": "more phrases than compose.max_phrases",
    "caption_too_short": "shorter than compose.min_caption_chars",
    "caption_too_long": "longer than compose.max_caption_chars",
}


# ---------------------------------------------------------------------------------------------
# Content hash, edit distance, edits


def review_hash(record: GroundedRecord) -> str:
    """sha256 of what a reviewer judges: the caption and each phrase's text, objects and mask."""
    content = {"caption": record.caption,
               "phrases": [{"text": p.text, "object_ids": list(p.object_ids),
                            "mask": [list(p.mask.size), p.mask.counts]}
                           for p in record.phrases]}
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def edit_distance(a: str, b: str) -> int:
    """Character Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    return Levenshtein.distance(a, b)


def rename_phrase(record: GroundedRecord, index: int, text: str) -> str:
    """The caption with the `index`-th grounded phrase worded `text` (its [SEG] stays)."""
    found = list(_PHRASE_RE.finditer(record.caption))
    if not 0 <= index < len(found):
        raise BadRecordError(f"{record.record_id} has {len(found)} phrases, no phrase {index}")
    m = found[index]
    return f"{record.caption[:m.start()]}<p> {text} </p>{record.caption[m.end():]}"


def edit_problems(record: GroundedRecord, caption: str,
                  compose: ComposeParams) -> tuple[GroundedRecord, list[str]]:
    """The record with `caption` (phrase texts taken from its tags) and why it is refused
    (reason codes of `validate_record`, plus "phrase_moved"; empty = a valid edit). The
    caption is first normalised by the text rule without dropping anything (line breaks and
    tabs as spaces, NFC), so an unsafe character stays and is refused ("unsafe_text")."""
    caption = normalise_text(caption, drop_unsafe=False)
    inner = _PHRASE_RE.findall(caption)
    phrases = list(record.phrases)
    moved = False
    if len(inner) == len(phrases):
        old = [p.text for p in phrases]
        texts = [t.strip() for t in inner]
        moved = any(t != old[i] and t in old[:i] + old[i + 1:] for i, t in enumerate(texts))
        phrases = [p.model_copy(update={"text": t}) for p, t in zip(phrases, texts)]
    candidate = record.model_copy(update={"caption": caption, "phrases": phrases})
    size = tuple(record.phrases[0].mask.size) if record.phrases else None
    reasons = validate_record(candidate, compose, size)
    if moved:
        reasons.append("phrase_moved")
    return candidate, reasons


def explain(reasons: Sequence[str], record: GroundedRecord, caption: str) -> str:
    """One line saying why an edit is refused."""
    counts = (f"{caption.count('[SEG]')} [SEG] and {caption.count('<p>')} <p> for "
              f"{len(record.phrases)} masks")

    def why(reason: str) -> str:
        text = _EXPLAINED.get(reason, reason)
        if reason == UNSAFE:
            problem = text_problem(normalise_text(caption, drop_unsafe=False))
            text += f" ({problem})" if problem else ""
        return text

    return f"edit of {record.record_id} refused ({counts}): " + "; ".join(
        f"{r}: {why(r)}" for r in reasons)


def edited(record: GroundedRecord, caption: str, compose: ComposeParams) -> GroundedRecord:
    """`record` with a reviewer's caption, or BadRecordError saying why the edit is refused."""
    candidate, reasons = edit_problems(record, caption, compose)
    if reasons:
        raise BadRecordError(explain(reasons, record, caption))
    return candidate


# ---------------------------------------------------------------------------------------------
# The decisions file


def read_decisions(path: Path) -> list[tuple[int, ReviewDecision]]:
    """(line number, decision) of every non-blank line; a missing file holds no decisions.

    The file is read through `pipeline.core.user_files` (a file, at most `MAX_DECISIONS_BYTES`,
    UTF-8: the line of the first byte that is not is named); lines are separated by newlines
    only (a U+2028 inside a JSON string does not end a line). A malformed line raises
    BadDecisionsError naming the file and the line. `reviewer` and `note` are normalised by
    the text rule."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return []
    data = read_user_bytes(path, "decisions file", max_bytes=MAX_DECISIONS_BYTES,
                           error=BadDecisionsError)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadDecisionsError(f"line {line}: not UTF-8 text (byte {exc.start})", path) from None
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        fields = parse_json(line, f"line {number}", path, error=BadDecisionsError)
        if not isinstance(fields, dict):
            raise BadDecisionsError(f"line {number}: a decision is a JSON object, not "
                                    f"{type(fields).__name__}", path)
        try:
            decision = ReviewDecision.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise BadDecisionsError(f"line {number}: {where + ': ' if where else ''}"
                                    f"{err['msg']}", path) from None
        if (decision.decision == "edit") != (decision.caption is not None):
            raise BadDecisionsError(f"line {number}: a caption goes with 'edit' decisions "
                                    f"only, and every 'edit' needs one", path)
        found.append((number, decision.model_copy(update={
            "reviewer": normalise_text(decision.reviewer), "note": normalise_text(decision.note)})))
    return found


def load_decisions(path: Path) -> list[ReviewDecision]:
    """Every decision in the file, in file order."""
    return [d for _, d in read_decisions(path)]


def append_decisions(path: Path, decisions: Iterable[ReviewDecision]) -> Path:
    """Add decisions at the end of the file: the whole file is rewritten to a temporary name
    and renamed, so a crash never leaves a half line."""
    path = Path(path)
    old = (read_user_text(path, "decisions file", max_bytes=MAX_DECISIONS_BYTES,
                          error=BadDecisionsError) if path.exists() else "")
    if old and not old.endswith("\n"):
        old += "\n"
    new = "".join(d.model_dump_json(exclude_none=True) + "\n" for d in decisions)
    with atomic_path(path) as tmp:
        tmp.write_text(old + new, encoding="utf-8")
    return path


def decide(record: GroundedRecord, decision: str, caption: Optional[str] = None,
           reviewer: str = "", note: str = "",
           compose: Optional[ComposeParams] = None) -> ReviewDecision:
    """A decision on `record` as shown. An edit is checked now (BadRecordError), so the
    reviewer hears of a bad edit at once rather than at the next build; the caption written is
    the normalised one (line breaks and tabs as spaces, NFC: `edit_problems`)."""
    if decision == "edit":
        if caption is None:
            raise BadRecordError(f"edit of {record.record_id} needs a caption")
        caption = edited(record, caption, compose or ComposeParams()).caption
    elif caption is not None:
        raise BadRecordError(f"a caption goes with 'edit' only, not {decision!r}")
    return ReviewDecision(record_id=record.record_id, content_sha256=review_hash(record),
                          decision=decision, caption=caption, reviewer=reviewer, note=note)


def pending(records: Iterable[GroundedRecord],
            decisions: Iterable[ReviewDecision]) -> list[GroundedRecord]:
    """Records still to review: unreviewed, and no decision on their content as it is now."""
    done = {(d.record_id, d.content_sha256) for d in decisions}
    return [r for r in records
            if r.review == "unreviewed" and (r.record_id, review_hash(r)) not in done]


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class Reviewed:
    """One record after its decisions, and what became of each decision."""

    record: GroundedRecord
    status: str  # unreviewed | accepted | edited | rejected
    details: list[dict] = field(default_factory=list)
    rejected_by: Optional[ReviewDecision] = None


def review_record(record: GroundedRecord, decisions: Sequence[tuple[int, ReviewDecision]],
                  compose: ComposeParams) -> Reviewed:
    """Apply one record's decisions in file order (see the module docstring)."""
    original_hash = review_hash(record)
    state, status, rejected_by = record, "unreviewed", None
    details = []
    for line, d in decisions:
        detail = {"line": line, "record_id": d.record_id, "decision": d.decision,
                  "reviewer": d.reviewer}
        details.append(detail)
        if d.content_sha256 == review_hash(state):
            base = state
        elif d.content_sha256 == original_hash:
            base = record
        else:
            detail.update(outcome="stale", message=f"record {d.record_id} changed since it "
                          f"was reviewed (line {line}); decision not applied")
            continue
        if d.decision == "edit":
            candidate, reasons = edit_problems(base, d.caption, compose)
            if reasons:
                detail.update(outcome="invalid_edit", reasons=reasons,
                              message=explain(reasons, base, d.caption))
                continue
            detail["edit_distance"] = edit_distance(base.caption, candidate.caption)
            base = candidate
        state = base
        rejected_by = d if d.decision == "reject" else None
        if rejected_by is not None:
            status = "rejected"
        else:
            status = "accepted" if review_hash(state) == original_hash else "edited"
        detail["outcome"] = "applied"
    if status in ("accepted", "edited"):
        state = state.model_copy(update={"review": status})
    return Reviewed(record=state, status=status, details=details, rejected_by=rejected_by)


def review_shard(name: str, records_dir: Path, staging: Path,
                 decisions: dict[str, list[tuple[int, ReviewDecision]]],
                 review: ReviewParams, compose: ComposeParams) -> dict:
    """Review one records shard; write its kept records and drops; return its counts."""
    records = read_records(records_dir / name, GroundedRecord)
    kept, drops, details = [], [], []
    status: Counter[str] = Counter()
    distances = []
    found = set()
    unsafe = []
    for record in records:
        mine = decisions.get(record.record_id, [])
        if mine:
            found.add(record.record_id)
        done = review_record(record, mine, compose)
        details.extend(done.details)
        status[done.status] += 1
        held = done.status == "unreviewed" and not review.export_unreviewed
        problem = None if done.status == "rejected" or held else record_text_problem(done.record)
        if done.status == "rejected":
            d = done.rejected_by
            drops.append(DroppedRecord(tile_id=record.tile_id, split=record.split, stage=STAGE,
                                       reason=REJECTED, detail=f"{d.reviewer}: {d.note}".strip()))
        elif held:
            drops.append(DroppedRecord(tile_id=record.tile_id, split=record.split, stage=STAGE,
                                       reason=HELD, detail=record.record_id))
        elif problem is not None:  # made before the text rule, or not by compose: not exported
            unsafe.append((record.record_id, problem))
            drops.append(DroppedRecord(tile_id=record.tile_id, split=record.split, stage=STAGE,
                                       reason=UNSAFE, detail=problem))
        else:
            kept.append(done.record)
            if done.status == "edited":
                distances.append(edit_distance(record.caption, done.record.caption))
    write_records(staging / name, kept, GroundedRecord)
    write_records(staging / "dropped" / name, drops, DroppedRecord)
    return {"records": len(records), "kept": len(kept), "status": dict(status),
            "distances": distances, "details": details, "found": sorted(found),
            "unsafe": unsafe}


def run_review(params: Params, records_dir: Path, decisions_path: Path, out_dir: Path,
               scheduler: str | None = None) -> dict:
    """Apply the decisions file to every records shard: `out_dir/<same names>`,
    `out_dir/dropped/<same names>` and report.json (see the module docstring)."""
    records_dir, out_dir, decisions_path = Path(records_dir), Path(out_dir), Path(decisions_path)
    stage = Stage(STAGE, params, scheduler)
    names = [p.name for p in stage.shards(records_dir, "no record shards to review (run "
                                          "compose first)")]
    numbered = read_decisions(decisions_path)
    by_record: dict[str, list[tuple[int, ReviewDecision]]] = {}
    for line, d in numbered:
        by_record.setdefault(d.record_id, []).append((line, d))

    with stage.output(out_dir, inputs=[records_dir, decisions_path],
                      count_key="records_out") as out:
        (out.folder / "dropped").mkdir()
        task = partial(review_shard, records_dir=records_dir, staging=out.folder,
                       decisions=by_record, review=params.review, compose=params.compose)
        counts = stage.map(task, names)
        found = {rid for c in counts for rid in c["found"]}
        details = [d for c in counts for d in c["details"]]
        for line, d in numbered:
            if d.record_id not in found:
                details.append({"line": line, "record_id": d.record_id, "decision": d.decision,
                                "reviewer": d.reviewer, "outcome": "unknown",
                                "message": f"no record {d.record_id} in {records_dir}"})
        details.sort(key=lambda d: d["line"])
        report = out.report = _report(counts, details, params.review, decisions_path)
    for d in details:
        if d["outcome"] != "applied":
            print(printable(f"review: warning: {decisions_path}:{d['line']}: {d['outcome']}: "
                            f"{d['message']}"), file=sys.stderr)
    for record_id, problem in (u for c in counts for u in c["unsafe"]):
        print(printable(f"review: warning: record {record_id} not exported: {UNSAFE}: "
                        f"{problem}"), file=sys.stderr)
    return report


def _report(counts: list[dict], details: list[dict], review: ReviewParams,
            decisions_path: Path) -> dict:
    status: Counter[str] = Counter()
    for c in counts:
        status.update(c["status"])
    distances = [d for c in counts for d in c["distances"]]
    outcomes = Counter(d["outcome"] for d in details)
    reviewers = Counter(d["reviewer"] for d in details if d["outcome"] == "applied")
    unreviewed = status["unreviewed"]
    return {
        "stage": STAGE,
        "shards": len(counts),
        "decisions_file": str(decisions_path),
        "decisions": len(details),
        "records": sum(c["records"] for c in counts),
        "records_out": sum(c["kept"] for c in counts),
        "reviewed": status["accepted"] + status["edited"] + status["rejected"],
        "accepted": status["accepted"],
        "edited": status["edited"],
        "rejected": status["rejected"],
        "applied": outcomes["applied"],
        "stale": outcomes["stale"],
        "invalid_edit": outcomes["invalid_edit"],
        "unknown": outcomes["unknown"],
        "unreviewed_passed": unreviewed if review.export_unreviewed else 0,
        "unreviewed_held": 0 if review.export_unreviewed else unreviewed,
        "edit_distance_total": sum(distances),
        "edit_distance_mean": round(sum(distances) / len(distances), 2) if distances else 0.0,
        "reviewers": dict(sorted(reviewers.items())),
        "details": details,
    }
