"""The QA report: one folder that opens from disk (file://, no server, no network).

    index.html            summary: our figures beside GeoPixelD's, claims checked, charts,
                          browse-by tables, metrics
    page-0001.html ...    `qa.tiles_per_page` tiles each, so 10,000 tiles stay fast; records with
                          failed claims first, each failed claim listed under its caption
    drops.html            every dropped tile with its stage and reason
    tiles/<tile>.jpg      the tile with each phrase's mask filled and outlined in its colour
    data/index.js         every shown tile's page and facets (window.QA_INDEX)
    assets/report.js|css  filters and styling (copied from pipeline/formats/report_assets/)

Overlays are drawn here with supervision (`MaskAnnotator`, `PolygonAnnotator`), once, into JPEG
thumbnails: the pages stay plain HTML and a browser decodes no masks. The review notebook draws
its overlays with the same function (`draw_phrases`). The i-th phrase of a record has the i-th
colour of `PALETTE` in both its overlay and its caption highlight. The pages are jinja2
templates (pipeline/formats/templates/report/, autoescaped: see `pipeline.formats.templating`).
Filters (category, backend, model, review, split, claims) run in report.js over data/index.js,
which is a script, not JSON: Chromium refuses fetch() of local files. The filter lives in the
URL hash (`#category=ship&backend=template`; `#claims=failed` shows only the records whose
caption makes a claim its masks contradict), so paging links keep it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence
from urllib.parse import quote, urlencode

import cv2
import numpy as np

from pipeline.core.errors import BadImageError, BadRecordError
from pipeline.core.params import QAParams
from pipeline.core.shards import atomic_path
from pipeline.formats.templating import macro, render
from pipeline.geometry import masks
from pipeline.geometry.categories import readable
from pipeline.geometry.claims import CLAIM_TYPES, Claim, failed, failed_first
from schemas import Phrase

if TYPE_CHECKING:
    from pipeline.stages.qa import RecordFacts, ShardFacts

IMAGE_FOLDER = "tiles"
ASSETS = Path(__file__).resolve().parent / "report_assets"
ASSET_FILES = ("report.css", "report.js")
FACETS = ("category", "backend", "model", "review", "split", "claims")
CLAIMS_FAILED, CLAIMS_NONE_FAILED = "failed", "none failed"  # values of the claims facet

# 20 colours that stay apart from each other (Sasha Trubetskoy's list), as RGB; phrase i gets
# PALETTE[i % 20].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
# Background of a tile drawn without its image (no tiles given to the stage).
NO_IMAGE_GREY = (96, 96, 96)

_GROUNDING_RE = re.compile(r"<p>\s?(.*?)\s?</p>\s*\[SEG\]", re.DOTALL)


def phrase_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of the index-th phrase of a record (overlay and caption alike)."""
    return PALETTE[index % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# Images and captions


def draw_phrases(scene: np.ndarray, phrase_masks: Sequence[np.ndarray], opacity: float,
                 thickness: int = 0) -> np.ndarray:
    """`scene` (a BGR uint8 array, changed in place and returned) with the i-th mask filled
    at `opacity` and, when `thickness` > 0, outlined in `thickness` px, both in the i-th
    phrase colour (supervision's MaskAnnotator and PolygonAnnotator). Larger masks are drawn
    first, so that small objects stay on top; empty masks draw nothing."""
    import supervision as sv

    drawn = [i for i, m in enumerate(phrase_masks) if m.any()]
    if not drawn:
        return scene
    stack = np.stack([phrase_masks[i].astype(bool, copy=False) for i in drawn])
    order = np.argsort(-stack.sum(axis=(1, 2)), kind="stable")  # largest first
    stack = stack[order]
    detections = sv.Detections(xyxy=sv.mask_to_xyxy(stack).astype(float), mask=stack,
                               class_id=np.asarray(drawn)[order])
    # the colour follows the phrase index (class_id), whatever the drawing order
    palette = sv.ColorPalette([sv.Color(*rgb) for rgb in PALETTE])
    scene = sv.MaskAnnotator(color=palette, opacity=opacity,
                             color_lookup=sv.ColorLookup.CLASS).annotate(scene, detections)
    if thickness > 0:
        scene = sv.PolygonAnnotator(color=palette, thickness=thickness,
                                    color_lookup=sv.ColorLookup.CLASS).annotate(scene, detections)
    return scene


def render_overlay(picture: Optional[np.ndarray], phrases: Sequence[Phrase], params: QAParams,
                   where: str = "") -> tuple[bytes, tuple[int, int]]:
    """JPEG of the tile (RGB array, or grey when None) with each phrase's mask filled and
    outlined in its colour (`draw_phrases`, at the tile's size), its longest side at most
    `params.thumbnail_size`; and its (width, height). The outline is `params.contour_thickness`
    px wide in the thumbnail."""
    if picture is not None:
        height, width = picture.shape[:2]
    elif phrases:
        height, width = phrases[0].mask.size
    else:
        height = width = params.thumbnail_size
    scale = min(1.0, params.thumbnail_size / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    for i, p in enumerate(phrases):
        if list(p.mask.size) != [height, width]:
            raise BadRecordError(f"phrase {i} ({p.text!r}) has a {p.mask.size[0]}x"
                                 f"{p.mask.size[1]} mask on a {height}x{width} tile", where or None)
    if picture is None:
        scene = np.full((height, width, 3), NO_IMAGE_GREY, np.uint8)
    else:
        scene = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    # drawn at the tile's size, then shrunk: an outline `contour_thickness / scale` px wide
    # becomes `contour_thickness` px, and objects smaller than a thumbnail pixel stay visible
    thickness = (max(1, round(params.contour_thickness / scale))
                 if params.contour_thickness else 0)
    scene = draw_phrases(scene, [masks.decode(p.mask) for p in phrases], params.mask_alpha,
                         thickness)
    if size != (width, height):
        scene = cv2.resize(scene, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality])
    if not ok:
        raise BadImageError("JPEG encoding of a report image failed", where or None)
    return buf.tobytes(), size


def caption_parts(caption: str, phrases: Sequence) -> list[dict]:
    """The caption cut into plain text ({"text"}) and grounded phrases ({"phrase", "index",
    "colour", "title"}), for the `caption` macro of report/macros.html.j2."""
    parts, pos = [], 0
    for i, m in enumerate(_GROUNDING_RE.finditer(caption)):
        parts.append({"text": caption[pos:m.start()]})
        title = ""
        if i < len(phrases):
            p = phrases[i]
            count = f"{p.objects} object" + ("" if p.objects == 1 else "s")
            title = f"{p.kind} · {readable(p.category)} · {count}"
        parts.append({"phrase": m.group(1), "index": i,
                      "colour": "{},{},{}".format(*phrase_colour(i)), "title": title})
        pos = m.end()
    parts.append({"text": caption[pos:]})
    return parts


def caption_html(caption: str, phrases: Sequence) -> str:
    """The caption as HTML: the i-th grounded phrase highlighted in the i-th colour, its [SEG]
    kept visible after it; everything else escaped."""
    return str(macro("report/macros.html.j2", "caption")(caption_parts(caption, phrases)))


# ---------------------------------------------------------------------------------------------
# Pages


def page_name(index: int, pages: int) -> str:
    """File name of the index-th (0-based) tile page: page-0001.html, ..."""
    return f"page-{index + 1:0{max(4, len(str(pages)))}d}.html"


def facets_of(record: "RecordFacts") -> dict[str, list[str]]:
    """The values a record is filtered by."""
    return {"category": sorted({p.category for p in record.phrases}),
            "backend": [record.backend], "model": [record.model],
            "review": [record.review], "split": [record.split],
            "claims": [CLAIMS_FAILED if record.failed_claims else CLAIMS_NONE_FAILED]}


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:,.4f}".rstrip("0").rstrip(".")


