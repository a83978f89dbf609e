"""prepare, bad input: every kind stops with the right error naming the file (or, with
on_error 'skip', is skipped and counted), and a failed run leaves nothing half-written.

Scenes are small crops of the real P0005 (image, id and colour masks), damaged one way each.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import (
    BadImageError,
    BadMaskError,
    DuplicateNameError,
    EmptyInputError,
    UnsafePathError,
)
from pipeline.core.output_folders import MARKER
from pipeline.core.params import DataParams, Params, PrepareParams, RunnerParams
from pipeline.core.shards import list_shards
from pipeline.stages.prepare import discover_scenes, run_prepare, tile_scene

ID, COLOUR = "_instance_id_RGB", "_instance_color_RGB"


def params_for(root: Path, scheduler: str = "synchronous", **prepare) -> Params:
    return Params(data=DataParams(root=str(root), splits=["val"]),
                  prepare=PrepareParams(**prepare),
                  runner=RunnerParams(local_scheduler=scheduler, workers=2))


def write_scene(root: Path, stem: str, isaid_root: Path, size: int = 120) -> Path:
    """A size x size crop of the real P0005 with its masks, as root/val/images/<stem>*.png."""
    folder = root / "val" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ID, COLOUR):
        img = cv2.imread(str(isaid_root / "train" / "images" / f"P0005{suffix}.png"),
                         cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(folder / f"{stem}{suffix}.png"), img[:size, :size])
    return folder / f"{stem}.png"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height, and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF))


def tile_only(params: Params, name: str = "P0001"):
    scene = next(s for s in discover_scenes(params, "val") if s.name == name)
    return tile_scene(scene, params)


def leftovers(parent: Path) -> list[str]:
    """Staging folders or temporary files a failed run might have left."""
    return sorted(p.name for p in parent.rglob("*")
                  if p.name.endswith(".tmp") or ".staging-" in p.name or ".old-" in p.name)


# ---- images --------------------------------------------------------------------------------

def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image at all" * 10)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bomb(path: Path) -> None:
    path.write_bytes(png_header_only(200_000, 200_000))


@pytest.mark.parametrize("damage,words", [(_corrupt, "not a PNG|cannot decode"),
                                          (_truncated, "truncated"),
                                          (_bomb, "max_image_pixels")])
def test_bad_image_raises_naming_the_file(tmp_path, isaid_root, damage, words):
    image = write_scene(tmp_path, "P0001", isaid_root)
    damage(image)
    with pytest.raises(BadImageError, match=words) as info:
        tile_only(params_for(tmp_path))
    assert str(image) in info.value.one_line()


def test_pixel_limit_is_checked_on_real_images_too(tmp_path, isaid_root):
    image = write_scene(tmp_path, "P0001", isaid_root, size=120)
    with pytest.raises(BadImageError, match="14400 pixels") as info:
        tile_only(params_for(tmp_path, max_image_pixels=120 * 120 - 1))
    assert str(image) in info.value.one_line()


# ---- masks -----------------------------------------------------------------------------------

def _sixteen_bit(path: Path) -> None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), img.astype(np.uint16) * 257)


def _grey(path: Path) -> None:
    cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def _smaller(path: Path) -> None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), img[:100, :110])


@pytest.mark.parametrize("suffix", [ID, COLOUR])
@pytest.mark.parametrize("damage,words", [(_sixteen_bit, "uint16"), (_grey, "greyscale"),
                                          (_smaller, "110x100 but its image .* is 120x120"),
                                          (_corrupt, "not a PNG"), (_truncated, "truncated")])
def test_bad_mask_raises_naming_the_mask(tmp_path, isaid_root, suffix, damage, words):
    image = write_scene(tmp_path, "P0001", isaid_root)
    mask = image.with_name(f"P0001{suffix}.png")
    damage(mask)
    with pytest.raises(BadMaskError, match=words) as info:
        tile_only(params_for(tmp_path))
    assert info.value.path == str(mask)
    assert str(mask) in info.value.one_line()


@pytest.mark.parametrize("suffix", [ID, COLOUR])
def test_missing_mask_raises_at_discovery(tmp_path, isaid_root, suffix):
    image = write_scene(tmp_path, "P0001", isaid_root)
    mask = image.with_name(f"P0001{suffix}.png")
    mask.unlink()
    with pytest.raises(BadMaskError, match="missing") as info:
        discover_scenes(params_for(tmp_path), "val")
    assert str(mask) in info.value.one_line()


# ---- folders and names -------------------------------------------------------------------------

def test_empty_or_missing_folder_is_empty_input(tmp_path):
    with pytest.raises(EmptyInputError) as info:
        discover_scenes(params_for(tmp_path), "val")
    assert str(tmp_path / "val" / "images") in info.value.one_line()
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "images" / "P0001_instance_id_RGB.png").write_bytes(b"")
    with pytest.raises(EmptyInputError, match="no scene images") as info:
        run_prepare(params_for(tmp_path), tmp_path / "tiles")
    assert str(tmp_path / "val" / "images") in info.value.one_line()
    assert not (tmp_path / "tiles").exists()


def test_two_files_with_one_scene_name_are_duplicates(tmp_path, isaid_root):
    image = write_scene(tmp_path, "P0001", isaid_root)
    image.with_name("P0001.PNG").write_bytes(image.read_bytes())
    with pytest.raises(DuplicateNameError, match="P0001.PNG") as info:
        discover_scenes(params_for(tmp_path), "val")
    assert str(image.parent) in info.value.one_line()


@pytest.mark.parametrize("stem", ["P 0001", "-P0001", "P0001..x"])
def test_unsafe_scene_name_is_refused(tmp_path, isaid_root, stem):
    write_scene(tmp_path, stem, isaid_root)
    with pytest.raises(UnsafePathError) as info:
        discover_scenes(params_for(tmp_path), "val")
    assert stem in info.value.one_line()


# ---- the stage: nothing half-written, or skipped and counted -----------------------------------

def test_failed_run_leaves_no_output_and_no_partial_files(tmp_path, isaid_root):
    data = tmp_path / "data"
    for stem in ("P0001", "P0002", "P0003", "P0005"):
        write_scene(data, stem, isaid_root)
    _truncated(data / "val" / "images" / f"P0003{COLOUR}.png")
    build = tmp_path / "build"
    params = params_for(data, scheduler="threads", tiles_per_shard=1)
    with pytest.raises(BadMaskError, match="truncated"):
        run_prepare(params, build / "tiles")
    assert not (build / "tiles").exists()
    assert leftovers(tmp_path) == []

    (build / "tiles").mkdir(parents=True)
    (build / "tiles" / "val-00000-of-00001.parquet").write_bytes(b"previous")
    (build / "tiles" / MARKER).write_text('{"stage": "prepare"}')  # a previous run's output
    with pytest.raises(BadMaskError):
        run_prepare(params, build / "tiles")
    assert sorted(p.name for p in (build / "tiles").iterdir()) == [
        MARKER, "val-00000-of-00001.parquet"]
    assert (build / "tiles" / "val-00000-of-00001.parquet").read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_skip_mode_skips_bad_scenes_and_counts_them(tmp_path, isaid_root):
    tmp_path, out = tmp_path / "data", tmp_path / "tiles"  # output outside the data root
    for stem in ("P0001", "P0002", "P0003", "P0004", "P0005"):
        write_scene(tmp_path, stem, isaid_root)
    folder = tmp_path / "val" / "images"
    _truncated(folder / "P0002.png")
    (folder / f"P0003{ID}.png").unlink()
    _grey(folder / f"P0004{COLOUR}.png")
    params = params_for(tmp_path, scheduler="threads", on_error="skip", tiles_per_shard=1)
    report = run_prepare(params, out)
    val = report["splits"]["val"]
    assert (val["scenes"], val["scenes_tiled"], val["tiles"]) == (5, 2, 2)
    skipped = {s["scene"]: s for s in val["skipped_scenes"]}
    assert sorted(skipped) == ["P0002", "P0003", "P0004"]
    assert skipped["P0002"]["file"] == str(folder / "P0002.png")
    assert skipped["P0003"]["file"] == str(folder / f"P0003{ID}.png")
    assert "missing" in skipped["P0003"]["reason"]
    assert "greyscale" in skipped["P0004"]["reason"]
    assert report["skipped_scenes"] == 3
    assert [p.name for p in list_shards(out)] == [
        "val-00000-of-00002.parquet", "val-00001-of-00002.parquet"]
    assert leftovers(tmp_path.parent) == []
