"""The QA report: one folder that opens from disk (file://, no server, no network).

    index.html            summary: our figures beside GeoPixelD's, charts, browse-by tables, metrics
    page-0001.html ...    `qa.tiles_per_page` tiles each, so 10,000 tiles stay fast
    drops.html            every dropped tile with its stage and reason
    tiles/<tile>.jpg      the tile with each phrase's mask filled and outlined in its colour
    data/index.js         every shown tile's page and facets (window.QA_INDEX)
    assets/report.js|css  filters and styling (copied from pipeline/formats/report_assets/)

Overlays are drawn here with OpenCV, once, into JPEG thumbnails: the pages stay plain HTML and
a browser decodes no masks. The i-th phrase of a record has the i-th colour of `PALETTE` in
both its overlay and its caption highlight. Filters (category, backend, model, review, split)
run in report.js over data/index.js, which is a script, not JSON: Chromium refuses fetch() of
local files. The filter lives in the URL hash (`#category=ship&backend=template`), so paging
links keep it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import quote, urlencode

import cv2
import numpy as np

from pipeline.core.errors import BadImageError, BadRecordError
from pipeline.core.params import QAParams
from pipeline.core.shards import atomic_path
from pipeline.geometry import masks
from pipeline.geometry.categories import readable
from schemas import Phrase

if TYPE_CHECKING:
    from pipeline.stages.qa import RecordFacts, ShardFacts

IMAGE_FOLDER = "tiles"
ASSETS = Path(__file__).resolve().parent / "report_assets"
ASSET_FILES = ("report.css", "report.js")
FACETS = ("category", "backend", "model", "review", "split")

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


def render_overlay(picture: Optional[np.ndarray], phrases: Sequence[Phrase], params: QAParams,
                   where: str = "") -> tuple[bytes, tuple[int, int]]:
    """JPEG of the tile (RGB array, or grey when None) with each phrase's mask filled and
    outlined in its colour, its longest side at most `params.thumbnail_size`; and its
    (width, height). Larger masks are drawn first, so that small objects stay on top."""
    if picture is not None:
        height, width = picture.shape[:2]
    elif phrases:
        height, width = phrases[0].mask.size
    else:
        height = width = params.thumbnail_size
    scale = min(1.0, params.thumbnail_size / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if picture is None:
        base = np.full((size[1], size[0], 3), NO_IMAGE_GREY, np.uint8)
    else:
        base = cv2.resize(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), size,
                          interpolation=cv2.INTER_AREA)
    fill = base.copy()
    outlines = []
    order = sorted(range(len(phrases)), key=lambda i: -masks.area(phrases[i].mask))
    for i in order:
        rle = phrases[i].mask
        if list(rle.size) != [height, width]:
            raise BadRecordError(f"phrase {i} ({phrases[i].text!r}) has a {rle.size[0]}x"
                                 f"{rle.size[1]} mask on a {height}x{width} tile", where or None)
        full = masks.decode(rle)
        colour = phrase_colour(i)[::-1]  # OpenCV draws BGR
        fill[cv2.resize(full, size, interpolation=cv2.INTER_AREA).astype(bool)] = colour
        contours, _ = cv2.findContours(full, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        # pixel centres scale as (x + 0.5) * scale - 0.5
        outlines.append(([np.round((c + 0.5) * scale - 0.5).astype(np.int32) for c in contours],
                         colour))
    out = cv2.addWeighted(fill, params.mask_alpha, base, 1.0 - params.mask_alpha, 0.0)
    if params.contour_thickness:
        for contours, colour in outlines:
            cv2.drawContours(out, contours, -1, colour, params.contour_thickness, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality])
    if not ok:
        raise BadImageError("JPEG encoding of a report image failed", where or None)
    return buf.tobytes(), size


def caption_html(caption: str, phrases: Sequence) -> str:
    """The caption as HTML: the i-th grounded phrase highlighted in the i-th colour, its [SEG]
    kept visible after it; everything else escaped."""
    out, pos = [], 0
    for i, m in enumerate(_GROUNDING_RE.finditer(caption)):
        out.append(html.escape(caption[pos:m.start()]))
        colour = "{},{},{}".format(*phrase_colour(i))
        title = ""
        if i < len(phrases):
            p = phrases[i]
            count = f"{p.objects} object" + ("" if p.objects == 1 else "s")
            title = f' title="{html.escape(f"{p.kind} · {readable(p.category)} · {count}")}"'
        out.append(f'<mark class="phrase" data-i="{i}" style="--c:{colour}"{title}>'
                   f'{html.escape(m.group(1))}</mark> '
                   f'<span class="seg" style="--c:{colour}">[SEG]</span>')
        pos = m.end()
    out.append(html.escape(caption[pos:]))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Pages


def page_name(index: int, pages: int) -> str:
    """File name of the index-th (0-based) tile page: page-0001.html, ..."""
    return f"page-{index + 1:0{max(4, len(str(pages)))}d}.html"


def facets_of(record: "RecordFacts") -> dict[str, list[str]]:
    """The values a record is filtered by."""
    return {"category": sorted({p.category for p in record.phrases}),
            "backend": [record.backend], "model": [record.model],
            "review": [record.review], "split": [record.split]}


def _document(title: str, body: str, page: int | str = "", scripts: bool = True) -> str:
    tail = ('<script src="data/index.js"></script>\n<script src="assets/report.js"></script>\n'
            if scripts else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            "<link rel=\"stylesheet\" href=\"assets/report.css\">\n</head>\n"
            f"<body data-page=\"{page}\">\n{body}\n{tail}</body>\n</html>\n")


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else html.escape(str(value))
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:,.4f}".rstrip("0").rstrip(".")


def _pager(current: Optional[int], pages: int) -> str:
    links = []
    if current is not None:
        if current > 0:
            links.append(f'<a rel="prev" data-page="{current - 1}" '
                         f'href="{page_name(current - 1, pages)}">&larr; previous</a>')
        else:
            links.append('<span class="disabled">&larr; previous</span>')
    for i in range(pages):
        here = ' aria-current="page"' if i == current else ""
        links.append(f'<a class="page-link" data-page="{i}"{here} '
                     f'href="{page_name(i, pages)}">{i + 1}</a>')
    if current is not None:
        if current + 1 < pages:
            links.append(f'<a rel="next" data-page="{current + 1}" '
                         f'href="{page_name(current + 1, pages)}">next &rarr;</a>')
        else:
            links.append('<span class="disabled">next &rarr;</span>')
    links.append('<a href="index.html">summary</a>')
    links.append('<a href="drops.html">drops</a>')
    return '<nav class="pager">' + " ".join(links) + "</nav>"


def _tile_article(record: "RecordFacts") -> str:
    width, height = record.image_size
    objects = sum(p.objects for p in record.phrases)
    meta = " · ".join([
        html.escape(record.split), html.escape(f"{record.backend} / {record.model}"),
        f'<span class="review {html.escape(record.review)}">{html.escape(record.review)}</span>',
        f"{len(record.phrases)} phrases", f"{objects} objects grounded",
        f"{len(record.caption)} chars"])
    return (f'<article class="tile" id="tile-{html.escape(record.tile_id)}" '
            f'data-tile="{html.escape(record.tile_id)}">\n'
            f'<img src="{quote(record.image or "")}" width="{width}" height="{height}" '
            f'alt="tile {html.escape(record.tile_id)} with its phrase masks" loading="lazy">\n'
            f'<div class="text">\n<h2>{html.escape(record.tile_id)}</h2>\n'
            f'<p class="meta">{meta}</p>\n'
            f'<p class="caption">{caption_html(record.caption, record.phrases)}</p>\n'
            f'</div>\n</article>')


def _tile_page(i: int, pages: int, records: Sequence["RecordFacts"]) -> str:
    body = (f'<header>\n<h1>GeoPixelD QA report — page {i + 1} of {pages}</h1>\n'
            f'{_pager(i, pages)}\n<div id="filters" class="filters"></div>\n'
            f'<p id="status" class="status"></p>\n</header>\n<main class="tiles">\n'
            + "\n".join(_tile_article(r) for r in records)
            + f'\n</main>\n<footer>{_pager(i, pages)}</footer>')
    return _document(f"GeoPixelD QA — page {i + 1}", body, page=i)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<table class="{cls}">\n<thead><tr>{head}</tr></thead>\n'
            f'<tbody>\n{body}\n</tbody>\n</table>')


_COMPARED = (
    ("records", "records (annotated patches)"), ("phrases", "grounded phrases"),
    ("instance_phrases", "instance phrases"), ("cluster_phrases", "cluster (group) phrases"),
    ("instance_share", "instance share of phrases"), ("objects", "objects grounded"),
    ("phrases_per_record", "phrases per record"), ("objects_per_record", "objects per record"),
    ("caption_chars_mean", "mean caption length (chars, tags included)"),
    ("calls_per_record.holistic", "holistic calls per record"),
    ("calls_per_record.instance", "instance calls per record"),
    ("calls_per_record.cluster", "cluster calls per record"),
    ("calls_per_record.total", "LMM calls per record"),
)


def _dig(tree: dict, dotted: str) -> object:
    node: object = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def comparison_table(metrics: dict, params: QAParams) -> str:
    """GeoPixelD's figures, each split followed by ours that `qa.reference_splits` pairs with
    it; our other splits last."""
    reference = metrics.get("reference", {}).get("geopixeld", {})
    ours = metrics.get("by_split", {})
    columns = []
    for ref in reference:
        columns.append((f"GeoPixelD {html.escape(ref)}", reference[ref]))
        columns += [(f"ours: {html.escape(split)}", ours[split]) for split in sorted(ours)
                    if params.reference_splits.get(split) == ref]
    columns += [(f"ours: {html.escape(split)}", ours[split]) for split in sorted(ours)
                if params.reference_splits.get(split) not in reference]
    rows = [[label] + [_number(_dig(figures, key)) for _, figures in columns]
            for key, label in _COMPARED]
    return _table(["figure"] + [c for c, _ in columns], rows, "compare")


def _bars(rows: Sequence[dict], label: str, value: str, title: str, unit: str = "") -> str:
    if not rows:
        return f'<figure class="chart"><figcaption>{title}</figcaption><p>none</p></figure>'
    top = max(r[value] for r in rows) or 1
    lines = []
    for r in rows:
        share = 100.0 * r[value] / top
        lines.append(f'<tr><th>{html.escape(str(r[label]))}{unit}</th><td><div class="bar" '
                     f'style="width:{share:.1f}%"></div></td><td class="n">{_number(r[value])}'
                     f'</td></tr>')
    return (f'<figure class="chart"><figcaption>{title}</figcaption><table class="bars">'
            + "".join(lines) + "</table></figure>")


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _browse(shown: Sequence["RecordFacts"], page_of: dict[str, int], pages: int) -> str:
    """Per facet: each value, its tile count, and a link to its first page, filter set."""
    parts = []
    for facet in FACETS:
        counts: Counter[str] = Counter()
        first: dict[str, int] = {}
        for r in shown:
            for value in facets_of(r)[facet]:
                counts[value] += 1
                first.setdefault(value, page_of[r.tile_id])
        rows = [[f'<a href="{page_name(first[v], pages)}#{urlencode({facet: v})}">'
                 f'{html.escape(v)}</a>', _number(n)] for v, n in sorted(counts.items())]
        parts.append(f"<h3>by {facet}</h3>" + _table([facet, "tiles"], rows, "browse"))
    return "\n".join(parts)


def _drop_summary(dropped: dict) -> str:
    by_reason = dropped.get("by_reason", {})
    if not by_reason:
        return "<p>No tile was dropped.</p>"
    rows = [[f'<a href="drops.html#reason-{html.escape(r)}">{html.escape(r)}</a>', _number(n)]
            for r, n in by_reason.items()]
    return _table(["reason", "tiles"], rows, "drops")


def _index_page(metrics: dict, tables: dict[str, list[dict]], shown: Sequence["RecordFacts"],
                page_of: dict[str, int], pages: int, params: QAParams) -> str:
    width = params.caption_bin_chars
    rows = tables.get("caption_length.csv", [])
    first = next((i for i, r in enumerate(rows) if r["records"]), len(rows))
    histogram = [{"bin": f"{r['chars']}–{r['chars'] + width - 1}", "records": r["records"]}
                 for r in rows[first:]]  # from the shortest caption's bin
    review = metrics.get("review", {})
    dropped = metrics.get("dropped", {})
    body = f"""<header>
