"""New imagery: PNG, JPEG, TIFF and GeoTIFF scenes of any size, read window by window.

A scene is described once (`describe_scene`: size, bands, type, georeference, the 8-bit
stretch) from its header and a decimated read, so that the tile tasks never hold more than a
window of a large scene. TIFF and GeoTIFF are read by windows through rasterio (the `[geo]`
extra) with a bounded GDAL block cache; PNG and JPEG cannot be read by windows and are decoded
whole, under `prepare.max_image_pixels` like the iSAID scenes.

Bands: `imagery.bands` picks the bands read as R, G, B (one band = grey); without it a 1-band
scene is grey, a 3- or 4-band scene gives bands 1, 2, 3 (a 4th band is alpha or near infrared),
and any other count is refused. Imagery that is not 8-bit is stretched per band between the
scene's `percentile_low` and `percentile_high` (valid pixels only), so all tiles of a scene
share one stretch. Nodata pixels (the file's nodata value, `imagery.nodata`, an alpha band or an
internal mask) are black in the tile; a tile with more than `max_nodata_share` nodata is
skipped and counted. Each tile keeps its CRS and the affine transform from its own pixels to
map coordinates.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from pipeline.core.errors import BadImageError, BadParamsError, DuplicateNameError, EmptyInputError
from pipeline.core.imaging import PNG_SIGNATURE, image_size, png_is_complete
from pipeline.core.params import ImageryParams, PrepareParams
from pipeline.core.shards import safe_name
from schemas import Window

SOURCE = "imagery"
DECODED = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
WINDOWED = {".tif": "tiff", ".tiff": "tiff"}
SUFFIXES = {**DECODED, **WINDOWED}
GEO_EXTRA = "pip install 'geopixeld[geo]'"

__all__ = ["SOURCE", "SUFFIXES", "SceneInfo", "SceneReader", "describe_scene", "find_images",
           "scene_windows", "stretch_limits", "tile_id", "tile_transform", "to_rgb8"]


@dataclass(frozen=True)
class SceneInfo:
    """What the tile tasks need to read a scene: small and picklable."""

    name: str
    path: str
    format: str  # png | jpeg | tiff
    height: int
    width: int
    band_count: int
    dtype: str
    bands: tuple[int, ...]  # 1-based bands read as R, G, B (or one grey band)
    alpha: Optional[int]  # 1-based alpha band (decoded formats: the 4th channel)
    nodata: Optional[float]
    crs: Optional[str]
    transform: Optional[tuple[float, ...]]  # scene pixels -> map (a, b, c, d, e, f)
    stretch: Optional[tuple[tuple[float, float], ...]]  # per output band; None: no stretch

    @property
    def windowed(self) -> bool:
        return self.format == "tiff"

    @property
    def decoded_bytes(self) -> int:
        """Size of the whole scene decoded (what windowed reading avoids holding)."""
        return self.height * self.width * self.band_count * np.dtype(self.dtype).itemsize


# ---- discovery --------------------------------------------------------------------------------

def find_images(paths: Sequence[Path]) -> list[Path]:
    """The scene files named by `paths` (files, or folders whose image files are taken, not
    recursively), in the order given, folders sorted. Two scenes with one name are refused."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise BadImageError(f"unsupported image type {path.suffix!r} (expected one of "
                                    f"{', '.join(sorted(SUFFIXES))})", path)
            found.append(path)
        else:
            raise BadImageError("file not found", path)
    if not found:
        raise EmptyInputError("no images (.png, .jpg, .jpeg, .tif, .tiff) in the given paths",
                              ", ".join(str(p) for p in paths) or "(no path)")
    seen: dict[str, Path] = {}
    for path in found:
        safe_name(path.stem, f"image name ({path})")
        key = path.stem.lower()
        if key in seen:
            raise DuplicateNameError(f"{seen[key]} and {path} give the same scene name", path)
        seen[key] = path
    return found


def _rasterio():
    try:
        import rasterio
    except ImportError:
        return None
    return rasterio


