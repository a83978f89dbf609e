"""Kill -9 in the middle of annotation, then rerun: the final records and export equal those of an
uninterrupted run, no answer received before the kill is lost, and the server answered no
request twice across both runs.

The killed run is a child process; the rerun and the uninterrupted reference run (its own
folder and cache, the same params) go through the same stage functions in this process. The
loopback server runs in this process too (it outlives the child). A fixed latency and a small
concurrency make the annotation take a few seconds; the server lets a set number of answers
through and then holds the requests that follow, so that the kill lands with requests in flight
and none of them answered (an answer the server had sent but the client not yet stored would
be lost to any client; this test pins the kill where the client can be held to its promise).
The client timeout is long: a timed-out request that the server still answers is a repeat this
test is not about (tests/test_openai_backend.py covers timeouts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_openai import LoopbackOpenAI

from annotators.cache import ResponseCache
from pipeline.core.params import Params, to_yaml
from pipeline.core.shards import list_shards, read_records
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare
from schemas import PASSES, GroundedRecord, Request, Response

KEY_ENV = "GEOPIXELD_TEST_KILL_KEY"
CACHE = ".cache/responses.sqlite"  # relative: both runs have the same params, byte for byte
LATENCY_S = 0.05
CONCURRENCY = 2

_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_kill_resume import after_plan
after_plan({planned!r})
"""


def after_plan(planned: str) -> None:
    """The stages after plan, as `geopixeld build` runs them, into the working folder, with
    its params.yaml."""
    from pipeline.core.params import load_params
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.compose.stage import run_compose
    from pipeline.stages.export import run_export

    params = load_params("params.yaml")
    tiles, plan = Path(planned) / "tiles", Path(planned) / "plan"
    for kind in PASSES:
        run_annotate(params, kind, tiles, plan, Path("responses") / kind)
    run_compose(params, tiles, plan, Path("responses"), Path("records"))
    run_export(params, tiles, Path("records"), Path("export"))


@pytest.fixture(scope="module")
def planned(tmp_path_factory, isaid_root):
    out = tmp_path_factory.mktemp("kill")
    params = Params.model_validate({"data": {"root": str(isaid_root), "splits": ["val"]}})
    run_prepare(params, out / "tiles")
    run_plan(params, out / "tiles", out / "plan")
    requests = sum(len(read_records(s, Request))
                   for kind in PASSES for s in list_shards(out / "plan" / "requests" / kind))
    return out, isaid_root, requests


def write_params(folder: Path, root: Path, base_url: str) -> None:
    raw = Params().model_dump(mode="json")
    raw["data"].update(root=str(root), splits=["val"])
    raw["annotate"]["backend"].update(name="openai", model="gpt-4o-mini")
    raw["annotate"]["backend"]["openai"].update(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=30.0, backoff_base_s=0.01,
        backoff_max_s=0.05, max_attempts=3, concurrency=CONCURRENCY, image_format="jpeg",
        jpeg_quality=50)
    raw["annotate"]["cache"]["path"] = CACHE
    raw["runner"].update(local_scheduler="synchronous", workers=1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(to_yaml(Params.model_validate(raw)))


def start(folder: Path, planned_dir: Path) -> subprocess.Popen:
    """The stages after plan in a child process working in `folder`."""
    env = dict(os.environ, **{KEY_ENV: "sk-test-kill"})
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    script = _CHILD.format(tests=str(Path(__file__).resolve().parent), planned=str(planned_dir))
    return subprocess.Popen([sys.executable, "-c", script], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_here(folder: Path, planned_dir: Path, monkeypatch) -> None:
    """The same stages in this process (a rerun needs no fresh interpreter)."""
    with monkeypatch.context() as m:
        m.chdir(folder)
        m.setenv(KEY_ENV, "sk-test-kill")
        after_plan(str(planned_dir))


def stored(folder: Path) -> int:
    path = folder / CACHE
    if not path.exists():
        return 0
    cache = ResponseCache(path)
    try:
        return len(cache)
    finally:
        cache.close()


def responses(folder: Path) -> list[Response]:
    return [r for kind in PASSES for s in list_shards(folder / "responses" / kind)
            for r in read_records(s, Response)]


def records(folder: Path) -> list[GroundedRecord]:
    return [r for s in list_shards(folder / "records") for r in read_records(s, GroundedRecord)]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_kill_9_mid_annotation_then_rerun_equals_an_uninterrupted_run(planned, monkeypatch):
    out, root, total = planned
    killed, reference = out / "killed", out / "reference"
    through = total // 2  # answers let through before the kill: mid instance pass
    with LoopbackOpenAI(latency_s=LATENCY_S) as server:
        write_params(killed, root, server.base_url)
        write_params(reference, root, server.base_url)

        server.hold_after(through)
        child = start(killed, out)
        try:
            deadline = time.monotonic() + 60
            while not (server.held and server.counters.answers == through
                       and stored(killed) == through):
                assert child.poll() is None, child.communicate()[1].decode()[-2000:]
                assert time.monotonic() < deadline, "the child never got half way"
                time.sleep(0.01)
            in_flight = server.counters.requests - through
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        server.release()  # the held requests are dropped, never answered
        assert child.returncode == -signal.SIGKILL
        assert in_flight >= 1  # killed with requests in flight
        assert not (killed / "records").exists()  # nothing half-written became an output
        assert stored(killed) == through  # every answer received before the kill is kept

        run_here(killed, out, monkeypatch)  # the rerun
        first_runs = server.counters.answered.copy()
        assert sum(first_runs.values()) == total  # each request answered once in all
        assert max(first_runs.values()) == 1  # no repeated successful request
        answered = responses(killed)
        assert len(answered) == total and all(r.status == "ok" for r in answered)
        assert sum(r.cached for r in answered) == through  # the rest were asked once, now

        server.reset_counters()
        run_here(reference, out, monkeypatch)  # uninterrupted, its own cache
        assert server.counters.answers == total

    got, want = records(killed), records(reference)
    assert got and got == want  # captions, phrases, masks and provenance alike
    assert [r.text for r in answered] == [r.text for r in responses(reference)]
    assert files(killed / "export") == files(reference / "export")