<h1>GeoPixelD QA report</h1>
<p class="summary">{_number(metrics.get("records"))} records from
{_number(metrics.get("tiles"))} tiles,
{_number(dropped.get("total"))} dropped; {_number(len(shown))} shown on {pages} pages of at most
{params.tiles_per_page} tiles.</p>
{_pager(None, pages)}
<div id="filters" class="filters"></div>
<p id="status" class="status"></p>
</header>
<main class="summary-page">
<section id="compare"><h2>Compared with GeoPixelD</h2>
<p>GeoPixelD's published scale (GeoPixel, arXiv 2501.13925) beside ours. Its test split came
from iSAID val; a dash is a figure not published or not measured.</p>
{comparison_table(metrics, params)}
</section>
<section id="charts"><h2>Charts</h2>
{_bars(histogram, "bin", "records", "caption length (chars): records")}
{_bars(tables.get("phrases_per_category.csv", []), "category", "phrases", "phrases per category")}
{_bars(tables.get("drop_reasons.csv", []), "reason", "tiles", "drop reasons: tiles")}
</section>
<section id="drops"><h2>Drops</h2>
{_drop_summary(dropped)}
<p><a href="drops.html">every dropped tile</a></p>
</section>
<section id="review"><h2>Review</h2>
{_table(["figure", "value"],
         [[html.escape(k), _number(v)] for k, v in _flatten(review)], "metrics")}