def _gdal_env(params: ImageryParams):
    rasterio = _rasterio()
    return rasterio.Env(GDAL_CACHEMAX=params.gdal_cache_mb * 1024 * 1024,
                        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def describe_scene(path: Path, params: ImageryParams, prepare: PrepareParams) -> SceneInfo:
    """Read a scene's header (and, for a stretch, a decimated sample) into a SceneInfo.

    Raises BadImageError for an unreadable, truncated or oversized file or an unsupported band
    count, BadParamsError for `imagery.bands` naming a band the file lacks."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BadImageError(f"unsupported image type {path.suffix!r}", path)
    if kind == "tiff":
        return _describe_tiff(path, params)
    return _describe_decoded(path, kind, params, prepare)


def _choose_bands(count: int, params: ImageryParams, path: Path) -> tuple[int, ...]:
    if params.bands is not None:
        missing = [b for b in params.bands if b > count]
        if missing:
            raise BadParamsError(f"imagery.bands asks for band(s) {missing}, the file has "
                                 f"{count} band(s)", path)
        return tuple(params.bands)
    if count == 1:
        return (1,)
    if count in (3, 4):
        return (1, 2, 3)
    raise BadImageError(f"{count} bands: cannot tell which are red, green and blue; set "
                        f"imagery.bands (e.g. [3, 2, 1], or [1] for grey)", path)


def _describe_tiff(path: Path, params: ImageryParams) -> SceneInfo:
    rasterio = _rasterio()
    if rasterio is None:
        raise BadImageError(f"reading TIFF/GeoTIFF needs rasterio: {GEO_EXTRA}", path)
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.is_file():
        raise BadImageError("file not found", path)
    with _gdal_env(params), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            ds = rasterio.open(path)
        except RasterioIOError as exc:
            raise BadImageError(f"cannot read TIFF ({_first_line(exc)})", path) from None
        with ds:
            if ds.height * ds.width > params.max_scene_pixels:
                raise BadImageError(
                    f"scene is {ds.width}x{ds.height} = {ds.height * ds.width} pixels, over "
                    f"imagery.max_scene_pixels ({params.max_scene_pixels})", path)
            dtypes = set(ds.dtypes)
            if len(dtypes) != 1:
                raise BadImageError(f"bands of different types {sorted(dtypes)}", path)
            dtype = ds.dtypes[0]
            if not (np.issubdtype(np.dtype(dtype), np.integer)
                    or np.issubdtype(np.dtype(dtype), np.floating)):
                raise BadImageError(f"unsupported pixel type {dtype}", path)
            alpha = None
            for i, ci in enumerate(ds.colorinterp, start=1):
                if ci == ColorInterp.alpha:
                    alpha = i
            count = ds.count - (1 if alpha is not None and params.bands is None else 0)
            bands = _choose_bands(count, params, path)
            nodata = params.nodata if params.nodata is not None else ds.nodata
            crs = transform = None
            if ds.crs is not None:
                crs = crs_text(ds.crs)
                transform = tuple(float(v) for v in tuple(ds.transform)[:6])
            info = SceneInfo(name=path.stem, path=str(path), format="tiff", height=ds.height,
                             width=ds.width, band_count=ds.count, dtype=dtype, bands=bands,
                             alpha=alpha, nodata=nodata, crs=crs, transform=transform,
                             stretch=None)
            if _wants_stretch(dtype, params):
                sample, valid = _tiff_sample(ds, info, params)
                info = _with_stretch(info, sample, valid, params)
            else:
                _check_unstretched(dtype, params, path)
    return info


def crs_text(crs) -> str:
    """'EPSG:n' when the CRS is exactly an EPSG code, else its WKT."""
    try:
        authority = crs.to_authority(confidence_threshold=100)
    except Exception:  # a CRS GDAL cannot match to any authority
        authority = None
    if authority and authority[0] == "EPSG":
        return f"EPSG:{authority[1]}"
    return crs.to_wkt()


def _first_line(exc: BaseException) -> str:
    """GDAL's own words: rasterio often wraps them as 'See previous exception'."""
    cause = exc.__cause__ or exc.__context__
    if "previous exception" in str(exc) and cause is not None:
        exc = cause
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _describe_decoded(path: Path, kind: str, params: ImageryParams,
                      prepare: PrepareParams) -> SceneInfo:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise BadImageError("file not found", path) from None
    if kind == "png":
        height, width = image_size(head, path)
    else:  # JPEG: the header walk lives in cv2; decode is the only portable check
        height, width = _jpeg_size(path)
    if height * width > prepare.max_image_pixels:
        raise BadImageError(
            f"image is {width}x{height} = {height * width} pixels, over the limit of "
            f"{prepare.max_image_pixels} (prepare.max_image_pixels; PNG and JPEG are decoded "
            f"whole: convert large scenes to a tiled GeoTIFF)", path)
    # channels and depth come from the decoded file; the tile task decodes it again whole
    image = _decode_file(path)
    channels = 1 if image.ndim == 2 else image.shape[2]
    alpha = 4 if channels == 4 else None
    count = 3 if channels == 4 and params.bands is None else channels
    bands = _choose_bands(count, params, path)
    info = SceneInfo(name=path.stem, path=str(path), format=kind, height=height, width=width,
                     band_count=channels, dtype=str(image.dtype), bands=bands, alpha=alpha,
                     nodata=params.nodata, crs=None, transform=None, stretch=None)
    if _wants_stretch(info.dtype, params):
        step = max(1, int(np.ceil(np.sqrt(height * width / params.stretch_sample_pixels))))
        sample = _band_stack(image[::step, ::step], info)
        valid = _valid(sample, image[::step, ::step], info)
        info = _with_stretch(info, sample, valid, params)
    else:
        _check_unstretched(info.dtype, params, path)
    return info


def _jpeg_size(path: Path) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame marker, without decoding."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if data[:2] != b"\xff\xd8":
        raise BadImageError("not a JPEG file (bad signature)", path)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                break
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return height, width
        pos += 2 + length
    raise BadImageError("JPEG without a readable frame header (corrupt or truncated)", path)


def _decode_file(path: Path) -> np.ndarray:
    """Whole PNG/JPEG in RGB(A) channel order, native depth (8 or 16 bit)."""
    data = Path(path).read_bytes()
    if data[:8] == PNG_SIGNATURE and not png_is_complete(data):
        raise BadImageError("truncated PNG (no IEND chunk or bad chunk CRC)", path)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadImageError("cannot decode image (corrupt or truncated)", path)
    if img.dtype not in (np.uint8, np.uint16):
        raise BadImageError(f"unsupported pixel type {img.dtype}", path)
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [2, 1, 0, 3]]
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return np.ascontiguousarray(img)


