"""The prepare stage: source scenes -> `Tile` shards (`build/tiles/{split}-{i:05d}-of-{n:05d}`).

Scenes are discovered per split (iSAID folders or a COCO json), grouped into tasks of about
`tiles_per_shard` tiles (counted from PNG headers or the json, without decoding), and the tasks
are mapped with dask. Each task decodes and checks a whole scene before cutting it, and writes
its tiles as part files of at most `tiles_per_shard` tiles; the stage then names the parts in
scene order, so identical inputs give byte-identical shards whatever the scheduler. Bad input
raises the matching pipeline.core.errors class, or with `on_error: skip` skips the scene and counts
it in report.json; either way nothing half-written is left behind.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Union

from pipeline.core.errors import (
    BadMaskError,
    BadParamsError,
    DuplicateNameError,
    EmptyInputError,
    GeoPixelDError,
)
from pipeline.core.params import Params, PrepareParams
from pipeline.core.shards import safe_join, safe_name, shard_name, write_records
from pipeline.core.stage import Stage
from pipeline.sources import coco_source, isaid
from schemas import Tile, Window

PARTS = ".parts"  # staging sub-folder of the tasks' part files
FAILED = ".failed"  # marker a failing task leaves so that the others stop early


@dataclass(frozen=True)
class Scene:
    """One source image to cut into tiles, and where its annotations are."""

    name: str
    split: str
    source: str
    image: Path
    id_mask: Optional[Path] = None
    colour_mask: Optional[Path] = None
    annotation_file: Optional[Path] = None
    coco: Optional[coco_source.CocoImage] = field(default=None, repr=False)


@dataclass(frozen=True)
class PrepareTask:
    """Consecutive scenes of one split whose tiles fill about one shard."""

    split: str
    index: int
    scenes: tuple[Scene, ...]


# ---- discovery --------------------------------------------------------------------------------

def _discover_isaid(params: Params, split: str) -> tuple[list[Scene], list[str]]:
    folder = Path(params.data.root) / split / "images"
    if not folder.is_dir():
        raise EmptyInputError("image folder not found", folder)
    files = [p for p in folder.iterdir() if p.is_file() and isaid.is_scene_file(p)]
    if not files:
        raise EmptyInputError("no scene images (*.png without '_' in the name)", folder)
    by_stem: dict[str, Path] = {}
    for path in sorted(files):
        safe_name(path.stem, f"image name ({path})")
        key = path.stem.lower()
        if key in by_stem:
            raise DuplicateNameError(
                f"{by_stem[key].name} and {path.name} give the same scene name", folder)
        by_stem[key] = path
    labelled = split not in params.data.unlabeled_splits
    skip = set(params.prepare.skip_images)
    scenes, excluded = [], []
    for path in sorted(files, key=lambda p: isaid.natural_key(p.stem)):
        if path.stem in skip:
            excluded.append(path.stem)
            continue
        id_mask = colour_mask = None
        if labelled:
            id_mask, colour_mask = isaid.mask_paths(path)
            for mask, role in ((id_mask, "instance id"), (colour_mask, "instance colour")):
                if params.prepare.on_error == "raise" and not mask.is_file():
                    raise BadMaskError(f"missing {role} mask for {path.name}", mask)
        scenes.append(Scene(name=path.stem, split=split, source=isaid.SOURCE, image=path,
                            id_mask=id_mask, colour_mask=colour_mask))
    return scenes, excluded


def _discover_coco(params: Params, split: str) -> tuple[list[Scene], list[str]]:
    if not params.data.coco_json:
        raise BadParamsError("data.coco_json: required when data.source is 'coco'")
    root = Path(params.data.root)
    json_path = root / params.data.coco_json.replace("{split}", split)
    images = root / params.data.coco_images.replace("{split}", split)
    entries = coco_source.read_coco(json_path)
    if not entries:
        raise EmptyInputError("no images in the COCO json", json_path)
    skip = set(params.prepare.skip_images)
    scenes, excluded = [], []
    for entry in entries:
        stem = Path(entry.file_name).stem
        safe_name(stem, f"image name ({entry.file_name} in {json_path})")
        if stem in skip:
            excluded.append(stem)
            continue
        scenes.append(Scene(name=stem, split=split, source=coco_source.SOURCE,
                            image=safe_join(images, entry.file_name), annotation_file=json_path,
                            coco=entry))
    return scenes, excluded


def discover_scenes(params: Params, split: str) -> list[Scene]:
    """The scenes of a split in natural name order (P2 before P10), skip_images left out.

    Raises EmptyInputError (nothing to read), DuplicateNameError (two files, one scene name),
    UnsafePathError (a name that is not a plain file name) and, with on_error 'raise',
    BadMaskError for a missing id or colour mask.
    """
    return _discover(params, split)[0]


def _discover(params: Params, split: str) -> tuple[list[Scene], list[str]]:
    safe_name(split, "split")
    if params.data.source == "coco":
        return _discover_coco(params, split)
    return _discover_isaid(params, split)


def scene_layout(scene: Scene, params: PrepareParams) -> Optional[list[tuple[str, Window]]]:
    """The scene's (tile id, window) list from its size in the PNG header or the json; None
    when the header is unreadable (the scene's decoding reports why)."""
    if scene.coco is not None:
        size: Optional[tuple[int, int]] = (scene.coco.height, scene.coco.width)
    else:
        size = isaid.header_size(scene.image)
    if size is None:
        return None
    return isaid.tile_layout(scene.name, size[0], size[1], params.tile_size, params.stride)


# ---- one scene --------------------------------------------------------------------------------

LoadedScene = Union[isaid.IsaidScene, coco_source.CocoScene]


def open_scene(scene: Scene, params: PrepareParams) -> LoadedScene:
    """Decode and check the whole scene (image and masks) before any tile is cut."""
    if scene.source == coco_source.SOURCE:
        return coco_source.load_scene(scene.name, scene.split, scene.image, scene.coco,
                                      scene.annotation_file, params.max_image_pixels)
    return isaid.load_scene(scene.name, scene.split, scene.image, scene.id_mask,
                            scene.colour_mask, params.max_image_pixels)


def cut_tiles(loaded: LoadedScene, params: PrepareParams, dropped: Counter) -> Iterator[Tile]:
    """The tiles of a decoded scene; dropped instances are counted in `dropped` by reason."""
    if isinstance(loaded, coco_source.CocoScene):
        return coco_source.iter_tiles(loaded, params, dropped)
    return isaid.iter_tiles(loaded, params, dropped)


def _scene_report(scene: Scene, loaded: LoadedScene) -> dict:
    report = {"scene": scene.name, "split": scene.split, "tiles": 0, "objects": 0,
              "dropped": Counter(), "unknown_colours": {}}
    if isinstance(loaded, isaid.IsaidScene):
        unknown = isaid.unknown_colours(loaded)
        if unknown:
            report["unknown_colours"] = {loaded.colour_file: unknown}
    return report


def _skipped_report(scene: Scene, exc: GeoPixelDError) -> dict:
    return {"scene": scene.name, "split": scene.split, "tiles": 0, "objects": 0,
            "dropped": Counter(), "unknown_colours": {},
            "skipped": {"file": exc.path or str(scene.image), "reason": exc.one_line()}}


def _open_or_skip(scene: Scene, params: PrepareParams) -> tuple[Optional[LoadedScene], dict]:
    """The decoded scene and its (empty) report, or under on_error 'skip' None and a report
    saying why the scene was skipped."""
    try:
        loaded = open_scene(scene, params)
    except GeoPixelDError as exc:
        if params.on_error == "raise":
            raise
        return None, _skipped_report(scene, exc)
    return loaded, _scene_report(scene, loaded)


def tile_scene(scene: Scene, params: Params) -> tuple[list[Tile], dict]:
    """All tiles of one scene and its report (tiles, objects, dropped instances by reason,
    unknown colours). With on_error 'skip' a bad scene gives no tiles and a `skipped` entry."""
    loaded, report = _open_or_skip(scene, params.prepare)
    if loaded is None:
        return [], report
    tiles = list(cut_tiles(loaded, params.prepare, report["dropped"]))
    report["tiles"] = len(tiles)
    report["objects"] = sum(len(t.objects) for t in tiles)
    return tiles, report


# ---- one task ---------------------------------------------------------------------------------

def prepare_task(task: PrepareTask, params: Params, parts_dir: str) -> dict:
    """Cut a task's scenes and write their tiles as part files of at most tiles_per_shard.

    A failing task leaves a marker so that the other tasks stop at their next scene (the
    runner lets every task settle before the stage raises and removes its staging folder).
    """
    parts_dir = Path(parts_dir)
    result: dict = {"index": task.index, "split": task.split, "parts": [], "scenes": []}
    buffer: list[Tile] = []

    def flush() -> None:
        if buffer:
            path = parts_dir / f"{task.split}-{task.index:05d}-{len(result['parts']):05d}.parquet"
            write_records(path, buffer, Tile)
            result["parts"].append((path.name, len(buffer)))
            buffer.clear()

    try:
        for scene in task.scenes:
            if (parts_dir / FAILED).exists():
                result["aborted"] = True
                return result
            loaded, report = _open_or_skip(scene, params.prepare)
            result["scenes"].append(report)
            if loaded is None:
                continue
            for tile in cut_tiles(loaded, params.prepare, report["dropped"]):
                safe_name(tile.tile_id, "tile id")
                report["tiles"] += 1
                report["objects"] += len(tile.objects)
                buffer.append(tile)
                if len(buffer) >= params.prepare.tiles_per_shard:
                    flush()
            del loaded  # release the scene's arrays before the next one is decoded
        flush()
    except Exception:
        (parts_dir / FAILED).touch()
        raise
    return result


# ---- the stage --------------------------------------------------------------------------------

def plan_tasks(scenes: list[Scene], layouts: list[Optional[list]], tiles_per_shard: int,
               first_index: int = 0) -> list[PrepareTask]:
    """Group consecutive scenes (one split) so that each group has about one shard of tiles."""
    tasks, current, count = [], [], 0
    for scene, layout in zip(scenes, layouts):
        n = len(layout) if layout else 1
        if current and count + n > tiles_per_shard:
            tasks.append(PrepareTask(scene.split, first_index + len(tasks), tuple(current)))
            current, count = [], 0
        current.append(scene)
        count += n
    if current:
        tasks.append(PrepareTask(current[0].split, first_index + len(tasks), tuple(current)))
    return tasks


def _check_tile_ids(split: str, scenes: list[Scene], layouts: list[Optional[list]]) -> None:
    seen: dict[str, str] = {}
    for scene, layout in zip(scenes, layouts):
        for tile_id, _ in layout or []:
            safe_name(tile_id, f"tile id (from {scene.image})")
            key = tile_id.lower()
            if key in seen and seen[key] != scene.name:
                raise DuplicateNameError(
                    f"scenes {seen[key]!r} and {scene.name!r} both give tile {tile_id!r} in "
                    f"split {split!r}", scene.image)
            seen[key] = scene.name


def _split_report(scene_reports: list[dict], discovered: int, excluded: list[str],
                  shards: int) -> dict:
    dropped: Counter = Counter()
    unknown: dict[str, dict[str, int]] = {}
    skipped = []
    for r in scene_reports:
        dropped.update(r["dropped"])
        unknown.update(r["unknown_colours"])
        if "skipped" in r:
            skipped.append({"scene": r["scene"], **r["skipped"]})
    return {
        "scenes": discovered,
        "scenes_tiled": discovered - len(skipped),
        "excluded_scenes": excluded,
        "skipped_scenes": skipped,
        "tiles": sum(r["tiles"] for r in scene_reports),
        "objects": sum(r["objects"] for r in scene_reports),
        "dropped": dict(sorted(dropped.items())),
        "unknown_colours": dict(sorted(unknown.items())),
        "shards": shards,
    }


def run_prepare(params: Params, out_dir: Path, splits: list[str] | None = None,
                scheduler: str | None = None) -> dict:
    """Build the Tile shards of `splits` (default params.data.splits) into `out_dir`, with
    report.json; returns the report. The folder is replaced only if every split succeeds."""
    splits = list(splits or params.data.splits)
    prep = params.prepare
    found = {split: _discover(params, split) for split in splits}  # fail fast, before any work
    tasks: list[PrepareTask] = []
    for split in splits:
        scenes = found[split][0]
        layouts = [scene_layout(s, prep) for s in scenes]
        _check_tile_ids(split, scenes, layouts)
        tasks += plan_tasks(scenes, layouts, prep.tiles_per_shard, first_index=len(tasks))

    stage = Stage("prepare", params, scheduler)
    with stage.output(Path(out_dir), inputs=[params.data.root], count_key="tiles") as out:
        staging = out.folder
        parts_dir = staging / PARTS
        parts_dir.mkdir()
        results = stage.map(partial(prepare_task, params=params, parts_dir=str(parts_dir)),
                            tasks)

        report: dict = {"source": params.data.source, "splits": {}}
        for split in splits:
            mine = [r for r in results if r["split"] == split]
            parts = [name for r in mine for name, _ in r["parts"]]
            for i, name in enumerate(parts):
                os.replace(parts_dir / name, staging / shard_name(split, i, len(parts)))
            scenes, excluded = found[split]
            report["splits"][split] = _split_report(
                [s for r in mine for s in r["scenes"]], len(scenes), excluded, len(parts))
        parts_dir.rmdir()
        for key in ("scenes", "tiles", "objects", "shards"):
            report[key] = sum(s[key] for s in report["splits"].values())
        report["skipped_scenes"] = sum(len(s["skipped_scenes"]) for s in report["splits"].values())
        report["dropped_instances"] = sum(sum(s["dropped"].values())
                                          for s in report["splits"].values())
        out.report = report
    return report
