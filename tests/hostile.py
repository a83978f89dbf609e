"""Harness of the hostile-input suite (tests/test_hostile_*.py).

Each case runs the real CLI in a process of its own, as a user would, and asserts three things:
the exit code, that stderr is one clear line (no traceback), and that nothing outside the
stage's own output folder changed (every file under the workspace hashed before and after).

The process is forked from a warm server that has imported the CLI and the pipeline once
(`WarmCLI`): each run still has its own process (working folder, environment, stdout/stderr
files, exit code, atexit, worker processes), without paying ~1-2 s of interpreter start and
imports per case. A test marked `cold_cli`, and every test when GEOPIXELD_TEST_CLI=cold is
set, runs `python -m pipeline.cli` instead.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
    """`geopixeld ARGS` run in `cwd`: in a process forked from the warm server, or (a test
    marked `cold_cli`, or GEOPIXELD_TEST_CLI=cold) in a fresh `python -m pipeline.cli`."""
    args = [*map(str, args)]
    if cold_cli():
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                              env=env or cli_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
    return WARM.run(args, Path(cwd), env or cli_env(), timeout)


# set by the autouse fixture in conftest.py for a test marked `cold_cli`
COLD_TEST = False


def cold_cli() -> bool:
    return COLD_TEST or os.environ.get("GEOPIXELD_TEST_CLI", "").lower() == "cold"


# The warm server: imports the CLI and every module of the project's packages once (modules
# that load torch or transformers are left to the run that needs them: a fork after their
# thread pools start is not safe), then for each request forks a child that enters the run's
# folder and environment, points fds 0/1/2 at /dev/null and the two output files, and runs
# `pipeline.cli` as `python -m pipeline.cli` does (runpy, as __main__); the child ends as the
# interpreter would (threads joined, atexit handlers, streams flushed; an uncaught exception
# prints its traceback and exits 1), then leaves with os._exit. Protocol: one JSON request per
# line on stdin; the server answers {"pid": ...} when the child is started and
# {"returncode": ...} when it has ended.
WARM_SERVER = r"""
import atexit, gc, importlib, importlib.util, json, os, pkgutil, runpy, sys, threading
proto_in = os.fdopen(os.dup(0), "r")
proto_out = os.fdopen(os.dup(1), "w", buffering=1)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
import pipeline.cli
HEAVY = ("import torch", "from torch", "transformers", "segment_anything", "peft")
def preload(name):
    try:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                if any(h in f.read() for h in HEAVY):
                    return
        importlib.import_module(name)
    except BaseException:
        pass
for package in ("schemas", "pipeline", "annotators"):
    preload(package)
    path = getattr(sys.modules.get(package), "__path__", None)
    try:
        for info in pkgutil.walk_packages(path or [], package + ".", onerror=lambda n: None):
            preload(info.name)
    except BaseException:
        pass
gc.freeze()  # the preloaded objects: never scanned (nor copied) in a child
proto_out.write(json.dumps({"ready": True}) + "\n")
for line in proto_in:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        proto_in.close()
        proto_out.close()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        os.close(null)
        sys.argv = ["geopixeld", *request["args"]]
        sys.modules.pop("pipeline.cli", None)  # run as __main__ only, as `-m` runs it
        code = 0
        try:
            runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        # the interpreter's exit, less freeing every object (which would copy every page
        # shared with the server): wait for threads, atexit handlers, flush
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    proto_out.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    proto_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
"""


def _as_text(data: bytes) -> str:
    """Bytes decoded as `subprocess.run(..., text=True)` decodes them (universal newlines)."""
    encoding = (subprocess._text_encoding() if hasattr(subprocess, "_text_encoding")
                else "locale")
    return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


class WarmCLI:
    """One warm server per test process, started on first use, restarted if it died. Its
    answers are read from the pipe's fd directly (no buffered reader: a line already read into
    a buffer would be missed by select)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._pending = b""
        self._lock = threading.Lock()

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._pending = b""
            self._proc = subprocess.Popen([sys.executable, "-c", WARM_SERVER], cwd=REPO,
                                          env=cli_env(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            ready = self._answer(self._proc, 300)
            assert ready == {"ready": True}, f"the warm CLI server did not start: {ready!r}"
            atexit.register(self.close)
        return self._proc

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def _answer(self, server: subprocess.Popen, timeout: float | None) -> dict | None:
        """The server's next answer, or None when `timeout` seconds pass without one."""
        fd = server.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            if deadline is not None:
                ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    return None
            chunk = os.read(fd, 65536)
            assert chunk, "the warm CLI server died"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], cwd: Path, env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess:
        command = ["geopixeld", *args]
        with self._lock, tempfile.TemporaryDirectory(prefix="geopixeld-cli-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            server = self._server()
            request = {"args": args, "cwd": str(Path(cwd).resolve()), "env": env,
                       "stdout": str(out), "stderr": str(err)}
            server.stdin.write(json.dumps(request).encode() + b"\n")
            server.stdin.flush()
            pid = self._answer(server, None)["pid"]
            done = self._answer(server, timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self._answer(server, None)
                raise subprocess.TimeoutExpired(command, timeout, _as_text(out.read_bytes()),
                                                _as_text(err.read_bytes()))
            return subprocess.CompletedProcess(command, done["returncode"],
                                               _as_text(out.read_bytes()),
                                               _as_text(err.read_bytes()))


WARM = WarmCLI()


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
