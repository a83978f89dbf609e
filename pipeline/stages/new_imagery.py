"""Annotate new imagery: scenes of any size -> tiles with masks -> the usual stages -> exports.

`run_annotate_imagery` is what `geopixeld annotate PATH... --out DIR [--masks ...]` runs:

    OUT/tiles/      Tile shards (+ report.json): windows of each scene, masks from --masks,
                    each tile's CRS and affine transform when the scene has them
    OUT/plan/, OUT/responses/{holistic,instance,cluster}/, OUT/records/, OUT/export/
                    the stages of `geopixeld build`, unchanged (pipeline.stages.plan, .annotate,
                    .compose, .export)
    OUT/export/geojson/, OUT/export/geoparquet/ (one MultiPolygon per phrase; WGS 84 unless
                    imagery.output_crs is scene) and a `geometry` column in
                    OUT/export/parquet/ when scenes have a CRS (pipeline.sources.georef)
    OUT/summary.json  tiles, objects, phrases, calls, cost, and one entry per scene

Masks (`masks`, `masks_arg`): None (no objects: holistic captions only, refused unless
`compose.require_phrases` is false), "sam" (automatic masks, unknown category), "dota" DIR
(oriented boxes -> SAM box prompts), "coco" FILE, "geojson" FILE (pipeline.sources.label_sources).
Objects whose category is not known are planned with the category-free prompts
(prompts/v1/*_unknown.txt).

Tiling is scene by scene (a progress callback hears of each scene as it finishes); a large
TIFF is cut into tasks of `prepare.tiles_per_shard` windows mapped with dask, each reading only
its own windows. Part files are then packed, in scene order, into shards of at most
`prepare.tiles_per_shard` tiles, so the same inputs give the same shards whatever the scheduler.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import BadParamsError, EmptyInputError, GeoPixelDError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import Params, override_params
from pipeline.core.shards import shard_name, write_json, write_records, write_table
from pipeline.core.stage import Stage
from pipeline.geometry import masks as rle
from pipeline.geometry.categories import UNKNOWN_CATEGORY
from pipeline.sources.imagery import (
    SOURCE,
    SceneInfo,
    SceneReader,
    describe_scene,
    find_images,
    scene_windows,
    tile_id,
    tile_transform,
)
from pipeline.sources.label_sources import (
    LabelIndex,
    SceneLabel,
    check_label_folder,
    clip_to_scene,
    dota_label_file,
    geojson_scene_labels,
    label_mask,
    parse_dota,
    read_coco_labels,
    read_geojson,
)
from schemas import PASSES, ObjectInstance, Tile, Window, arrow_schema

MASK_KINDS = ("sam", "dota", "coco", "geojson")
NEEDS_FILE = {"dota": "a folder of DOTA label files", "coco": "a COCO json",
              "geojson": "a GeoJSON file"}
PARTS = ".parts"

ProgressCallback = Callable[[str, dict], None]

__all__ = ["MASK_KINDS", "MaskSpec", "ImageryTask", "imagery_task", "mask_spec",
           "run_annotate_imagery", "run_tile_imagery", "tile_objects"]


@dataclass(frozen=True)
class MaskSpec:
    """Where the tiles' objects come from: None, sam, dota DIR, coco FILE or geojson FILE."""

    kind: Optional[str] = None
    path: Optional[Path] = None


def mask_spec(masks: Optional[str], masks_arg: Optional[Path]) -> MaskSpec:
    """Check `--masks KIND [PATH]`: sam takes no path, dota/coco/geojson need one."""
    if masks is None:
        if masks_arg is not None:
            raise BadParamsError(f"--masks: a path ({masks_arg}) without a mask source")
        return MaskSpec()
    kind = masks.strip().lower()
    if kind not in MASK_KINDS:
        raise BadParamsError(f"--masks: {masks!r} is not one of {', '.join(MASK_KINDS)}")
    if kind == "sam":
        if masks_arg is not None:
            raise BadParamsError(f"--masks sam takes no path (got {masks_arg})")
        return MaskSpec("sam")
    if masks_arg is None:
        raise BadParamsError(f"--masks {kind} needs {NEEDS_FILE[kind]}")
    path = Path(masks_arg)
    if kind == "dota":
        check_label_folder(path)
    elif path.is_dir():
        raise EmptyInputError(f"--masks {kind}: is a folder, not a {kind} file", path)
    elif not path.is_file():
        raise EmptyInputError(f"--masks {kind}: file not found", path)
    return MaskSpec(kind, path)


