"""HTML and overlays from libraries: every page and fragment is a jinja2 template with
autoescaping (pipeline/formats/templates/), and every phrase overlay is drawn by supervision's
annotators (the QA report's thumbnails and the review notebook alike)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from pipeline.core.params import QAParams
from pipeline.formats import templating
from pipeline.formats.html_report import PALETTE, caption_html, draw_phrases, render_overlay
from pipeline.geometry import masks
from pipeline.stages.qa import PhraseFacts
from schemas import RLE, GroundedRecord, Phrase, Provenance

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "pipeline" / "formats" / "templates"
SIZE = 64
HOSTILE = '"><script>alert(1)</script>\u202e\'&'


def box(y0: int, y1: int, x0: int, x1: int) -> RLE:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return masks.encode(mask)


def phrase(text: str, rle: RLE, kind: str = "instance") -> Phrase:
    return Phrase(text=text, kind=kind, category="ship", object_ids=[1], mask=rle)


def provenance(backend: str) -> Provenance:
    return Provenance(backend=backend, model="m", prompt_versions=["v1"], params_hash="0" * 8,
                      pipeline_version="0")


@pytest.fixture
def spies(monkeypatch):
    """Calls of supervision's MaskAnnotator and PolygonAnnotator: (annotator, detections)."""
    calls = []
    for cls in (sv.MaskAnnotator, sv.PolygonAnnotator):
        original = cls.annotate

        def spy(self, scene, detections, *args, _original=original, **kwargs):
            calls.append((self, detections))
            return _original(self, scene, detections, *args, **kwargs)

        monkeypatch.setattr(cls, "annotate", spy)
    return calls


def test_report_overlay_is_drawn_by_supervision(spies):
    grey = 100
    picture = np.full((SIZE, SIZE, 3), grey, np.uint8)
    phrases = [phrase("ship-1", box(8, 24, 8, 24)), phrase("ships", box(0, 48, 0, 48), "cluster")]
    params = QAParams(mask_alpha=0.45, contour_thickness=1, jpeg_quality=100,
                      thumbnail_size=SIZE)
    jpeg, _ = render_overlay(picture, phrases, params)
    fill, outline = spies
    assert isinstance(fill[0], sv.MaskAnnotator) and fill[0].opacity == 0.45
    assert isinstance(outline[0], sv.PolygonAnnotator) and outline[0].thickness == 1
    # the colour follows the phrase (class id), the larger mask first
    assert list(fill[1].class_id) == [1, 0]
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB).astype(float)
    # phrase 0's inside blended with its colour (small on top of the large phrase 1)
    assert np.abs(rgb[14:18, 14:18].mean((0, 1))
                  - (0.45 * np.array(PALETTE[0]) + 0.55 * grey)).max() < 6
    # its outline (before JPEG's chroma subsampling blurs a 1 px line): on its edge pixels,
    # in its colour, over phrase 1's fill
    scene = draw_phrases(np.full((SIZE, SIZE, 3), grey, np.uint8),
                         [masks.decode(p.mask) for p in phrases], 0.45, 1)
    edge = np.zeros((SIZE, SIZE), bool)
    edge[8:24, 8:24] = True
    edge[9:23, 9:23] = False
    assert (scene[edge] == PALETTE[0][::-1]).all()  # BGR
    assert (scene[47, 1:47] == PALETTE[1][::-1]).all() and (scene[50:, 50:] == grey).all()
    # no outline asked: no PolygonAnnotator
    spies.clear()
    render_overlay(picture, phrases, QAParams(contour_thickness=0, thumbnail_size=SIZE))
    assert [type(a) for a, _ in spies] == [sv.MaskAnnotator]


def test_an_empty_mask_draws_nothing(spies):
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    empty = masks.encode(np.zeros((SIZE, SIZE), np.uint8))
    render_overlay(picture, [phrase("gone", empty)], QAParams(thumbnail_size=SIZE))
    assert spies == []


def test_notebook_overlay_is_the_same_drawing(spies):
    from pipeline.core.imaging import encode_png
    from pipeline.formats.review_view import overlay

    record = GroundedRecord(
        record_id="r", tile_id="t", split="val", caption="A <p> ship-1 </p> [SEG] .",
        phrases=[phrase("ship-1", box(8, 24, 8, 24))],
        provenance=provenance("template"))
    image = np.asarray(overlay(record, encode_png(np.zeros((SIZE, SIZE, 3), np.uint8)),
                               opacity=1.0))
    assert isinstance(spies[0][0], sv.MaskAnnotator)
    assert (image[10:22, 10:22] == PALETTE[0]).all() and (image[30:, 30:] == 0).all()


def test_templates_escape_hostile_text():
    facts = PhraseFacts(text="ship", kind="instance", category=HOSTILE, objects=1,
                        area_share=0.1)
    out = caption_html(f"{HOSTILE} <p> {HOSTILE} </p> [SEG] {HOSTILE}", [facts])
    assert "<script>" not in out and '"><' not in out and "'&" not in out
    assert out.count("&lt;script&gt;") == 4  # text before, phrase, after, and the title
    assert "\u202e" in out  # escaping is not the text rule: records hold clean text already

    from pipeline.formats.review_view import caption_html as review_caption
    from pipeline.formats.review_view import decision_html, heading_html

    record = GroundedRecord(
        record_id="r", tile_id="t", split="val",
        caption=f"{HOSTILE} <p> {HOSTILE} </p> [SEG] .",
        phrases=[phrase("ship-1", box(8, 24, 8, 24))],
        provenance=provenance(HOSTILE))
    for html in (review_caption(record), heading_html(record),
                 decision_html("edit", refused=HOSTILE), decision_html(HOSTILE, Path("d.jsonl"))):
        assert "<script>" not in html and "&lt;script&gt;" in html, html


def test_the_environment_autoescapes_every_template():
    env = templating.environment()
    assert env.autoescape is True
    names = env.list_templates()
    assert {"report/base.html.j2", "report/tiles.html.j2", "report/index.html.j2",
            "report/drops.html.j2", "review/caption.html.j2"} <= set(names)
    # each file under templates/ is package data (pyproject's glob "templates/*/*.j2")
    assert sorted(names) == sorted(str(p.relative_to(TEMPLATES))
                                   for p in TEMPLATES.glob("*/*.j2"))
    assert '"templates/*/*.j2"' in (REPO / "pyproject.toml").read_text()


_TAG = re.compile(r"<(?:html|body|div|span|mark|table|thead|tbody|tr|td|th|article|section|"
                  r"nav|figure|img|h[1-6]|sub|b|a)[\s>/]", re.I)


def test_no_python_module_builds_html_from_strings():
    """HTML lives in templates: no string in pipeline/ holds an HTML tag (the grounding
    markup `<p> ... </p> [SEG]` of captions is not HTML) and nothing calls html.escape."""
    found = []
    string_tokens = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if re.search(r"\bhtml\.escape\(", source):
            found.append(f"{path}: html.escape")
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in string_tokens and _TAG.search(tok.string):
                found.append(f"{path}:{tok.start[0]}: {tok.string[:60]}")
    assert found == []