def _tile(record: "RecordFacts") -> dict:
    width, height = record.image_size
    return {"tile_id": record.tile_id, "src": quote(record.image or ""), "width": width,
            "height": height, "split": record.split, "backend": record.backend,
            "model": record.model, "review": record.review, "phrases": len(record.phrases),
            "objects": sum(p.objects for p in record.phrases), "chars": len(record.caption),
            "caption": caption_parts(record.caption, record.phrases),
            "claims": len(record.claims),
            "failed": failed_claim_items(record.phrases, record.claims)}


def failed_claim_items(phrases: Sequence[Any], claims: Iterable[Claim]) -> list[dict]:
    """A caption's failed claims as its HTML shows them (the report's `failed_claims` macro,
    the notebook's review/claims.html.j2): {"index", "colour" ("r,g,b", the phrase's colour),
    "phrase" (its text), "type", "words", "expected"}."""
    return [{"index": c.phrase, "colour": "{},{},{}".format(*phrase_colour(c.phrase)),
             "phrase": phrases[c.phrase].text if c.phrase < len(phrases) else "",
             "type": c.type, "words": c.words, "expected": c.expected}
            for c in failed(claims)]


def _tile_page(i: int, pages: int, records: Sequence["RecordFacts"]) -> str:
    return render("report/tiles.html.j2", title=f"GeoPixelD QA — page {i + 1}", page=i,
                  scripts=True, pages=[page_name(k, pages) for k in range(pages)],
                  tiles=[_tile(r) for r in records])


