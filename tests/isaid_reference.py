"""An independent, plain reading of the iSAID devkit rules, used only by tests.

Written straight from CAPTAIN-WHU/iSAID_Devkit (`preprocess/split.py`, `preprocess/preprocess.py`,
`cityscapesscripts/evaluation/instance.py` and `instances2dict_with_polygons.py`): windows cut as
`split.py` cuts them, then every tile handled as the devkit handles a tile file, with full
tile-sized masks and np.unique. Slow on purpose; it must not share code with pipeline.sources.isaid.
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# Scalar colour values from the devkit's labels.py (last column), label name -> value.
DEVKIT_LABELS = {
    "unlabeled": 0,
    "ship": 4128768,
    "storage_tank": 4144896,
    "baseball_diamond": 16128,
    "tennis_court": 8339200,
    "basketball_court": 12533504,
    "Ground_Track_Field": 16727808,
    "Bridge": 4161280,
    "Large_Vehicle": 8355584,
    "Small_Vehicle": 8323072,
    "Helicopter": 12517376,
    "Swimming_pool": 16711680,
    "Roundabout": 8371968,
    "Soccer_ball_field": 12549888,
    "plane": 16744192,
    "Harbor": 10183680,
}
VALUE_TO_LABEL = {v: k for k, v in DEVKIT_LABELS.items()}


def devkit_tiles(height: int, width: int, stem: str, patch: int = 800,
                 overlap: int = 200) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(tile name, (y0, y1, x0, x1)) as split.py writes them, first occurrence kept."""
    out: list[tuple[str, tuple[int, int, int, int]]] = []
    if height > 800 and width > 800:
        for x in range(0, width, patch - overlap):
            for y in range(0, height, patch - overlap):
                x_str, x_end = x, x + patch
                if x_end > width:
                    x_str -= x_end - width
                    x_end = width
                y_str, y_end = y, y + patch
                if y_end > height:
                    y_str -= y_end - height
                    y_end = height
                name = f"{stem}_{y_str}_{y_end}_{x_str}_{x_end}"
                if name not in [n for n, _ in out]:
                    out.append((name, (y_str, y_end, x_str, x_end)))
    else:
        out.append((stem, (0, height, 0, width)))
    return out


def read_rgb_values(path) -> np.ndarray:
    """The devkit loads masks as RGB (lycon), then R + 256 G + 256*256 B."""
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    rgb = rgb.astype(np.int64)
    return rgb[:, :, 0] + 256 * rgb[:, :, 1] + 256 * 256 * rgb[:, :, 2]


def devkit_instances(id_tile: np.ndarray, colour_tile: np.ndarray, min_points: int = 2,
                     min_area: int = 10) -> list[dict]:
    """Instances of one tile as the devkit's conversion keeps them (sorted by id)."""
    out = []
    for inst_id in np.unique(id_tile):
        if inst_id < 1000:
            continue
        mask = (id_tile == inst_id).astype(np.uint8)
        label = VALUE_TO_LABEL[int(np.unique(colour_tile[id_tile == inst_id])[0])]
        if label == "unlabeled":
            continue
        contours, _ = cv2.findContours(mask.copy(), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        polygons = [c.reshape(-1).tolist() for c in contours]
        if polygons == []:
            continue
        # The devkit tests the flattened [x, y, x, y, ...] length: <= 4 values = <= 2 points.
        if min(len(p) for p in polygons) <= 2 * min_points:
            continue
        area = int(mask.sum())
        if area <= min_area:
            continue
        ys, xs = np.nonzero(mask)
        rle = mask_utils.encode(np.asfortranarray(mask))
        out.append({
            "object_id": int(inst_id),
            "category": label,
            "area": area,
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                     float(ys.max() - ys.min() + 1)],
            "counts": rle["counts"].decode("ascii"),
        })
    return out


def devkit_scene(image_path, id_path=None, colour_path=None) -> list[dict]:
    """Every tile of a scene: name, window and (for labelled scenes) instances."""
    stem = image_path.stem
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    ids = read_rgb_values(id_path) if id_path else None
    colours = read_rgb_values(colour_path) if colour_path else None
    tiles = []
    for name, (y0, y1, x0, x1) in devkit_tiles(height, width, stem):
        objects = []
        if ids is not None:
            objects = devkit_instances(ids[y0:y1, x0:x1], colours[y0:y1, x0:x1])
        tiles.append({"tile_id": name, "window": (y0, y1, x0, x1), "objects": objects})
    return tiles
