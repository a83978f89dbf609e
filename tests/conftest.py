"""Shared fixtures: the repository root and the bundled real samples."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ISAID = REPO / "data" / "isaid"
GEOPIXELD_SAMPLE = REPO / "data" / "geopixeld_sample"


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
