"""notebooks/qa.ipynb runs top to bottom (nbclient, the python3 kernel of this interpreter) on
a real small build, and the decisions it writes are the ones it made, applied by the review
stage at the next build.

The build: the real iSAID val image P0003 (four devkit tiles) through prepare, plan, the three
template annotate passes, compose, review (no decisions yet) and export, in tmp_path. The queue
puts records with failed claims (the qa stage's claims file) first.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from pipeline.core.params import Params
from pipeline.formats.review_view import failed_first, load_claims, load_records
from pipeline.geometry.claims import Claim, RecordClaims, claim_rows, write_claims
from pipeline.stages.annotate import run_annotate
from pipeline.stages.compose.stage import run_compose
from pipeline.stages.export import run_export
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare
from pipeline.stages.review import load_decisions, review_hash, run_review

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "qa.ipynb"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("review-nb")
    images = root / "isaid" / "val" / "images"
    images.mkdir(parents=True)
    for path in (REPO / "data" / "isaid" / "val" / "images").glob("P0003*.png"):
        shutil.copy(path, images / path.name)
    params = Params.model_validate({"data": {"root": str(root / "isaid"), "splits": ["val"]},
                                    "annotate": {"cache": {"enabled": False}}})
    out = root / "build"
    run_prepare(params, out / "tiles")
    run_plan(params, out / "tiles", out / "plan")
    for kind in ("holistic", "instance", "cluster"):
        run_annotate(params, kind, out / "tiles", out / "plan", out / "responses" / kind)
    run_compose(params, out / "tiles", out / "plan", out / "responses", out / "records")
    decisions = root / "reviews" / "decisions.jsonl"

    def review_and_export() -> dict:
        report = run_review(params, out / "records", decisions, out / "reviewed")
        run_export(params, out / "tiles", out / "reviewed", out / "export")
        return report

    review_and_export()
    return {"out": out, "decisions": decisions, "review_and_export": review_and_export}


def _kernel_name(tmp_path: Path, monkeypatch) -> str:
    """python3 of this interpreter; a kernelspec in a tmp JUPYTER_PATH if none is installed."""
    if "python3" not in KernelSpecManager().find_kernel_specs():
        spec = tmp_path / "jupyter" / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _execute(nb, tmp_path: Path, monkeypatch, build: dict, mode: str,
             claims: Path | None = None, decisions: Path | None = None):
    monkeypatch.setenv("GEOPIXELD_EXPORT", str(build["out"] / "export" / "parquet"))
    # no claims file unless given: the queue keeps the export's order
    monkeypatch.setenv("GEOPIXELD_CLAIMS", str(claims or tmp_path / "no-claims.parquet"))
    monkeypatch.setenv("GEOPIXELD_DECISIONS", str(decisions or build["decisions"]))
    monkeypatch.setenv("GEOPIXELD_REVIEWER", "nb-test")
    monkeypatch.setenv("GEOPIXELD_REVIEW_MODE", mode)
    client = NotebookClient(nb, timeout=120, kernel_name=_kernel_name(tmp_path, monkeypatch),
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return nb


def _outputs(nb, mime: str) -> list:
    return [o["data"][mime] for cell in nb.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if mime in o.get("data", {})]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_notebook_queue_puts_records_with_failed_claims_first(build, tmp_path, monkeypatch):
    records = load_records(build["out"] / "export" / "parquet")
    assert len(records) >= 3 and all(r.review == "unreviewed" for r in records)
    late = records[-1]  # last in export order, the only one with a failed claim
    claims = tmp_path / "claims.parquet"
    wrong = Claim(phrase=0, type="colour", words="purple <b>", expected="grey", verdict="disagree")
    rows = [row for r in records for row in claim_rows(RecordClaims(
        record_id=r.record_id, tile_id=r.tile_id, split=r.split,
        phrase_texts=tuple(p.text for p in r.phrases),
        claims=(Claim(phrase=0, type="category", words="x", expected="x", verdict="agree"),)
        + ((wrong,) if r is late else ())))]
    write_claims(claims, rows)
    assert failed_first(records, load_claims(claims))[0] is late

    nb = _execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path, monkeypatch, build, "calls",
                  claims=claims, decisions=tmp_path / "decisions.jsonl")
    html = _outputs(nb, "text/html")
    headings = [h for h in html if h.startswith("<h4>")]
    assert [r.record_id for r in records if r.record_id in headings[0]] == [late.record_id]
    assert [next(r.record_id for r in records if r.record_id in h) for h in headings] == \
        [late.record_id] + [r.record_id for r in records[:2]]
    shown_claims = [h for h in html if "contradicted by the masks" in h]
    assert len(shown_claims) == 1 and "purple &lt;b&gt;" in shown_claims[0]
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert f"{len(records)} to review (1 with failed claims)" in printed


def test_notebook_plain_calls_write_decisions_the_review_stage_applies(build, tmp_path,
                                                                      monkeypatch):
    shown = load_records(build["out"] / "export" / "parquet")[:3]
    nb = _execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path, monkeypatch, build, "calls")

    # Each shown tile: its overlay image and its caption with coloured phrases.
    assert len(_outputs(nb, "image/png")) == 3
    html = "\n".join(_outputs(nb, "text/html"))
    assert all(r.record_id in html for r in shown) and html.count("<sub>0</sub>") == 3

    decisions = load_decisions(build["decisions"])
    assert [(d.record_id, d.content_sha256, d.decision, d.reviewer) for d in decisions] == [
        (r.record_id, review_hash(r), kind, "nb-test")
        for r, kind in zip(shown, ["accept", "edit", "reject"])]
    edited_text = "reviewed " + shown[1].phrases[0].text
    assert f"<p> {edited_text} </p> [SEG]" in decisions[1].caption

    report = build["review_and_export"]()
    assert (report["accepted"], report["edited"], report["rejected"], report["stale"],
            report["invalid_edit"], report["unreviewed_passed"]) == (1, 1, 1, 0, 0, 1)
    rows = {row["record_id"]: row for row in pq.read_table(
        build["out"] / "export" / "parquet", columns=["record_id", "review", "phrases"]).to_pylist()}
    assert shown[2].record_id not in rows
    assert rows[shown[0].record_id]["review"] == "accepted"
    assert rows[shown[1].record_id]["review"] == "edited"
    assert rows[shown[1].record_id]["phrases"][0] == edited_text


def test_notebook_buttons_write_decisions_and_refuse_bad_edits(build, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # What a reviewer's clicks do: a bad edit (a [SEG] removed), then accept, on the first tile.
    nb.cells.append(nbformat.v4.new_code_cell(
        "rid, card = next(iter(BUTTONS.items()))\n"
        "card['text'].value = card['text'].value.replace(' [SEG]', '', 1)\n"
        "card['edit'].click()\n"
        "print('REFUSED' if 'seg_count_mismatch' in card['status'].value else 'WRITTEN')\n"
        "card['accept'].click()\n"
        "print('CLICKED', rid)"))
    before = load_decisions(build["decisions"])
    nb = _execute(nb, tmp_path, monkeypatch, build, "widgets")

    assert _outputs(nb, "application/vnd.jupyter.widget-view+json")  # the cards rendered
    printed = nb.cells[-1].outputs[0]["text"].split()
    assert printed[0] == "REFUSED" and printed[1] == "CLICKED"
    after = load_decisions(build["decisions"])
    assert after[:len(before)] == before and len(after) == len(before) + 1
    shown = {r.record_id: r for r in load_records(build["out"] / "export" / "parquet")}
    new = after[-1]
    assert (new.record_id, new.decision, new.reviewer) == (printed[2], "accept", "nb-test")
    assert new.content_sha256 == review_hash(shown[printed[2]])