</section>
<section id="browse"><h2>Browse</h2>
{_browse(shown, page_of, pages)}
</section>
<section id="metrics"><h2>All metrics (metrics/qa.json)</h2>
{_table(["metric", "value"], [[html.escape(k), _number(v)] for k, v in _flatten(
        {k: v for k, v in metrics.items() if k != "reference"})], "metrics")}
</section>
</main>"""
    return _document("GeoPixelD QA report", body, page="")


def _drops_page(drops: Sequence) -> str:
    by_reason: dict[str, list] = {}
    for d in drops:
        by_reason.setdefault(d.reason, []).append(d)
    sections = []
    for reason in sorted(by_reason):
        rows = [[html.escape(d.tile_id), html.escape(d.split), html.escape(d.stage),
                 html.escape(d.detail)] for d in by_reason[reason]]
        sections.append(f'<section id="reason-{html.escape(reason)}"><h2>{html.escape(reason)} '
                        f'({len(rows)})</h2>\n'
                        + _table(["tile", "split", "stage", "detail"], rows, "drops")
                        + "</section>")
    body = ('<header><h1>GeoPixelD QA report — dropped tiles</h1>'
            '<nav class="pager"><a href="index.html">summary</a></nav></header>\n<main>\n'
            + ("\n".join(sections) or "<p>No tile was dropped.</p>") + "\n</main>")
    return _document("GeoPixelD QA — drops", body, scripts=False)


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
    already there, written by the shard tasks). Returns the number of tile pages."""
    folder = Path(folder)
    shown = [r for s in shards for r in s.records if r.image]
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
