"""`geopixeld estimate`: plan a dataset in memory (prepare and plan, nothing written, no model
call) so that `pipeline.core.estimate` can state the bill of annotating it."""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core.estimate import Planned
from pipeline.core.params import Params
from pipeline.stages.plan import plan_tile
from pipeline.stages.prepare import discover_scenes, tile_scene

__all__ = ["plan_in_memory"]


def plan_in_memory(params: Params, splits: Optional[Sequence[str]] = None) -> Planned:
    """Tile every scene of `splits` (default: data.splits) and plan every tile, as the
    prepare and plan stages would, keeping only the requests and the tiles' sizes."""
    requests, sizes, with_objects = [], {}, set()
    for split in splits or params.data.splits:
        for scene in discover_scenes(params, split):
            tiles, _ = tile_scene(scene, params)
            for tile in tiles:
                _, reqs = plan_tile(tile, params.plan)
                requests.extend(reqs)
                sizes[tile.tile_id] = (tile.width, tile.height)
                if tile.objects:
                    with_objects.add(tile.tile_id)
    return Planned(requests, sizes, frozenset(with_objects))
