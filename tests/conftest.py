"""Shared fixtures: the repository root and the bundled real samples."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ISAID = REPO / "data" / "isaid"
GEOPIXELD_SAMPLE = REPO / "data" / "geopixeld_sample"


@pytest.fixture(autouse=True)
def _cli_process(request):
    """A test marked `cold_cli` runs the CLI through `python -m pipeline.cli` in a fresh
    interpreter (tests/hostile.py `run_cli`), not forked from the warm server."""
    import hostile

    hostile.COLD_TEST = request.node.get_closest_marker("cold_cli") is not None
    yield
    hostile.COLD_TEST = False


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def isaid_root() -> Path:
    return ISAID


@pytest.fixture()
def venv_env() -> dict[str, str]:
    """Environment whose PATH starts with this interpreter's bin (geopixeld, dvc)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env["CI"] = "1"
    return env


@pytest.fixture(scope="session")
def built_workspace(tmp_path_factory) -> Path:
    """A user's folder after `geopixeld build --split val` with the template backend: params.yaml,
    data/isaid/val, reviews/ and build/. Shared by the session: copy it before changing it
    (the `workspace` fixture does)."""
    from hostile import run_cli

    root = tmp_path_factory.mktemp("built") / "ws"
    (root / "data" / "isaid").mkdir(parents=True)
    shutil.copytree(ISAID / "val", root / "data" / "isaid" / "val")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "reviews").mkdir()
    (root / "reviews" / "decisions.jsonl").write_text("")
    proc = run_cli(["build", "--split", "val", "--out", "build"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture()
def workspace(built_workspace, tmp_path) -> Path:
    """A private copy of `built_workspace` that a test may change."""
    return Path(shutil.copytree(built_workspace, tmp_path / "ws", symlinks=True))
