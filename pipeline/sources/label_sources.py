"""Existing labels for new imagery: DOTA oriented boxes, COCO instances, GeoJSON polygons.

Every source becomes `SceneLabel`s in the scene's pixel frame (x right, y down, pixel corners:
pixel (c, r) spans [c, c+1] x [r, r+1]), so that one rasteriser cuts them to any tile window.
Polygons are rasterised by pixel centre (shapely); COCO masks stay rasters (cropped to their box).

- DOTA: one file per scene, `DIR/<scene>.txt`, lines `x1 y1 x2 y2 x3 y3 x4 y4 category
  [difficult]` (the `imagesource:`/`gsd:` header lines are skipped). A box is the convex hull
  of its four points: a box of zero area or with collinear points is degenerate, skipped and
  counted. Object id = the box's line number in the file.
- COCO: one json for all scenes, images matched to scenes by file stem, object id = the
  annotation id, category id = the file's (checked by `pipeline.sources.coco_source.read_coco`).
- GeoJSON: Polygon/MultiPolygon features in map coordinates, category from the property named
  `imagery.category_property` (a string; an integer class code is taken as its decimal text,
  3 -> "3", and as the category's id in the COCO export; none or empty: the unknown category;
  any other value is refused), object id = the feature's integer `id` (within int64; a larger
  one, a float or an object is refused) or, for a string id or none, its position (from 1). Other RFC 7946 geometries (points, lines, null)
  are skipped and counted as 'not_polygon'; an unknown geometry type is refused. The file's
  CRS is its legacy `crs` member, else `imagery.geojson_crs`, else WGS 84 lon/lat (RFC 7946).
  Features are reprojected to a scene in another CRS with pyproj (the `[geo]` extra), or
  refused with one line saying so.

Every coordinate, id and name is checked by `pipeline.geometry.checks` (finite numbers within 2**53,
bounded point counts, typed fields) and every JSON file read by `pipeline.core.user_files`.

Boxes and polygons reaching outside the scene are clipped to it ("clipped"); those wholly
outside are skipped ("outside_image"). Counts go into the caller's Counter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import shapely
from shapely.affinity import affine_transform
from shapely.errors import GEOSException
from shapely.geometry import MultiPoint, box, shape
from shapely.geometry.base import BaseGeometry

from pipeline.core.errors import BadAnnotationError, EmptyInputError
from pipeline.core.params import ImageryParams
from pipeline.core.user_files import read_user_json, read_user_text
from pipeline.geometry import checks as user_geometry
from pipeline.geometry import masks
from pipeline.geometry.categories import ISAID_PALETTE, UNKNOWN_CATEGORY
from pipeline.sources.coco_source import read_coco
from schemas import RLE, Window

# Polygons with more vertices than this are prepared (indexed) before their pixels are tested.
PREPARE_ABOVE = 64
# a DOTA label file is one line a box: 64 MB is over a million boxes for one scene
MAX_DOTA_BYTES = 64 << 20
# a DOTA coordinate: a plain decimal number (not 'nan', 'inf', '1_000' or other digits)
DOTA_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# GeoJSON geometry types (RFC 7946) that are not polygons: skipped and counted
OTHER_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString",
                    "GeometryCollection")
WGS84 = "OGC:CRS84"  # lon/lat, the CRS of a GeoJSON without a `crs` member
DOTA_HEADERS = ("imagesource:", "gsd:")

_CANONICAL = {re.sub(r"[\s_-]+", "_", name).lower(): name for name in ISAID_PALETTE}

__all__ = ["GeoLabels", "LabelIndex", "SceneLabel", "canonical_category", "clip_to_scene",
           "dota_label_file", "geojson_scene_labels", "parse_dota", "rasterize",
           "read_coco_labels", "read_geojson", "same_crs"]


@dataclass(frozen=True, eq=False)
class SceneLabel:
    """One labelled object in scene pixels: a polygon (`geometry`) or a raster crop whose
    top-left pixel is (x0, y0)."""

    object_id: int
    category: str
    geometry: Optional[BaseGeometry] = None
    crop: Optional[np.ndarray] = None
    category_id: Optional[int] = None  # the id the label file gives the category, if any
    x0: int = 0
    y0: int = 0
    difficult: bool = False

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in scene pixels (corners)."""
        if self.geometry is not None:
            return tuple(self.geometry.bounds)  # type: ignore[return-value]
        h, w = self.crop.shape
        return (self.x0, self.y0, self.x0 + w, self.y0 + h)