@dataclass(frozen=True)
class ImageryTask:
    """Consecutive windows of one scene, and the labels that may reach them."""

    scene_index: int
    index: int
    info: SceneInfo
    split: str
    windows: tuple[tuple[str, Window], ...]
    labels: tuple[SceneLabel, ...] = ()
    masks: Optional[str] = None


# ---- one tile ---------------------------------------------------------------------------------

def _instance(object_id: int, category: str, mask: np.ndarray, min_area: int,
              counts: Counter, category_id: Optional[int] = None) -> Optional[ObjectInstance]:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        counts["empty_mask"] += 1
        return None
    area = int(np.count_nonzero(mask))
    if area <= min_area:
        counts["small_area"] += 1
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return ObjectInstance(object_id=int(object_id), category=category, category_id=category_id,
                          bbox=[float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
                                float(rows[-1] - rows[0] + 1)],
                          area=area, mask=rle.encode(mask))


def tile_objects(kind: Optional[str], rgb: np.ndarray, valid: np.ndarray, window: Window,
                 labels: Optional[LabelIndex], params: Params,
                 counts: Counter) -> list[ObjectInstance]:
    """The objects of one tile from its mask source; drops counted in `counts`."""
    min_area = params.prepare.min_instance_area
    found: list[Optional[ObjectInstance]] = []
    if kind in ("coco", "geojson") and labels is not None:
        for label, mask in labels.masks(window):
            found.append(_instance(label.object_id, label.category, mask, min_area, counts,
                                   label.category_id))
    elif kind == "dota" and labels is not None:
        found = _box_prompted(rgb, window, labels, params, counts)
    elif kind == "sam":
        from pipeline.sources.sam_masks import automatic_masks, load_sam

        masks, sam_counts = automatic_masks(load_sam(params.sam), rgb, valid, params.sam)
        counts.update({f"sam_{k}": v for k, v in sam_counts.items()})
        counts["sam_tiles"] += 1
        found = [_instance(i, UNKNOWN_CATEGORY, m, min_area, counts)
                 for i, m in enumerate(masks, start=1)]
    return [o for o in found if o is not None]


