"""Image decoding and encoding with the checks bad input needs (size limit, depth, channels)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import BadImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # decodes straight to RGB (newer OpenCV)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_size(data: bytes, path: str | Path = "<bytes>") -> tuple[int, int]:
    """(height, width) from a PNG header, without decoding: guards against decompression bombs."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise BadImageError("not a PNG file (bad signature or header)", path)
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _imdecode(data: bytes, flags: int) -> np.ndarray | None:
    """cv2.imdecode, None for bytes it cannot decode (OpenCV asserts on empty input and raises
    cv2.error on some corrupt headers instead of returning None)."""
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None


def image_size(data: bytes, path: str | Path) -> tuple[int, int]:
    """(height, width) of a PNG or JPEG from its header; other formats are decoded."""
    if not data:
        raise BadImageError("empty file (0 bytes)", path)
    if data[:8] == PNG_SIGNATURE:
        return png_size(data, path)
    img = _imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadImageError("cannot decode image (corrupt or unsupported format)", path)
    return img.shape[0], img.shape[1]


def to_rgb8(img: np.ndarray, path: str | Path) -> np.ndarray:
    """Any decoded cv2 image (grey, BGR, BGRA; 8 or 16 bit) -> HxWx3 uint8 RGB."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise BadImageError(f"unsupported pixel type {img.dtype}", path)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise BadImageError(f"unsupported channel count {channels}", path)


def decode_image(data: bytes, path: str | Path, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to RGB uint8, refusing images over `max_pixels` before decoding."""
    height, width = image_size(data, path)
    if height * width > max_pixels:
        raise BadImageError(
            f"image is {width}x{height} = {height * width} pixels, over the limit of "
            f"{max_pixels} (max_image_pixels)", path)
    if data[:8] == PNG_SIGNATURE and not png_is_complete(data):
        raise BadImageError("truncated PNG (no IEND chunk or bad chunk CRC)", path)
    img = _imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BadImageError("cannot decode image (corrupt or truncated)", path)
    return to_rgb8(img, path)


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """Read an image file as RGB uint8 with the checks of `decode_image`."""
    from pipeline.core.user_files import read_user_bytes

    data = read_user_bytes(path, "image", error=BadImageError)
    return decode_image(data, path, max_pixels)


def png_is_complete(data: bytes) -> bool:
    """Walk the PNG chunks: every chunk whole with a correct CRC, ending with IEND."""
    pos = 8
    n = len(data)
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > n:
            return False
        crc = struct.unpack(">I", data[end - 4:end])[0]
        if zlib.crc32(data[pos + 4:end - 4]) & 0xFFFFFFFF != crc:
            return False
        if ctype == b"IEND":
            return True
        pos = end
    return False


def encode_png(rgb: np.ndarray, compression: int = 1) -> bytes:
    """RGB uint8 -> PNG bytes (deterministic for the same pixels and level). Level 0 stores the
    pixels unfiltered: row filters only help a compressor, and skipping them makes level 0
    about ten times faster than level 1 for about twice the bytes."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    if compression == 0 and hasattr(cv2, "IMWRITE_PNG_FILTER"):  # newer OpenCV
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise BadImageError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes made by this pipeline -> RGB uint8."""
    if _IMREAD_RGB is not None:
        img = _imdecode(data, _IMREAD_RGB)
    else:
        img = _imdecode(data, cv2.IMREAD_COLOR)
        img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img is None:
        raise BadImageError("cannot decode PNG bytes")
    return img