def canonical_category(name: str) -> str:
    """iSAID's spelling for an iSAID/DOTA category ('small-vehicle' -> 'Small_Vehicle'), other
    names with spaces and hyphens as underscores; an empty name is the unknown category."""
    key = re.sub(r"[\s_-]+", "_", str(name).strip()).lower().strip("_")
    if not key:
        return UNKNOWN_CATEGORY
    return _CANONICAL.get(key, key)


# ---- rasterising ------------------------------------------------------------------------------

def rasterize(geometry: BaseGeometry, window: Window) -> np.ndarray:
    """A polygon (scene pixels) as the window's HxW uint8 mask: the pixels whose centre lies
    inside it (holes excluded), tested only within the polygon's box."""
    mask = np.zeros((window.height, window.width), np.uint8)
    gx0, gy0, gx1, gy1 = geometry.bounds
    c0, c1 = max(int(np.floor(gx0)), window.x0), min(int(np.ceil(gx1)), window.x1)
    r0, r1 = max(int(np.floor(gy0)), window.y0), min(int(np.ceil(gy1)), window.y1)
    if c0 >= c1 or r0 >= r1:
        return mask
    if shapely.get_num_coordinates(geometry) > PREPARE_ABOVE:
        # prepare a private copy: a prepared geometry is not safe to share between threads
        geometry = shapely.transform(geometry, lambda xy: xy)
        shapely.prepare(geometry)
    xs, ys = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
    inside = shapely.contains_xy(geometry, xs, ys)
    mask[r0 - window.y0:r1 - window.y0, c0 - window.x0:c1 - window.x0] = inside
    return mask


def label_mask(label: SceneLabel, window: Window) -> np.ndarray:
    """The label's pixels inside `window` as an HxW uint8 mask."""
    if label.geometry is not None:
        return rasterize(label.geometry, window)
    mask = np.zeros((window.height, window.width), np.uint8)
    h, w = label.crop.shape
    y0, y1 = max(window.y0, label.y0), min(window.y1, label.y0 + h)
    x0, x1 = max(window.x0, label.x0), min(window.x1, label.x0 + w)
    if y0 < y1 and x0 < x1:
        mask[y0 - window.y0:y1 - window.y0, x0 - window.x0:x1 - window.x0] = \
            label.crop[y0 - label.y0:y1 - label.y0, x0 - label.x0:x1 - label.x0]
    return mask


class LabelIndex:
    """A scene's labels with their boxes in one array, to find those reaching a window fast."""

    def __init__(self, labels: Sequence[SceneLabel]):
        self.labels = list(labels)
        self._bounds = (np.asarray([l.bounds for l in self.labels], np.float64)
                        if self.labels else np.zeros((0, 4)))

    def __len__(self) -> int:
        return len(self.labels)

    def in_window(self, window: Window) -> list[SceneLabel]:
        b = self._bounds
        hit = ((b[:, 0] < window.x1) & (b[:, 2] > window.x0)
               & (b[:, 1] < window.y1) & (b[:, 3] > window.y0))
        return [self.labels[i] for i in np.flatnonzero(hit)]

    def masks(self, window: Window) -> list[tuple[SceneLabel, np.ndarray]]:
        """(label, HxW mask) of every label with at least one pixel in `window`."""
        found = []
        for label in self.in_window(window):
            mask = label_mask(label, window)
            if mask.any():
                found.append((label, mask))
        return found


def clip_to_scene(labels: Sequence[SceneLabel], height: int, width: int,
                  counts: Counter) -> list[SceneLabel]:
    """Polygons cut to the scene: partly outside -> clipped, wholly outside -> skipped."""
    frame = box(0, 0, width, height)
    kept = []
    for label in labels:
        if label.geometry is None:
            kept.append(label)
            continue
        if label.geometry.within(frame):
            kept.append(label)
            continue
        inside = _polygonal(label.geometry.intersection(frame))
        if inside is None or inside.area <= 0:
            counts["outside_image"] += 1
            continue
        counts["clipped"] += 1
        kept.append(replace(label, geometry=inside))
    return kept


