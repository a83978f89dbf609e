"""The grid every position word comes from: one cell rule, one centroid convention, one naming.

Geometry is continuous: a tile of width W spans x in [0, W], and pixel (column c, row r) has its
centre at (c + 0.5, r + 0.5). An object's point is the centroid of its pixel centres. Cells are
split at W*k/cols and H*k/rows; a point on a split line belongs to the later cell. The planner's
positional prior, the cluster regions and the template backend's attributes all name cells
here, so an object on a cell boundary gets one name everywhere.
"""

from __future__ import annotations

import math

# The paper's 3x3 cell names, row by row.
POSITIONS_3X3: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# Region names of the refined cluster grids (rows, columns) -> names row by row.
REGION_NAMES: dict[tuple[int, int], tuple[tuple[str, ...], ...]] = {
    (3, 3): POSITIONS_3X3,
    (2, 2): (("top left", "top right"), ("bottom left", "bottom right")),
    (1, 2): (("left side", "right side"),),
    (2, 1): (("top half",), ("bottom half",)),
    (1, 1): (("whole image",),),
}


def region_name(rows: int, cols: int, row: int, col: int) -> str:
    """Name of cell (row, col) of a rows x cols grid; grids without names get 'row r, column c'."""
    names = REGION_NAMES.get((rows, cols))
    if names is not None:
        return names[row][col]
    return f"row {row + 1}, column {col + 1}"


def cell(x: float, y: float, width: int, height: int, rows: int, cols: int) -> tuple[int, int]:
    """(row, col) of the continuous point (x, y) in a rows x cols grid over a width x height tile."""
    col = math.floor(x * cols / width) if width > 0 else 0
    row = math.floor(y * rows / height) if height > 0 else 0
    return min(max(row, 0), rows - 1), min(max(col, 0), cols - 1)


def position(x: float, y: float, width: int, height: int, grid: int = 3) -> str:
    """The name of the cell holding the continuous point (x, y); grid=3 gives the paper's names."""
    return region_name(grid, grid, *cell(x, y, width, height, grid, grid))


def pixel_position(cx: float, cy: float, width: int, height: int, grid: int = 3) -> str:
    """`position` of a centroid given in pixel-index coordinates (OpenCV moments, the
    measurements' cx/cy), moved to pixel centres first."""
    return position(cx + 0.5, cy + 0.5, width, height, grid)