# (our key, row label, GeoPixelD's key when it differs from ours)
_COMPARED = (
    ("records", "records (annotated patches)", None), ("phrases", "grounded phrases", None),
    ("instance_phrases", "instance phrases", None),
    ("cluster_phrases", "cluster (group) phrases", None),
    ("instance_share", "instance share of phrases", None), ("objects", "objects grounded", None),
    ("phrases_per_record", "phrases per record", None),
    ("objects_per_record", "objects per record", None),
    ("caption_chars_mean", "mean caption length (chars, tags included)", None),
    ("plain_caption_chars_mean", ("mean plain caption length (chars, tags removed; "
                                  "GeoPixelD: its published mean, tags not stated)"),
     "caption_chars_mean"),
    ("frequent_fivegrams", "word five-grams in more than {share} of captions", None),
    ("fivegrams_top", "most repeated word five-grams (share of captions)", None),
    ("calls_per_record.holistic", "holistic calls per record", None),
    ("calls_per_record.instance", "instance calls per record", None),
    ("calls_per_record.cluster", "cluster calls per record", None),
    ("calls_per_record.total", "LMM calls per record", None),
)


def _dig(tree: dict, dotted: str) -> object:
    node: object = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _figure(value: object) -> str:
    """A comparison cell: a number, or a ranking {text: share} as 'text (share); ...'."""
    if isinstance(value, dict):
        return "; ".join(f"{text} ({_number(share)})" for text, share in value.items()) or "none"
    return _number(value)


def comparison_table(metrics: dict, params: QAParams) -> dict:
    """GeoPixelD's figures, each split followed by ours that `qa.reference_splits` pairs with
    it; our other splits last: {"header", "rows"} for the `table` macro."""
    reference = metrics.get("reference", {}).get("geopixeld", {})
    ours = metrics.get("by_split", {})
    columns = []  # (header, figures, GeoPixelD's)
    for ref in reference:
        columns.append((f"GeoPixelD {ref}", reference[ref], True))
        columns += [(f"ours: {split}", ours[split], False) for split in sorted(ours)
                    if params.reference_splits.get(split) == ref]
    columns += [(f"ours: {split}", ours[split], False) for split in sorted(ours)
                if params.reference_splits.get(split) not in reference]
    rows = [[label.format(share=f"{params.fivegram_share:.0%}")]
            + [_figure(_dig(figures, (ref_key or key) if theirs else key))
               for _, figures, theirs in columns]
            for key, label, ref_key in _COMPARED]
    return {"header": ["figure"] + [c for c, _, _ in columns], "rows": rows}


def _claims_section(metrics: dict, pages: int) -> dict:
    """The claims table of the summary page, and the link to the failed-claims filter."""
    claims = metrics.get("claims", {})
    rows = [[kind, _number(claims.get(kind, {}).get("checked")),
             _number(claims.get(kind, {}).get("agree")),
             _number(claims.get(kind, {}).get("disagree"))]
            for kind in CLAIM_TYPES]
    rows.append(["all", _number(claims.get("checked")), _number(claims.get("agree")),
                 _number(claims.get("disagree"))])
    return {"rows": rows, "records_with_failed": _number(claims.get("records_with_failed")),
            "records_checked": _number(claims.get("records_checked")),
            "href": f"{page_name(0, pages)}#{urlencode({'claims': CLAIMS_FAILED})}"}


def _chart(rows: Sequence[dict], label: str, value: str, title: str) -> dict:
    """A bar chart for the `bars` macro: each row's label, value and bar length (% of the
    largest)."""
    top = max((r[value] for r in rows), default=0) or 1
    return {"title": title,
            "rows": [{"label": str(r[label]), "value": _number(r[value]),
                      "share": f"{100.0 * r[value] / top:.1f}"} for r in rows]}


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _browse(shown: Sequence["RecordFacts"], page_of: dict[str, int],
            pages: int) -> list[tuple[str, list]]:
    """Per facet: each value, its tile count, and a link to its first page, filter set."""
    parts = []
    for facet in FACETS:
        counts: Counter[str] = Counter()
        first: dict[str, int] = {}
        for r in shown:
            for value in facets_of(r)[facet]:
                counts[value] += 1
                first.setdefault(value, page_of[r.tile_id])
        rows = [[{"href": f"{page_name(first[v], pages)}#{urlencode({facet: v})}", "text": v},
                 _number(n)] for v, n in sorted(counts.items())]
        parts.append((facet, rows))
    return parts