def _polygonal(geometry: BaseGeometry) -> Optional[BaseGeometry]:
    """The polygon parts of a geometry (an intersection may add lines and points)."""
    if geometry.is_empty:
        return None
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type in ("Polygon",
                                                                            "MultiPolygon")]
    return shapely.union_all(parts) if parts else None


# ---- DOTA -------------------------------------------------------------------------------------

def dota_label_file(folder: Path, scene: str) -> Optional[Path]:
    """`folder/<scene>.txt` (any case of the suffix), or None."""
    for suffix in (".txt", ".TXT"):
        path = Path(folder) / f"{scene}{suffix}"
        if path.is_file():
            return path
    return None


def parse_dota(path: Path, params: ImageryParams, counts: Counter) -> list[SceneLabel]:
    """The boxes of one DOTA label file (scene pixels). Degenerate boxes (zero area, collinear
    points, area <= imagery.min_label_area) are skipped and counted as 'degenerate'; difficult
    ones are dropped unless imagery.keep_difficult. A malformed line raises BadAnnotationError
    naming the file and the line."""
    path = Path(path)
    text = read_user_text(path, "DOTA label file", max_bytes=MAX_DOTA_BYTES)
    labels = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.lower().startswith(DOTA_HEADERS):
            continue
        fields = line.split()
        if len(fields) not in (9, 10):
            raise BadAnnotationError(
                f"line {number}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', got "
                f"{len(fields)} fields", path)
        if not all(DOTA_NUMBER_RE.fullmatch(v) for v in fields[:8]):
            raise BadAnnotationError(f"line {number}: coordinates must be numbers", path)
        coords = [float(v) for v in fields[:8]]
        if not all(user_geometry.is_number(v) for v in coords):
            raise BadAnnotationError(f"line {number}: coordinates must be finite numbers "
                                     "within +-2**53", path)
        difficult = False
        if len(fields) == 10:
            if fields[9] not in ("0", "1"):
                raise BadAnnotationError(f"line {number}: difficult must be 0 or 1, got "
                                         f"{fields[9]!r}", path)
            difficult = fields[9] == "1"
        counts["boxes"] += 1
        if difficult and not params.keep_difficult:
            counts["difficult_dropped"] += 1
            continue
        hull = MultiPoint(list(zip(coords[0::2], coords[1::2]))).convex_hull
        if hull.geom_type != "Polygon" or hull.area <= params.min_label_area:
            counts["degenerate"] += 1
            continue
        labels.append(SceneLabel(number, canonical_category(fields[8]), geometry=hull,
                                 difficult=difficult))
    return labels


# ---- COCO -------------------------------------------------------------------------------------

def read_coco_labels(path: Path, scenes: dict[str, tuple[int, int]],
                     counts: Counter) -> dict[str, list[SceneLabel]]:
    """Labels per scene name from a COCO json (images matched by file stem). Scene sizes
    (height, width) must agree with the json."""
    path = Path(path)
    found: dict[str, list[SceneLabel]] = {}
    lower = {name.lower(): name for name in scenes}
    for entry in read_coco(path):
        name = lower.get(Path(entry.file_name).stem.lower())
        if name is None:
            counts["unmatched_images"] += 1
            continue
        height, width = scenes[name]
        if (entry.height, entry.width) != (height, width):
            raise BadAnnotationError(
                f"image {entry.file_name} is {entry.width}x{entry.height} in the json, the scene "
                f"{name} is {width}x{height} (width x height)", path)
        labels = []
        for ann in entry.annotations:
            if ann.iscrowd:
                counts["crowd"] += 1
                continue
            crop, x0, y0 = masks.decode_crop(_compressed(ann.segmentation, height, width))
            if crop.size == 0:
                counts["empty_mask"] += 1
                continue
            labels.append(SceneLabel(ann.object_id, canonical_category(ann.category),
                                     crop=crop, x0=x0, y0=y0, category_id=ann.category_id))
        found[name] = labels
    return found


