"""The CLI surface: --help for every stage, and user mistakes as one line + exit 2 with
nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUBCOMMANDS = ["prepare", "plan", "annotate-holistic", "annotate-instances",
               "annotate-clusters", "compose", "export", "build", "summary"]


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