# ---- 8-bit conversion -------------------------------------------------------------------------

def _wants_stretch(dtype: str, params: ImageryParams) -> bool:
    if params.stretch == "none":
        return False
    return np.dtype(dtype) != np.uint8 or params.stretch_uint8


def _check_unstretched(dtype: str, params: ImageryParams, path: Path) -> None:
    if np.issubdtype(np.dtype(dtype), np.floating):
        raise BadParamsError(f"imagery.stretch: 'none' cannot scale {dtype} pixels to 8 bits; "
                             f"use 'percentile'", path)


def stretch_limits(sample: np.ndarray, valid: np.ndarray, low: float,
                   high: float) -> tuple[tuple[float, float], ...]:
    """Per band (low, high) percentiles of the valid pixels of a (H, W, C) sample."""
    limits = []
    for c in range(sample.shape[2]):
        values = sample[:, :, c][valid]
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size == 0:
            limits.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(values, [low, high])
        if not hi > lo:
            hi = lo + 1.0
        limits.append((float(lo), float(hi)))
    return tuple(limits)


def _with_stretch(info: SceneInfo, sample: np.ndarray, valid: np.ndarray,
                  params: ImageryParams) -> SceneInfo:
    from dataclasses import replace

    limits = stretch_limits(sample, valid, params.percentile_low, params.percentile_high)
    return replace(info, stretch=limits)


def to_rgb8(bands: np.ndarray, stretch: Optional[Sequence[tuple[float, float]]]) -> np.ndarray:
    """(H, W, C) pixels of C = 1 or 3 bands -> (H, W, 3) uint8 RGB.

    With `stretch`, band c maps [low_c, high_c] linearly to [0, 255] (clipped); without it,
    8-bit pixels pass unchanged and wider integers are scaled by their type's range."""
    height, width, channels = bands.shape
    out = np.empty((height, width, channels), np.uint8)
    for c in range(channels):
        band = bands[:, :, c]
        if stretch is not None:
            lo, hi = stretch[c]
            scaled = band.astype(np.float32)
            scaled -= lo
            scaled *= 255.0 / (hi - lo)
            np.nan_to_num(scaled, copy=False, nan=0.0)
            np.clip(scaled, 0, 255, out=scaled)
            np.rint(scaled, out=scaled)
            out[:, :, c] = scaled
        elif band.dtype == np.uint8:
            out[:, :, c] = band
        else:
            info = np.iinfo(band.dtype)
            scaled = (band.astype(np.float32) - info.min) * (255.0 / (info.max - info.min))
            out[:, :, c] = np.rint(scaled)
    if channels == 1:
        return np.repeat(out, 3, axis=2)
    return out


def _band_stack(image: np.ndarray, info: SceneInfo) -> np.ndarray:
    """(H, W, C) of the chosen bands from a decoded (H, W) or (H, W, channels) array."""
    if image.ndim == 2:
        image = image[:, :, None]
    return image[:, :, [b - 1 for b in info.bands]]


def _valid(bands: np.ndarray, raw: Optional[np.ndarray], info: SceneInfo) -> np.ndarray:
    """Valid-pixel mask of a decoded window: not nodata in every chosen band, alpha > 0."""
    valid = np.ones(bands.shape[:2], bool)
    if info.nodata is not None:
        if np.isnan(info.nodata):
            valid &= ~np.all(np.isnan(bands), axis=2)
        else:
            valid &= ~np.all(bands == info.nodata, axis=2)
    if info.alpha is not None and raw is not None and raw.ndim == 3:
        valid &= raw[:, :, info.alpha - 1] > 0
    return valid