def _index_page(metrics: dict, tables: dict[str, list[dict]], shown: Sequence["RecordFacts"],
                page_of: dict[str, int], pages: int, params: QAParams) -> str:
    width = params.caption_bin_chars
    rows = tables.get("caption_length.csv", [])
    first = next((i for i, r in enumerate(rows) if r["records"]), len(rows))
    histogram = [{"bin": f"{r['chars']}–{r['chars'] + width - 1}", "records": r["records"]}
                 for r in rows[first:]]  # from the shortest caption's bin
    dropped = metrics.get("dropped", {})
    charts = [
        _chart(histogram, "bin", "records", "caption length (chars): records"),
        _chart(tables.get("phrases_per_category.csv", []), "category", "phrases",
               "phrases per category"),
        _chart(tables.get("drop_reasons.csv", []), "reason", "tiles", "drop reasons: tiles")]
    drop_rows = [[{"href": f"drops.html#reason-{r}", "text": r}, _number(n)]
                 for r, n in dropped.get("by_reason", {}).items()]
    summary = {"records": _number(metrics.get("records")), "tiles": _number(metrics.get("tiles")),
               "dropped": _number(dropped.get("total")), "shown": _number(len(shown)),
               "per_page": params.tiles_per_page}
    everything = {k: v for k, v in metrics.items() if k != "reference"}
    return render(
        "report/index.html.j2", title="GeoPixelD QA report", page="", scripts=True,
        pages=[page_name(k, pages) for k in range(pages)], summary=summary,
        compare=comparison_table(metrics, params), claims=_claims_section(metrics, pages),
        charts=charts, drop_rows=drop_rows,
        review_rows=[[k, _number(v)] for k, v in _flatten(metrics.get("review", {}))],
        browse=_browse(shown, page_of, pages),
        metric_rows=[[k, _number(v)] for k, v in _flatten(everything)])


def _drops_page(drops: Sequence) -> str:
    by_reason: dict[str, list] = {}
    for d in drops:
        by_reason.setdefault(d.reason, []).append(d)
    sections = [(reason, [[d.tile_id, d.split, d.stage, d.detail] for d in by_reason[reason]])
                for reason in sorted(by_reason)]
    return render("report/drops.html.j2", title="GeoPixelD QA — drops", page="",
                  scripts=False, sections=sections)


def _index_script(shown: Sequence["RecordFacts"], page_of: dict[str, int], pages: int) -> str:
    """data/index.js: facet values, page files, and [tile, page, codes per facet] per tile."""
    values = {f: sorted({v for r in shown for v in facets_of(r)[f]}) for f in FACETS}
    code = {f: {v: i for i, v in enumerate(vs)} for f, vs in values.items()}
    tiles = [[r.tile_id, page_of[r.tile_id],
              [[code[f][v] for v in facets_of(r)[f]] for f in FACETS]] for r in shown]
    payload = {"facets": values, "pages": [page_name(i, pages) for i in range(pages)],
               "tiles": tiles}
    blob = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
    # "</" cannot end a script element that holds this text; JSON allows "<\/".
    return "window.QA_INDEX = " + blob.replace("</", "<\\/") + ";\n"


def write_report(folder: Path, shards: Sequence["ShardFacts"], metrics: dict,
                 tables: dict[str, list[dict]], params: QAParams) -> int:
    """Write the report's pages, index script and assets into `folder` (the tile images are
    already there, written by the shard tasks). Records with failed claims come first
    (`pipeline.geometry.claims.failed_first`). Returns the number of tile pages."""
    folder = Path(folder)
    shown = failed_first([r for s in shards for r in s.records if r.image], lambda r: r.claims)
    per = params.tiles_per_page
    pages = max(1, -(-len(shown) // per))
    page_of = {r.tile_id: i // per for i, r in enumerate(shown)}

    def write(name: str, text: str) -> None:
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")

    (folder / "assets").mkdir(exist_ok=True)
    for asset in ASSET_FILES:
        shutil.copyfile(ASSETS / asset, folder / "assets" / asset)
    write("data/index.js", _index_script(shown, page_of, pages))
    for i in range(pages):
        write(page_name(i, pages), _tile_page(i, pages, shown[i * per:(i + 1) * per]))
    write("index.html", _index_page(metrics, tables, shown, page_of, pages, params))
    write("drops.html", _drops_page([d for s in shards for d in s.drops]))
    return pages
