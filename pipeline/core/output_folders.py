"""Output folders: what a stage may replace, one run at a time, swapped in whole.

The rules, in one place:
- a stage replaces only a folder that it (or an earlier run of the same stage) wrote, known by
  the marker file it leaves there (`.geopixeld-stage.json`), or an empty folder, or nothing;
  anything else (the user's own files, another stage's output, a file) is refused;
- an output is never equal to, inside, or containing one of the stage's inputs, nor the
  working folder (or a folder holding it), the home folder or the file-system root;
- one run per output folder: a lock next to it (`.<name>.lock`, an OS file lock released when
  the process ends, however it ends), and one for a whole run's root (`build`, `annotate`:
  `.geopixeld.lock` inside it); a second run fails fast with one line naming the holder;
- what a killed run left (staging and retired folders beside the output) is swept only while
  holding that lock, so a live run's staging folder is never touched;
- a run whose report counts nothing (`count_key`) does not replace an output that counted
  something: an empty rebuild never wipes a good dataset.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.core.errors import EmptyResultError, OutputFolderError

MARKER = ".geopixeld-stage.json"
REPORT = "report.json"
ROOT_LOCK = ".geopixeld.lock"


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inputs(inputs: Iterable[str | Path | None]) -> Iterator[tuple[str | Path, Path]]:
    """(as given, resolved) of every input named (None and "" are not)."""
    for given in inputs:
        if given is not None and str(given) != "":
            yield given, _resolved(given)


def check_output_location(folder: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """The resolved output folder, after refusing places no stage may replace: a file, the
    file-system root, the home folder, the working folder or a folder holding it, and anything
    equal to, inside or holding one of `inputs`."""
    shown = str(folder)
    out = _resolved(folder)
    if out.exists() and not out.is_dir():
        raise OutputFolderError("is a file, not a folder; give a folder for the output", shown)
    if out == Path(out.anchor) or out == _resolved(Path.home()):
        raise OutputFolderError("is the file-system root or the home folder; give a folder of "
                                "its own for the output", shown)
    cwd = _resolved(os.getcwd())
    if out == cwd or out in cwd.parents:
        raise OutputFolderError("is the working folder or holds it; give a folder of its own "
                                "for the output", shown)
    for given, source in _inputs(inputs):
        if out == source:
            raise OutputFolderError(f"is also an input ({given}); give another folder", shown)
        if source in out.parents:
            raise OutputFolderError(f"is inside the input {given}; give a folder outside it",
                                    shown)
        if out in source.parents:
            raise OutputFolderError(f"holds the input {given}; give a folder that does not "
                                    "contain the stage's inputs", shown)
    return out


def check_output_file(path: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a single-file output (a metrics file) that is a folder, one of `inputs`, or
    inside an input folder."""
    shown = str(path)
    target = _resolved(path)
    if target.is_dir():
        raise OutputFolderError("is a folder; give a file name for this output", shown)
    for given, source in _inputs(inputs):
        if target == source or source in target.parents:
            raise OutputFolderError(f"would overwrite the input {given}; give another file",
                                    shown)
    return target


def _json_object(path: Path) -> dict:
    """A small JSON object this module wrote (a marker, a report); {} when it is missing or
    not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _marker(folder: Path) -> dict:
    return _json_object(folder / MARKER)


def _legacy_stage(folder: Path) -> str | None:
    """The stage a folder written before markers existed says it came from (its report)."""
    stage = _json_object(folder / REPORT).get("stage")
    return stage if isinstance(stage, str) else None


def written_by(folder: Path) -> str | None:
    """The stage whose marker (or, for older outputs, whose report) is in `folder` or, for a
    sub-folder of a stage's output, in its parent."""
    for place in (folder, folder.parent):
        stage = _marker(place).get("stage")
        if isinstance(stage, str):
            return stage
    return _legacy_stage(folder)


def check_ownership(folder: Path, stage: str, shown: str | Path) -> None:
    """Refuse to replace a non-empty folder that `stage` did not write."""
    if not folder.is_dir():
        return
    try:
        empty = next(folder.iterdir(), None) is None
    except PermissionError:
        raise OutputFolderError("cannot be listed (permission denied)", shown) from None
    if empty:
        return
    owner = written_by(folder)
    if owner == stage:
        return
    if owner is None:
        raise OutputFolderError(f"holds files that the {stage} stage did not write (no "
                                f"{MARKER}); give a new or empty folder, or remove it yourself",
                                shown)
    raise OutputFolderError(f"is the output of the {owner} stage, not of {stage}; give "
                            "another folder", shown)


class _Lock:
    """An exclusive, non-blocking OS lock on a lock file (`path`)."""

    def __init__(self, path: Path, shown: str | Path):
        self.path = path
        self.shown = shown
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputFolderError(f"another run is writing this folder ({holder}); wait "
                                        "for it to finish or stop it", self.shown) from None
            except OSError as exc:
                os.close(fd)
                raise OutputFolderError(f"cannot be locked ({exc.strerror})",
                                        self.shown) from None
            # the file may have been removed by the holder we waited on: lock the current one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([_program(), *sys.argv[1:6]])}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _program() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return "geopixeld" if name in ("cli.py", "__main__.py") else name


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {info['pid']} on {info['host']} since {info['since']}: "
                f"{info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that holds its lock"


@contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the lock of a multi-stage run's output root (`build`, `annotate`) for a block: the
    lock file is inside the root, so nothing is written beside it."""
    out = _resolved(folder)
    if out.exists() and not out.is_dir():
        raise OutputFolderError("is a file, not a folder; give a folder for the output", folder)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out / ROOT_LOCK, folder)
    try:
        lock.acquire()
        try:
            yield out
        finally:
            lock.release()
    finally:
        if created and next(out.iterdir(), None) is None:
            out.rmdir()  # a run that failed before writing anything leaves no folder behind


def _count(report_file: Path, key: str) -> int | None:
    value = _json_object(report_file).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _previous_count(folder: Path, key: str) -> int | None:
    marker = _marker(folder)
    if marker.get("count_key") == key and isinstance(marker.get("count"), int):
        return marker["count"]
    return _count(folder / REPORT, key)


def _sweep(out: Path) -> None:
    """Remove what killed runs of this output left beside it (we hold its lock: no live run
    of it exists)."""
    for pattern in (f".{out.name}.staging-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staged_folder(folder: str | Path, *, stage: str, inputs: Iterable[str | Path | None] = (),
                  count_key: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `folder` only if the block succeeds, under
    the rules of this module. `stage` names the writer (kept in the folder's marker);
    `inputs` are the files and folders the stage reads; `count_key` names the number in the
    staged report.json that must not drop to 0 over a previous output that had some."""
    out = check_output_location(folder, inputs)
    lock = _Lock(out.parent / f".{out.name}.lock", folder)
    lock.acquire()
    try:
        check_ownership(out, stage, folder)
        _sweep(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            yield staging
            marker = {"stage": stage}
            if count_key is not None:
                count = _count(staging / REPORT, count_key)
                before = _previous_count(out, count_key) if out.is_dir() else None
                if count == 0 and before:
                    raise EmptyResultError(
                        f"this run produced 0 {count_key} where the output it would replace "
                        f"has {before}: kept the previous output (remove the folder to accept "
                        "an empty result)", folder)
                marker.update(count_key=count_key, count=count)
            (staging / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
            os.chmod(staging, 0o755)  # mkdtemp makes 0700 folders
            retired = None
            if out.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, retired / out.name)
            os.replace(staging, out)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