def _compressed(segmentation, height: int, width: int) -> RLE:
    """A COCO segmentation checked and clipped by `read_coco` as a compressed RLE (no
    full-size array is made)."""
    rle = user_geometry.coco_rle(segmentation, height, width)
    return RLE(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


# ---- GeoJSON ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeoLabels:
    """The polygons of a GeoJSON file, in its own CRS."""

    path: str
    crs: str
    declared: bool  # the CRS came from the file or imagery.geojson_crs (not the RFC default)
    features: tuple[SceneLabel, ...]  # geometries in `crs`


_URN_RE = re.compile(r"^urn:ogc:def:crs:(?P<auth>[A-Za-z]+):[0-9.]*:(?P<code>[A-Za-z0-9]+)$")


def _crs_name(name: str) -> str:
    """'urn:ogc:def:crs:EPSG::32633' -> 'EPSG:32633', '...OGC:1.3:CRS84' -> 'OGC:CRS84'."""
    m = _URN_RE.match(name.strip())
    if m:
        return f"{m.group('auth').upper()}:{m.group('code')}"
    return name.strip()


def read_geojson(path: Path, params: ImageryParams, counts: Counter) -> GeoLabels:
    """Read a GeoJSON FeatureCollection (or one Feature) of polygons; other geometry types
    are skipped and counted as 'not_polygon'."""
    path = Path(path)
    raw = read_user_json(path, "GeoJSON file")
    if not isinstance(raw, dict) or raw.get("type") not in ("FeatureCollection", "Feature"):
        raise BadAnnotationError("not a GeoJSON FeatureCollection or Feature", path)
    items = raw.get("features") if raw["type"] == "FeatureCollection" else [raw]
    if not isinstance(items, list):
        raise BadAnnotationError("'features' is not a list", path)
    declared = True
    crs_member = raw.get("crs")
    if crs_member is not None:
        name = (crs_member.get("properties") or {}).get("name") if isinstance(crs_member,
                                                                                dict) else None
        if not isinstance(name, str) or not name.strip():
            raise BadAnnotationError("'crs' member without a properties.name (e.g. "
                                     "'urn:ogc:def:crs:EPSG::32633')", path)
        crs = _crs_name(name)
    elif params.geojson_crs:
        crs = params.geojson_crs
    else:
        crs, declared = WGS84, False
    features = []
    for i, feature in enumerate(items, start=1):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise BadAnnotationError(f"feature {i} is not a GeoJSON Feature", path)
        where = f"feature {i}"
        shape_of = feature.get("geometry")
        if shape_of is None:  # an unlocated feature (RFC 7946 allows a null geometry)
            counts["not_polygon"] += 1
            continue
        if not isinstance(shape_of, dict):
            raise BadAnnotationError(f"{where}: geometry must be an object or null", path)
        kind = shape_of.get("type")
        if kind in OTHER_GEOMETRIES:
            counts["not_polygon"] += 1
            continue
        if kind not in ("Polygon", "MultiPolygon"):
            shown = repr(kind[:40]) if isinstance(kind, str) else "missing"
            raise BadAnnotationError(f"{where}: geometry type {shown} is not a GeoJSON "
                                     "geometry (Polygon and MultiPolygon are read)", path)
        props = feature.get("properties")
        if props is not None and not isinstance(props, dict):
            raise BadAnnotationError(f"{where}: properties must be an object or null", path)
        category = (props or {}).get(params.category_property)
        # an integer class code is the file's own category id (and its name, as text)
        category_id = category if user_geometry.is_int(category) else None
        if category is not None and not (isinstance(category, str) and not category.strip()):
            category = user_geometry.category_name(
                category, where, path, integers=True,
                what=f"property {params.category_property[:40]!r}")
        object_id = _feature_id(feature.get("id"), i, path)
        user_geometry.map_geometry(shape_of, where, path)
        try:
            geom = shape(shape_of)
        except (ValueError, TypeError, AttributeError, IndexError, GEOSException) as exc:
            raise BadAnnotationError(f"{where}: malformed {kind} ({exc})", path) from None
        if not geom.is_valid:
            try:
                geom = _polygonal(shapely.make_valid(geom))
            except GEOSException:  # e.g. a ring collapsed to a point, with a hole
                geom = None
            counts["repaired"] += 1
            if geom is None:
                counts["degenerate"] += 1
                continue
        features.append(SceneLabel(object_id, canonical_category(category or ""), geometry=geom,
                                   category_id=category_id))
    ids = [f.object_id for f in features]
    if len(set(ids)) != len(ids):
        raise BadAnnotationError("feature ids repeat (object ids must be unique)", path)
    if not declared and features:
        x0, y0, x1, y1 = shapely.union_all([f.geometry for f in features]).bounds
        if min(x0, y0) < -180 or x1 > 180 or y1 > 90 or y0 < -90:
            raise BadAnnotationError(
                "no 'crs' member, so the coordinates should be WGS 84 longitude/latitude (RFC "
                f"7946), but they reach ({x0:.6g}, {y0:.6g}, {x1:.6g}, {y1:.6g}); add a 'crs' "
                "member or set imagery.geojson_crs", path)
    return GeoLabels(path=str(path), crs=crs, declared=declared, features=tuple(features))


def _feature_id(value: object, position: int, path: Path) -> int:
    """A feature's object id: its integer `id` (within int64, as ids are stored); a string id
    or none at all gives its position (from 1); any other id is refused."""
    if value is None or isinstance(value, str):
        return position
    if not user_geometry.is_int(value):
        raise BadAnnotationError(f"feature {position}: id must be an integer or a string, not "
                                 f"{user_geometry.kind_of(value)}", path)
    return user_geometry.object_id(value, f"feature {position}", path)


def _pyproj():
    try:
        import pyproj
    except ImportError:
        return None
    return pyproj


def same_crs(a: str, b: str) -> bool:
    """Whether two CRS strings name one CRS (pyproj compares them when installed)."""
    if a.strip().upper() == b.strip().upper():
        return True
    pyproj = _pyproj()
    if pyproj is None:
        return False
    try:
        return pyproj.CRS.from_user_input(a).equals(pyproj.CRS.from_user_input(b),
                                                    ignore_axis_order=True)
    except pyproj.exceptions.CRSError:
        return False


def reproject(geometry: BaseGeometry, source: str, target: str, path: str) -> BaseGeometry:
    """`geometry` from CRS `source` to `target` (x = easting/longitude), with pyproj."""
    pyproj = _pyproj()
    if pyproj is None:
        raise BadAnnotationError(
            f"geometries in {source} must be reprojected to {_short(target)}: that needs pyproj "
            f"(pip install 'geopixeld[geo]'), or reproject the file to the scene's CRS", path)
    try:
        transformer = pyproj.Transformer.from_crs(source, target, always_xy=True)
    except pyproj.exceptions.CRSError as exc:
        raise BadAnnotationError(f"cannot reproject from {source} to {_short(target)} "
                                 f"({exc})", path) from None
    return shapely.transform(geometry, lambda xy: np.column_stack(
        transformer.transform(xy[:, 0], xy[:, 1])))


def _short(crs: str) -> str:
    return crs if len(crs) < 40 else crs[:37] + "..."


def geojson_scene_labels(geo: GeoLabels, scene: str, scene_crs: Optional[str],
                         transform: Optional[Sequence[float]], height: int, width: int,
                         counts: Counter) -> list[SceneLabel]:
    """The GeoJSON polygons that reach a georeferenced scene, in its pixel frame."""
    if scene_crs is None or transform is None:
        raise BadAnnotationError(f"GeoJSON labels are in map coordinates, but scene {scene} "
                                 f"has no CRS (use a GeoTIFF, or COCO labels)", geo.path)
    a, b, c, d, e, f = transform
    det = a * e - b * d
    if det == 0:
        raise BadAnnotationError(f"scene {scene}: its transform is not invertible", geo.path)
    # inverse affine: map -> pixel
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    same = same_crs(geo.crs, scene_crs)
    labels = []
    for label in geo.features:
        object_id, geom = label.object_id, label.geometry
        if not same:
            geom = reproject(geom, geo.crs, scene_crs, geo.path)
            if not np.all(np.isfinite(shapely.get_coordinates(geom))):
                counts["reprojection_failed"] += 1
                continue
        pixels = affine_transform(geom, [ia, ib, id_, ie, ic, if_])
        if not np.isfinite(shapely.get_coordinates(pixels)).all():
            raise BadAnnotationError(f"feature with object id {object_id}: its coordinates "
                                     f"do not map to finite pixels of scene {scene}", geo.path)
        if pixels.area <= 0:
            counts["degenerate"] += 1
            continue
        labels.append(replace(label, geometry=pixels))
    if not same:
        counts["reprojected"] += len(labels)
    return clip_to_scene(labels, height, width, counts)


def check_label_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise EmptyInputError("DOTA label folder not found", folder)
    return folder
