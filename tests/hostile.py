"""Harness of the hostile-input suite (tests/test_hostile_*.py).

Each case runs the real CLI in a subprocess, as a user would, and asserts three things:
the exit code, that stderr is one clear line (no traceback), and that nothing outside the
stage's own output folder changed (every file under the workspace hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: this interpreter's bin first on PATH, no
    cluster address, CI set (no progress bars)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env.pop("OPENAI_BASE_URL", None)
    env["CI"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`geopixeld ARGS` run in `cwd`."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def tree_digest(root: Path, exclude: Iterable[Path] = ()) -> dict[str, str]:
    """{relative path: sha256 (or 'dir', or 'link -> target')} of everything under `root`,
    leaving out the paths in `exclude` (and everything below them)."""
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skip]
        for name in dirnames:
            out[str((here / name).relative_to(root))] = "dir"
        for name in filenames:
            path = here / name
            if path.resolve() in skip:
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The run exited `code` with one non-empty stderr line, no traceback, containing every
    needle. Returns the line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_refused(args: list[str], workspace: Path, *needles: str, code: int = 2,
                   may_change: Iterable[Path] = (), env: dict[str, str] | None = None,
                   timeout: float = 180) -> str:
    """Run the CLI in `workspace`; it must fail with one line and leave every file outside
    `may_change` exactly as it was. Returns the error line."""
    keep_out = [Path(workspace) / p for p in may_change]
    before = tree_digest(workspace, keep_out)
    proc = run_cli(args, workspace, env, timeout)
    line = assert_one_line(proc, *needles, code=code)
    after = tree_digest(workspace, keep_out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed outside the output: {changed[:10]}"
    return line


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def merge(into: dict, extra: dict) -> dict:
    """`extra` merged into `into` key by key (nested dicts merged, other values replaced), as
    a user edits a params file."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into