def _tiff_sample(ds, info: SceneInfo, params: ImageryParams) -> tuple[np.ndarray, np.ndarray]:
    """A decimated read (about stretch_sample_pixels pixels) of the chosen bands and mask."""
    from rasterio.enums import Resampling

    step = max(1.0, float(np.sqrt(info.height * info.width / params.stretch_sample_pixels)))
    shape = (max(1, int(info.height / step)), max(1, int(info.width / step)))
    data = ds.read(list(info.bands), out_shape=(len(info.bands), *shape),
                   resampling=Resampling.nearest)
    bands = np.moveaxis(data, 0, 2)
    valid = _valid(bands, None, info)
    if info.nodata is None and _has_mask(ds):
        valid &= ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest) > 0
    return bands, valid


def _has_mask(ds) -> bool:
    from rasterio.enums import MaskFlags

    return any(MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
               for flags in ds.mask_flag_enums)


# ---- windows and tiles ------------------------------------------------------------------------

def _spans(size: int, tile: int, stride: int) -> list[tuple[int, int]]:
    if size <= tile:
        return [(0, size)]
    spans: dict[tuple[int, int], None] = {}
    for start in range(0, size, stride):
        end = start + tile
        if end > size:
            start, end = size - tile, size
        spans.setdefault((start, end), None)
    return list(spans)


def scene_windows(height: int, width: int, tile_size: int, stride: int) -> list[Window]:
    """Windows of the devkit's layout (x outer, y inner, shifted back at the edges), applied
    to each axis on its own, so that a long strip is cut along its length too."""
    return [Window(y0=y0, y1=y1, x0=x0, x1=x1)
            for x0, x1 in _spans(width, tile_size, stride)
            for y0, y1 in _spans(height, tile_size, stride)]


def tile_id(scene: str, window: Window, whole: bool) -> str:
    """`{scene}_{y0}_{y1}_{x0}_{x1}`, or `{scene}` when the scene is one tile (as the devkit)."""
    if whole:
        return scene
    return f"{scene}_{window.y0}_{window.y1}_{window.x0}_{window.x1}"


def tile_transform(transform: Sequence[float], window: Window) -> list[float]:
    """The scene's pixel->map affine moved to the window's top-left pixel corner."""
    a, b, c, d, e, f = transform
    return [a, b, a * window.x0 + b * window.y0 + c, d, e, d * window.x0 + e * window.y0 + f]


class SceneReader:
    """Reads windows of one scene as (RGB uint8, valid mask); use as a context manager.

    TIFF: one window at a time through rasterio (GDAL cache bounded by imagery.gdal_cache_mb).
    PNG/JPEG: the file is decoded whole once, on the first read."""

    def __init__(self, info: SceneInfo, params: ImageryParams):
        self.info, self.params = info, params
        self._stack = ExitStack()
        self._ds = None
        self._image: Optional[np.ndarray] = None

    def __enter__(self) -> "SceneReader":
        if self.info.windowed:
            rasterio = _rasterio()
            if rasterio is None:
                raise BadImageError(f"reading TIFF/GeoTIFF needs rasterio: {GEO_EXTRA}",
                                    self.info.path)
            from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

            self._stack.enter_context(_gdal_env(self.params))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                try:
                    self._ds = self._stack.enter_context(rasterio.open(self.info.path))
                except RasterioIOError as exc:
                    self._stack.close()
                    raise BadImageError(f"cannot read TIFF ({_first_line(exc)})",
                                        self.info.path) from None
            self._has_mask = _has_mask(self._ds)
        return self

    def __exit__(self, *exc) -> None:
        self._image = None
        self._stack.close()

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB with nodata pixels black, and the (H, W) valid-pixel mask."""
        if self.info.windowed:
            bands, valid = self._read_tiff(window)
        else:
            if self._image is None:
                self._image = _decode_file(Path(self.info.path))
                if self._image.shape[:2] != (self.info.height, self.info.width):
                    raise BadImageError("image changed size since it was described",
                                        self.info.path)
            raw = self._image[window.y0:window.y1, window.x0:window.x1]
            bands = _band_stack(raw, self.info)
            valid = _valid(bands, raw, self.info)
        rgb = to_rgb8(bands, self.info.stretch)
        if not valid.all():
            rgb[~valid] = 0
        return rgb, valid

    def _read_tiff(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window as RioWindow

        rio_window = RioWindow(window.x0, window.y0, window.width, window.height)
        try:
            data = self._ds.read(list(self.info.bands), window=rio_window)
            bands = np.moveaxis(data, 0, 2)
            valid = _valid(bands, None, self.info)
            if self.info.nodata is None and self._has_mask:
                valid &= self._ds.dataset_mask(window=rio_window) > 0
        except RasterioIOError as exc:
            raise BadImageError(f"cannot read window rows {window.y0}:{window.y1}, columns "
                                f"{window.x0}:{window.x1} ({_first_line(exc)})",
                                self.info.path) from None
        return bands, valid
