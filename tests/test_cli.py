"""The CLI surface: --help for every stage, and user mistakes as one line + exit 2 with
nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = ["prepare", "plan", "annotate-holistic", "annotate-instances",
               "annotate-clusters", "compose", "export", "build", "summary", "estimate"]


def _cli(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_explains_itself(sub, tmp_path, venv_env):
    proc = _cli([sub, "--help"], tmp_path, venv_env)
    assert proc.returncode == 0
    assert "Usage" in proc.stdout and len(proc.stdout.splitlines()) > 5


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_empty_folder(tmp_path, venv_env):
    (tmp_path / "root" / "val" / "images").mkdir(parents=True)
    proc = _cli(["prepare", "--root", str(tmp_path / "root"), "--split", "val",
                 "--out", str(tmp_path / "out")], tmp_path, venv_env)
    _assert_one_line_error(proc, "val")
    assert not (tmp_path / "out").exists()


def test_bad_parameter_file(tmp_path, venv_env):
    (tmp_path / "params.yaml").write_text("prepare:\n  tile_size: -5\n")
    proc = _cli(["prepare", "--out", str(tmp_path / "out")], tmp_path, venv_env)
    _assert_one_line_error(proc, "params.yaml", "prepare.tile_size")
    assert not (tmp_path / "out").exists()


def test_corrupt_png_names_the_file(tmp_path, isaid_root, venv_env):
    root = tmp_path / "root"
    shutil.copytree(isaid_root / "val", root / "val")
    victim = root / "val" / "images" / "P0004.png"
    victim.write_bytes(victim.read_bytes()[: 5000])
    proc = _cli(["prepare", "--root", str(root), "--split", "val", "--out",
                 str(tmp_path / "out")], tmp_path, venv_env)
    _assert_one_line_error(proc, "P0004.png")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_build_runs_every_stage_for_one_split(tmp_path, isaid_root, venv_env):
    proc = _cli(["build", "--source", "isaid", "--root", str(isaid_root), "--split", "val",
                 "--out", str(tmp_path / "b")], tmp_path, venv_env)
    assert proc.returncode == 0, proc.stderr
    for sub in ["tiles", "plan", "responses/holistic", "responses/instance",
                "responses/cluster", "records", "export"]:
        assert (tmp_path / "b" / sub / "report.json").exists(), sub
    assert list((tmp_path / "b" / "export" / "parquet").glob("val-*.parquet"))
    summary = _cli(["summary", str(tmp_path / "b")], tmp_path, venv_env)
    assert summary.returncode == 0 and "records" in summary.stdout


def _coco_from_isaid(image: Path, out: Path) -> Path:
    """A COCO json of the real instances of one iSAID image (polygons from its id mask)."""
    import cv2
    import numpy as np

    ids = cv2.cvtColor(cv2.imread(str(image.with_name(image.stem + "_instance_id_RGB.png"))),
                       cv2.COLOR_BGR2RGB).astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    annotations = []
    for k, value in enumerate(v for v in np.unique(ids) if v >= 1000):
        contours, _ = cv2.findContours((ids == value).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        polys = [c.reshape(-1).tolist() for c in contours if len(c) >= 3]
        if polys:
            x, y, w, h = cv2.boundingRect(np.concatenate(contours))
            annotations.append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                "segmentation": polys, "bbox": [x, y, w, h],
                                "area": int((ids == value).sum())})
    height, width = ids.shape
    coco = {"images": [{"id": 1, "file_name": image.name, "width": width, "height": height}],
            "annotations": annotations, "categories": [{"id": 1, "name": "small vehicle"}]}
    out.write_text(__import__("json").dumps(coco))
    return out


def test_annotate_new_imagery_from_the_cli(tmp_path, isaid_root, venv_env):
    scene = tmp_path / "scenes" / "P0005.png"
    scene.parent.mkdir()
    shutil.copy(isaid_root / "train" / "images" / "P0005.png", scene)
    coco = _coco_from_isaid(isaid_root / "train" / "images" / "P0005.png", tmp_path / "c.json")
    proc = _cli(["annotate", str(scene), "--out", str(tmp_path / "ann"), "--masks", "coco",
                 str(coco)], tmp_path, venv_env)
    assert proc.returncode == 0, proc.stderr
    assert "scene" in proc.stderr and "annotate" in proc.stderr
    summary = __import__("json").loads((tmp_path / "ann" / "summary.json").read_text())
    assert summary["tiles"] >= 1 and summary["objects"] > 0 and summary["phrases"] > 0
    assert list((tmp_path / "ann" / "export" / "parquet").glob("*.parquet"))


def test_annotate_with_sam_but_no_checkpoint_is_one_line(tmp_path, isaid_root, venv_env):
    (tmp_path / "params.yaml").write_text("sam:\n  checkpoint: /nowhere/sam_vit_h.pth\n")
    proc = _cli(["annotate", str(isaid_root / "test" / "images" / "P0006.png"), "--out",
                 str(tmp_path / "ann"), "--masks", "sam"], tmp_path, venv_env)
    _assert_one_line_error(proc, "sam_vit_h.pth")
    assert not (tmp_path / "ann" / "export").exists()


def test_version_is_printed_and_nothing_else_runs(tmp_path, venv_env):
    from pipeline import __version__

    proc = _cli(["--version"], tmp_path, venv_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"geopixeld {__version__}\n"
    # eager: it wins over a subcommand and its arguments
    proc = _cli(["--version", "prepare", "--out", "x"], tmp_path, venv_env)
    assert proc.returncode == 0 and proc.stdout.startswith("geopixeld ")
    assert not (tmp_path / "x").exists()
    assert "--version" in _cli(["--help"], tmp_path, venv_env).stdout