def _box_prompted(rgb: np.ndarray, window: Window, labels: LabelIndex, params: Params,
                  counts: Counter) -> list[Optional[ObjectInstance]]:
    """DOTA boxes reaching the tile -> SAM masks (one encoding for all the tile's boxes)."""
    from pipeline.sources.sam_masks import box_masks, load_sam

    boxes, polygons = [], []
    for label in labels.in_window(window):
        polygon = label_mask(label, window)
        rows = np.flatnonzero(polygon.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(polygon.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        polygons.append((label, polygon))
    if not boxes:
        return []
    counts["sam_tiles"] += 1
    counts["box_prompts"] += len(boxes)
    sam = load_sam(params.sam)
    predicted = box_masks(sam, rgb, np.asarray(boxes, np.float32), params.sam.box_batch)
    found = []
    for (label, polygon), mask in zip(polygons, predicted):
        mask = mask.astype(np.uint8)
        if params.sam.clip_to_box:
            mask &= polygon
        if not mask.any():
            counts["empty_box_masks"] += 1
            if params.sam.empty_box_fallback == "drop":
                continue
            mask = polygon
        found.append(_instance(label.object_id, label.category, mask,
                               params.prepare.min_instance_area, counts, label.category_id))
    return found


# ---- one task ---------------------------------------------------------------------------------

def imagery_task(task: ImageryTask, params: Params, parts_dir: str) -> dict:
    """Read a task's windows, find their objects, and write the tiles as part files of at most
    prepare.tiles_per_shard tiles. Under on_error 'skip' a bad scene leaves no part."""
    parts_dir = Path(parts_dir)
    counts: Counter = Counter()
    result: dict = {"scene": task.info.name, "index": task.index, "parts": [], "counts": counts}
    buffer: list[Tile] = []
    labels = LabelIndex(task.labels) if task.masks in ("dota", "coco", "geojson") else None

    def flush() -> None:
        if buffer:
            name = f"{task.scene_index:05d}-{task.index:05d}-{len(result['parts']):05d}.parquet"
            write_records(parts_dir / name, buffer, Tile)
            result["parts"].append((name, len(buffer)))
            buffer.clear()

    try:
        with SceneReader(task.info, params.imagery) as reader:
            for tid, window in task.windows:
                rgb, valid = reader.read(window)
                if 1.0 - valid.mean() > params.imagery.max_nodata_share:
                    counts["tiles_nodata"] += 1
                    continue
                objects = tile_objects(task.masks, rgb, valid, window, labels, params, counts)
                png = encode_png(rgb, params.prepare.png_compression)
                transform = (tile_transform(task.info.transform, window)
                             if task.info.transform is not None else None)
                buffer.append(Tile(
                    tile_id=tid, source=SOURCE, split=task.split, image_name=task.info.name,
                    window=window, height=window.height, width=window.width, image_png=png,
                    image_sha256=sha256(png), objects=objects, crs=task.info.crs,
                    transform=transform))
                counts["tiles"] += 1
                counts["objects"] += len(objects)
                if len(buffer) >= params.prepare.tiles_per_shard:
                    flush()
            flush()
    except GeoPixelDError as exc:
        if params.prepare.on_error == "raise":
            raise
        for name, _ in result["parts"]:
            (parts_dir / name).unlink(missing_ok=True)
        result["parts"] = []
        result["skipped"] = exc.one_line()
    return result


# ---- the tiles stage --------------------------------------------------------------------------

@dataclass
class _Scene:
    info: SceneInfo
    labels: tuple[SceneLabel, ...] = ()
    label_counts: Counter = field(default_factory=Counter)
    label_file: Optional[str] = None


def _scene_labels(scenes: list[_Scene], spec: MaskSpec, params: Params) -> dict:
    """Attach each scene's labels (clipped to it); returns the source's file-level counts."""
    counts: Counter = Counter()
    if spec.kind == "dota":
        matched = 0
        for s in scenes:
            path = dota_label_file(spec.path, s.info.name)
            if path is None:
                counts["scenes_without_labels"] += 1
                continue
            matched += 1
            parsed = parse_dota(path, params.imagery, s.label_counts)
            s.labels = tuple(clip_to_scene(parsed, s.info.height, s.info.width,
                                           s.label_counts))
            s.label_file = str(path)
        if scenes and not matched:
            raise EmptyInputError("no DOTA label file matches a scene (expected "
                                  "<scene name>.txt)", spec.path)
    elif spec.kind == "coco":
        found = read_coco_labels(spec.path, {s.info.name: (s.info.height, s.info.width)
                                             for s in scenes}, counts)
        if scenes and not found:
            raise EmptyInputError("no image of the COCO json matches a scene (by file name)",
                                  spec.path)
        for s in scenes:
            s.labels = tuple(found.get(s.info.name, ()))
            s.label_file = str(spec.path)
            counts["scenes_without_labels"] += s.info.name not in found
    elif spec.kind == "geojson":
        geo = read_geojson(spec.path, params.imagery, counts)
        for s in scenes:
            s.labels = tuple(geojson_scene_labels(geo, s.info.name, s.info.crs,
                                                  s.info.transform, s.info.height,
                                                  s.info.width, s.label_counts))
            s.label_file = str(spec.path)
    return dict(counts)


def _tasks(index: int, scene: _Scene, params: Params, spec: MaskSpec) -> list[ImageryTask]:
    info = scene.info
    windows = scene_windows(info.height, info.width, params.prepare.tile_size,
                            params.prepare.stride)
    layout = tuple((tile_id(info.name, w, len(windows) == 1), w) for w in windows)
    # a windowed scene is split into tasks; a decoded one is decoded once, in one task
    size = params.prepare.tiles_per_shard if info.windowed else max(1, len(layout))
    return [ImageryTask(scene_index=index, index=k, info=info, split=params.imagery.split,
                        windows=layout[start:start + size], labels=scene.labels,
                        masks=spec.kind)
            for k, start in enumerate(range(0, len(layout), size))]


def _pack(parts_dir: Path, names: list[tuple[str, int]], staging: Path, split: str,
          per_shard: int) -> int:
    """Pack part files, in order, into shards of at most `per_shard` tiles; returns the count.
    A part that fills a shard alone is renamed, never rewritten."""
    groups: list[list[str]] = []
    total = per_shard + 1
    for name, count in names:
        if total + count > per_shard:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += count
    schema = arrow_schema(Tile)
    for i, group in enumerate(groups):
        target = staging / shard_name(split, i, len(groups))
        if len(group) == 1:
            os.replace(parts_dir / group[0], target)
            continue
        write_table(target, pa.concat_tables([pq.read_table(parts_dir / n, schema=schema)
                                              for n in group]))
        for n in group:
            (parts_dir / n).unlink()
    return len(groups)


def _describe_all(images: list[Path], params: Params) -> tuple[list[_Scene], list[dict]]:
    scenes, skipped = [], []
    for path in images:
        try:
            scenes.append(_Scene(describe_scene(path, params.imagery, params.prepare)))
        except GeoPixelDError as exc:
            if params.prepare.on_error == "raise":
                raise
            skipped.append({"scene": path.stem, "file": str(path), "reason": exc.one_line()})
    return scenes, skipped


def run_tile_imagery(paths: Sequence[Path], out_dir: Path, params: Params,
                     spec: MaskSpec = MaskSpec(), scheduler: Optional[str] = None,
                     progress: Optional[ProgressCallback] = None) -> dict:
    """Cut every scene of `paths` into Tile shards in `out_dir` (+ report.json); returns the
    report. `progress("scene", scene_report)` is called as each scene is done."""
    images = find_images([Path(p) for p in paths])
    if spec.kind in ("sam", "dota"):
        from pipeline.sources.sam_masks import load_sam

        load_sam(params.sam)  # a missing or wrong checkpoint stops here, before any tile
    scenes, skipped = _describe_all(images, params)
    label_counts = _scene_labels(scenes, spec, params)
    # SAM (automatic masks, or box-prompted from DOTA labels) is a model each task holds
    stage = Stage("tiles", params, scheduler, holds_model=spec.kind in ("sam", "dota"))
    out_dir = Path(out_dir)
    scene_reports = []
    with stage.output(out_dir, inputs=[*paths, spec.path], count_key="tiles") as out:
        staging = out.folder
        parts_dir = staging / PARTS
        parts_dir.mkdir()
        names: list[tuple[str, int]] = []
        for index, scene in enumerate(scenes):
            tasks = _tasks(index, scene, params, spec)
            results = stage.map(partial(imagery_task, params=params, parts_dir=str(parts_dir)),
                                tasks, label=f"tiles {scene.info.name}")
            report = _scene_report(scene, results)
            if "skipped" in report:
                for r in results:  # tasks of the scene that did succeed leave no tiles either
                    for name, _ in r["parts"]:
                        (parts_dir / name).unlink(missing_ok=True)
                skipped.append({"scene": scene.info.name, "file": scene.info.path,
                                "reason": report["skipped"]})
            else:
                names += [p for r in results for p in r["parts"]]
            scene_reports.append(report)
            if progress is not None:
                progress("scene", report)
        if not names:
            raise EmptyInputError("no tiles: every scene was skipped or all nodata",
                                  ", ".join(str(p) for p in paths))
        shards = _pack(parts_dir, names, staging, params.imagery.split,
                       params.prepare.tiles_per_shard)
        parts_dir.rmdir()
        totals: Counter = Counter()
        for r in scene_reports:
            totals.update({k: v for k, v in r["counts"].items()})
        report = {
            "stage": "tiles", "source": SOURCE, "split": params.imagery.split,
            "masks": spec.kind, "scenes": len(images), "scenes_tiled": len(scenes) - sum(
                "skipped" in r for r in scene_reports),
            "skipped_scenes": skipped, "shards": shards,
            "tiles": totals["tiles"], "tiles_nodata": totals["tiles_nodata"],
            "objects": totals["objects"],
            "georeferenced_scenes": sum(s.info.crs is not None for s in scenes),
            "labels": {**label_counts, **_summed([r["labels"] for r in scene_reports])},
            "counts": dict(sorted(totals.items())),
            "per_scene": scene_reports,
        }
        out.report = report
    return report


def _summed(dicts: list[dict]) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def _scene_report(scene: _Scene, results: list[dict]) -> dict:
    counts: Counter = Counter()
    for r in results:
        counts.update(r["counts"])
    info = scene.info
    report = {"scene": info.name, "file": info.path, "format": info.format,
              "width": info.width, "height": info.height, "bands": list(info.bands),
              "dtype": info.dtype, "crs": info.crs, "stretch": info.stretch is not None,
              "labels_file": scene.label_file, "labels": dict(sorted(scene.label_counts.items())),
              "label_objects": len(scene.labels), "tiles": counts["tiles"],
              "tiles_nodata": counts["tiles_nodata"], "objects": counts["objects"],
              "counts": dict(sorted(counts.items()))}
    failed = [r["skipped"] for r in results if "skipped" in r]
    if failed:
        report["skipped"] = failed[0]
    return report


# ---- the whole command ------------------------------------------------------------------------

def _with_backend(params: Params, backend: Optional[str]) -> Params:
    # a bad name is blamed on --backend; the sections keep naming the params file read
    return override_params(params, {"annotate.backend.name": ("--backend", backend or None)})


def run_annotate_imagery(paths: list[Path], out_dir: Path, params: Params, masks: str | None,
                         masks_arg: Path | None, backend: str | None, scheduler=None,
                         progress: Optional[ProgressCallback] = None) -> dict:
    """Tiles -> plan -> annotate (3 passes) -> compose -> export (+ georeferenced outputs)
    under `out_dir`; writes and returns OUT/summary.json. `progress(event, report)` hears of
    each scene ("scene") and each stage ("tiles", "plan", "annotate-<kind>", "compose",
    "export", "georef") as it finishes."""
    from annotators.base import get_backend
    from pipeline.core.output_folders import check_output_location, output_lock

    check_output_location(out_dir, [*paths, masks_arg])  # before any work
    params = _with_backend(params, backend)
    spec = mask_spec(masks, masks_arg)
    if spec.kind is None and params.compose.require_phrases:
        raise BadParamsError("no --masks: the tiles would have no objects, and "
                             "compose.require_phrases drops every caption that grounds nothing "
                             "(after paying for it); give --masks sam, dota DIR, coco FILE or "
                             "geojson FILE, or set compose.require_phrases: false")
    # a backend set-up mistake stops before any work
    get_backend(params.annotate.backend, cache=params.annotate.cache)
    out_dir = Path(out_dir)
    with output_lock(out_dir):  # one run per output root; each stage also locks its folder
        return _annotate_stages(paths, out_dir, params, spec, scheduler, progress)


def _annotate_stages(paths: list[Path], out_dir: Path, params: Params, spec: MaskSpec,
                     scheduler, progress: Optional[ProgressCallback]) -> dict:
    from pipeline.sources.georef import run_georef
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.compose.stage import run_compose
    from pipeline.stages.export import run_export
    from pipeline.stages.plan import run_plan

    tell = progress or (lambda event, report: None)
    dirs = {"tiles": out_dir / "tiles", "plan": out_dir / "plan",
            "responses": out_dir / "responses", "records": out_dir / "records",
            "export": out_dir / "export"}
    reports: dict[str, dict] = {}
    reports["tiles"] = run_tile_imagery(paths, dirs["tiles"], params, spec, scheduler, tell)
    tell("tiles", reports["tiles"])
    reports["plan"] = run_plan(params, dirs["tiles"], dirs["plan"], scheduler=scheduler)
    tell("plan", reports["plan"])
    for kind in PASSES:
        reports[kind] = run_annotate(params, kind, dirs["tiles"], dirs["plan"],
                                     dirs["responses"] / kind, scheduler=scheduler)
        tell(f"annotate-{kind}", reports[kind])
    reports["compose"] = run_compose(params, dirs["tiles"], dirs["plan"], dirs["responses"],
                                     dirs["records"], scheduler=scheduler)
    tell("compose", reports["compose"])
    reports["export"] = run_export(params, dirs["tiles"], dirs["records"], dirs["export"],
                                   scheduler=scheduler)
    tell("export", reports["export"])
    reports["georef"] = run_georef(params, dirs["tiles"], dirs["export"])
    tell("georef", reports["georef"])
    summary = _summary(reports, spec, params)
    write_json(out_dir / "summary.json", summary)
    return summary


def _summary(reports: dict[str, dict], spec: MaskSpec, params: Params) -> dict:
    tiles, compose = reports["tiles"], reports["compose"]
    calls = {kind: reports[kind]["requests"] for kind in PASSES}
    return {
        "masks": spec.kind, "masks_path": str(spec.path) if spec.path else None,
        "backend": params.annotate.backend.name, "model": params.annotate.backend.model,
        "scenes": tiles["scenes"], "scenes_skipped": len(tiles["skipped_scenes"]),
        "tiles": tiles["tiles"], "tiles_nodata": tiles["tiles_nodata"],
        "objects": tiles["objects"],
        "records": compose["records"], "dropped": compose["dropped_total"],
        "phrases": compose["phrases_total"],
        "calls": sum(calls.values()), "calls_by_pass": calls,
        "failed_calls": sum(reports[k]["failed"] for k in PASSES),
        "cached_calls": sum(reports[k]["cached"] for k in PASSES),
        "cost_usd": round(sum(reports[k]["cost_usd"] for k in PASSES), 6),
        "spent_usd": round(sum(reports[k]["spent_usd"] for k in PASSES), 6),
        "georeferenced": reports["georef"]["georeferenced"],
        "geojson": {s: v["file"] for s, v in reports["georef"].get("splits", {}).items()},
        "per_scene": [{k: r[k] for k in ("scene", "format", "width", "height", "crs", "tiles",
                                         "tiles_nodata", "objects")}
                      | ({"skipped": r["skipped"]} if "skipped" in r else {})
                      for r in tiles["per_scene"]],
    }
