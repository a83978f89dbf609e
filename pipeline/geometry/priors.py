"""The paper's priors: where an instance is (positional prior), what it is (category prior), and
whether it is described alone with a set-of-marks number or as part of a grid cluster.

An instance's point is the centroid of its mask's pixel centres (`pipeline.geometry.grid`'s
convention), so a thin or curved object is placed where its pixels are, not where its box is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from pipeline.core.errors import BadMaskError, BadParamsError
from pipeline.core.params import DEFAULT_PARAMS, PlanParams
from pipeline.geometry import masks
from pipeline.geometry.categories import plural, readable
from pipeline.geometry.grid import cell, region_name
from schemas import Cluster, ObjectInstance

GRID_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")

__all__ = ["InstanceMask", "InstanceSplit", "category_prior", "check_plan_params",
           "cluster_info_word", "instance_masks", "mark_order", "parse_grid", "split_instances"]


def parse_grid(spec: str, source: str = DEFAULT_PARAMS) -> tuple[int, int]:
    """'RxC' (rows x columns, e.g. '1x2' = one row of two columns) -> (rows, columns).
    `source`: where the spec came from (the params file), named by the error."""
    m = GRID_RE.match(spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise BadParamsError(f"plan.cluster_grids: {spec!r} is not ROWSxCOLUMNS (e.g. '3x3')",
                             source)
    return int(m.group(1)), int(m.group(2))


def category_prior(category: str, many: bool = False) -> str:
    """Category prior from the ground truth: 'Small_Vehicle' -> 'small vehicle' ('... vehicles')."""
    return plural(category) if many else readable(category)


def cluster_info_word(count: int, thresholds: Sequence[tuple[int, str]]) -> str | None:
    """The count word of a cluster of `count` members: first (n, word) with count >= n."""
    for n, word in thresholds:
        if count >= n:
            return word
    return None


def check_plan_params(params: PlanParams) -> None:
    """Refuse plan parameters that would make a cluster without a count word or a bad grid."""
    for spec in params.cluster_grids:
        parse_grid(spec, params.where("cluster_grids"))
    if cluster_info_word(params.cluster_min_members, params.cluster_info) is None:
        raise BadParamsError(
            f"plan.cluster_info: no word for a cluster of {params.cluster_min_members} members "
            f"(plan.cluster_min_members); add an entry with a count <= that",
            params.where("cluster_info"))


@dataclass(frozen=True, eq=False)
class InstanceMask:
    """An instance's mask cropped to its pixels' box, with the crop's offset and the centroid
    (tile pixels, continuous). An empty mask has a 0x0 crop and its box centre as centroid."""

    object_id: int
    category: str
    area: int
    mask: np.ndarray
    x0: int
    y0: int
    centroid: tuple[float, float]


def instance_masks(tile_id: str, height: int, width: int,
                   objects: Sequence[ObjectInstance]) -> list[InstanceMask]:
    """Decode each instance once (same order as `objects`), checking its size against the tile."""
    found = []
    for obj in objects:
        if list(obj.mask.size) != [height, width]:
            raise BadMaskError(f"tile {tile_id}: object {obj.object_id} has a "
                               f"{obj.mask.size[0]}x{obj.mask.size[1]} mask, the tile is "
                               f"{height}x{width}")
        crop, x0, y0 = masks.decode_crop(obj.mask)
        if crop.size == 0:
            bx, by, bw, bh = obj.bbox
            found.append(InstanceMask(obj.object_id, obj.category, obj.area,
                                      np.zeros((0, 0), np.uint8), int(bx), int(by),
                                      (bx + bw / 2, by + bh / 2)))
            continue
        m = cv2.moments(crop, binaryImage=True)  # exact pixel sums: the mean pixel position
        centroid = (m["m10"] / m["m00"] + x0 + 0.5, m["m01"] / m["m00"] + y0 + 0.5)
        found.append(InstanceMask(obj.object_id, obj.category, obj.area, crop, x0, y0, centroid))
    return found


@dataclass(frozen=True)
class InstanceSplit:
    """Which instances form grid clusters and which are left to be described one by one."""

    clusters: list[Cluster]
    individual_ids: list[int]


def split_instances(instances: Sequence[InstanceMask], width: int, height: int,
                    params: PlanParams) -> InstanceSplit:
    """Instance vs cluster split of one tile, with refined grids.

    A category with at least `cluster_min_count` instances offers its instances of area <=
    `cluster_max_area` as cluster candidates. Each group is named by the most specific region
    that holds it: grids are tried in `cluster_grids` order (finest first), and the first cell
    holding at least `cluster_region_share` of the remaining candidates (and at least
    `cluster_min_members`) becomes a cluster; this repeats on what is left. Candidates spread
    too widely for any cell are split on the last (coarsest) grid, one cluster per cell with
    enough members. Leftovers join the individual instances. Clusters are numbered c0, c1, ...
    by category name, then in the order they are formed.
    """
    check_plan_params(params)
    grids = [(spec, *parse_grid(spec)) for spec in params.cluster_grids]
    by_category: dict[str, list[InstanceMask]] = {}
    for inst in instances:
        by_category.setdefault(inst.category, []).append(inst)
    clustered: set[int] = set()
    clusters: list[Cluster] = []

    def add(category: str, spec: str, rows: int, cols: int, where: tuple[int, int],
            group: Sequence[InstanceMask]) -> None:
        ids = sorted(m.object_id for m in group)
        clusters.append(Cluster(
            cluster_id=f"c{len(clusters)}", category=category, grid=spec,
            region=region_name(rows, cols, *where),
            cluster_info=cluster_info_word(len(ids), params.cluster_info), object_ids=ids))
        clustered.update(ids)

    for category in sorted(by_category):
        members = by_category[category]
        if len(members) < params.cluster_min_count:
            continue
        remaining = [m for m in members if m.area <= params.cluster_max_area]
        while len(remaining) >= params.cluster_min_members:
            need = max(params.cluster_min_members,
                       math.ceil(params.cluster_region_share * len(remaining)))
            found = None
            for spec, rows, cols in grids:
                cells = _cells(remaining, width, height, rows, cols)
                where = max(sorted(cells), key=lambda k: len(cells[k]))
                if len(cells[where]) >= need:
                    found = (spec, rows, cols, where, cells[where])
                    break
            if found is None:  # spread out: one cluster per cell of the coarsest grid
                spec, rows, cols = grids[-1]
                cells = _cells(remaining, width, height, rows, cols)
                for where in sorted(cells):
                    if len(cells[where]) >= params.cluster_min_members:
                        add(category, spec, rows, cols, where, cells[where])
                break
            add(category, *found)
            remaining = [m for m in remaining if m.object_id not in clustered]
    individual = [inst.object_id for inst in instances if inst.object_id not in clustered]
    return InstanceSplit(clusters=clusters, individual_ids=individual)


def _cells(group: Sequence[InstanceMask], width: int, height: int, rows: int,
           cols: int) -> dict[tuple[int, int], list[InstanceMask]]:
    cells: dict[tuple[int, int], list[InstanceMask]] = {}
    for m in group:
        cells.setdefault(cell(*m.centroid, width, height, rows, cols), []).append(m)
    return cells


def mark_order(instances: Sequence[InstanceMask], individual_ids: Sequence[int],
               params: PlanParams) -> tuple[list[int], list[int]]:
    """Set-of-marks candidates in the order they get marks (area descending, then object id),
    and the individual instances too small to be marked (area < `min_mark_area`)."""
    wanted = set(individual_ids)
    chosen = [i for i in instances if i.object_id in wanted]
    eligible = sorted((i for i in chosen if i.area >= params.min_mark_area and i.mask.size),
                      key=lambda i: (-i.area, i.object_id))
    eligible_ids = {i.object_id for i in eligible}
    too_small = [i.object_id for i in chosen if i.object_id not in eligible_ids]
    return [i.object_id for i in eligible], too_small
