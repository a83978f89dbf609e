"""A real dask cluster: a scheduler and two workers, each its own process (`dask scheduler`,
`dask worker tcp://...`), on 127.0.0.1 with free ports, the workers in another working
folder than the run. `geopixeld build --scheduler tcp://...` with relative paths writes
exactly what a local build writes, every stage (export included) runs its tasks on the
workers, and both workers get some. The pieces: relative paths made absolute before tasks
are shipped, one scheduler default for every stage."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
from hostile import cli_env, run_cli

from pipeline.core.params import Params, RunnerParams
from pipeline.core.stage import Stage, absolute_paths, resolve_scheduler

# every stage of `build` and the labels its tasks carry on the cluster
BUILD_LABELS = {"prepare", "plan", "annotate holistic", "annotate instance", "annotate cluster",
                "compose", "review", "export geopixel+coco", "export parquet", "qa"}


# ---- the pieces, without a cluster ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
    name: str
    source: Path
    inputs: tuple[Path, ...]


def test_relative_paths_are_made_absolute_everywhere_a_task_carries_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = _Job("a", Path("tiles/x.parquet"), (Path("/abs/y"), Path("plan/y")))
    task = functools.partial(sorted, key=None, folder=Path("out"))
    items = [(Path("a"), "text/not/a/path", 3), {"k": [job]}]
    shipped_task, shipped = absolute_paths(task), absolute_paths(items)
    assert shipped_task.keywords["folder"] == tmp_path / "out"
    assert shipped[0] == (tmp_path / "a", "text/not/a/path", 3)
    moved = shipped[1]["k"][0]
    assert moved == _Job("a", tmp_path / "tiles/x.parquet", (Path("/abs/y"), tmp_path / "plan/y"))
    # what holds no relative path is the same object (nothing copied)
    kept = [(Path("/abs"), "x"), _Job("b", Path("/abs/b"), ())]
    assert absolute_paths(kept) is kept
    assert job.source == Path("tiles/x.parquet")  # the original is not changed


def test_every_stage_finds_its_scheduler_the_same_way(monkeypatch):
    params = Params(runner=RunnerParams(scheduler="tcp://params:1"))
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert resolve_scheduler(None, Params()) is None
    assert resolve_scheduler(None, params) == "tcp://params:1"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://env:2")
    assert resolve_scheduler(None, params) == "tcp://env:2"
    assert resolve_scheduler("tcp://option:3", params) == "tcp://option:3"
    assert Stage("export", params, "tcp://option:3").address == "tcp://option:3"


def test_locally_paths_are_shipped_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    stage = Stage("t", Params(runner=RunnerParams(local_scheduler="synchronous")))
    assert stage.map(str, [Path("a/b")]) == ["a/b"]
    assert stage.call(str, Path("c")) == "c"


# ---- the cluster: separate processes -------------------------------------------------------


class Cluster(NamedTuple):
    address: str
    worker_home: Path  # the workers' working folder (not the tests')
    logs: Path


def _start(args: list[str], cwd: Path, log: Path, env: dict) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and anything it started
            proc.wait(timeout=15)


def _scheduler_address(scheduler_file: Path, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited: {log.read_text()[-2000:]}")
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"dask scheduler did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes (one thread each, as one worker per
    GPU would run), started in a folder of their own; stopped, or killed, whatever happens."""
    import cloudpickle
    from distributed import Client

    # the scheduler and workers cannot import this test module: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = tmp_path_factory.mktemp("dask-cluster")
    home = root / "worker-home"
    home.mkdir()
    env = cli_env()
    procs: list[subprocess.Popen] = []
    try:
        scheduler_log = root / "scheduler.log"
        procs.append(_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard",
                             "--scheduler-file", str(root / "scheduler.json")],
                            home, scheduler_log, env))
        address = _scheduler_address(root / "scheduler.json", procs[0], scheduler_log)
        for i in (1, 2):
            procs.append(_start(["distributed.cli.dask_worker", address, "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                                 "--name", f"worker-{i}",
                                 "--local-directory", str(root / f"worker-{i}")],
                                home, root / f"worker-{i}.log", env))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            assert set(client.run(os.getcwd).values()) == {str(home.resolve())}
        yield Cluster(address, home, root)
    finally:
        _stop(procs)


def _task_stream_start(dask_scheduler) -> int:
    return dask_scheduler.get_task_stream_index()


def _tasks_since(dask_scheduler, start: int) -> list[tuple[str, str]]:
    return [(t["worker"], str(t["key"])) for t in dask_scheduler.get_task_stream(
        start_index=start)]


def _workspace(root: Path, repo_root: Path, splits: tuple[str, ...]) -> Path:
    """A user's folder: params.yaml, data/isaid/<split>, reviews/decisions.jsonl."""
    for split in splits:
        shutil.copytree(repo_root / "data" / "isaid" / split, root / "data" / "isaid" / split)
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    (root / "reviews").mkdir()
    (root / "reviews" / "decisions.jsonl").write_text("")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _assert_same_outputs(local: Path, dist: Path) -> None:
    for folder in ("export", "records"):
        a, b = _files(local / folder), _files(dist / folder)
        assert a and a.keys() == b.keys(), folder
        different = [name for name in a if a[name] != b[name]]
        assert not different, f"{folder}: {different}"


def _build_on_cluster(cluster: Cluster, workspace: Path, args: list[str]) -> dict:
    """`geopixeld build ARGS --scheduler ADDRESS` run in `workspace`: the tasks each worker
    ran, and the tasks of each stage (by the label their keys carry)."""
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        start = client.run_on_scheduler(_task_stream_start)
        proc = run_cli(["build", *args, "--scheduler", cluster.address], workspace, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ran = client.run_on_scheduler(_tasks_since, start=start)
        names = {w: info.get("name") for w, info in client.scheduler_info()["workers"].items()}
    per_worker = Counter(names.get(w, w) for w, _ in ran)
    per_label = Counter(key.rsplit("-", 2)[0] for _, key in ran)
    print(f"\ntasks per worker: {dict(sorted(per_worker.items()))}; "
          f"per stage: {dict(per_label)}")
    return {"per_worker": per_worker, "per_label": per_label}


def _tasks_the_reports_name(build: Path) -> Counter:
    """Tasks each stage of a build maps, from its reports: one per shard."""
    def shards(folder: str) -> int:
        return json.loads((build / folder / "report.json").read_text())["shards"]

    export = json.loads((build / "export" / "report.json").read_text())
    return Counter({"prepare": shards("tiles"), "plan": shards("plan"),
                    "annotate holistic": shards("responses/holistic"),
                    "annotate instance": shards("responses/instance"),
                    "annotate cluster": shards("responses/cluster"),
                    "compose": shards("records"), "review": shards("reviewed"),
                    "export geopixel+coco": shards("reviewed"),
                    "export parquet": export["parquet"]["shards"], "qa": shards("qa")})


def test_cluster_build_with_relative_paths_equals_the_local_build(dask_cluster, workspace):
    """`build --split val` (the shared local build of the tests' workspace) again on the
    cluster, every path relative to the workspace: the same export and records, and every
    stage's tasks (export's too) ran on the workers."""
    ran = _build_on_cluster(dask_cluster, workspace, ["--split", "val", "--out", "cluster"])
    _assert_same_outputs(workspace / "build", workspace / "cluster")
    assert set(ran["per_label"]) == BUILD_LABELS
    assert ran["per_label"] == _tasks_the_reports_name(workspace / "cluster")
    assert set(ran["per_worker"]) <= {"worker-1", "worker-2"}
    assert not any(dask_cluster.worker_home.iterdir())  # nothing written where workers run


@pytest.mark.slow
def test_three_split_cluster_build_uses_both_workers(dask_cluster, tmp_path, repo_root):
    """Three splits (three shards a stage), built on the cluster and locally: the same export
    and records, and both workers ran tasks."""
    ws = _workspace(tmp_path / "ws", repo_root, ("train", "val", "test"))
    ran = _build_on_cluster(dask_cluster, ws, ["--out", "build"])
    local = run_cli(["build", "--out", "build-local"], ws, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    _assert_same_outputs(ws / "build-local", ws / "build")
    assert ran["per_label"] == _tasks_the_reports_name(ws / "build")
    assert sorted(ran["per_worker"]) == ["worker-1", "worker-2"], ran
    assert min(ran["per_worker"].values()) > 0, ran
    assert not any(dask_cluster.worker_home.iterdir())


def test_finetune_and_evaluate_take_the_scheduler(dask_cluster, tmp_path):
    """Without a base model both are skipped (one line each), with `--scheduler` as without."""
    (tmp_path / "export" / "parquet").mkdir(parents=True)
    for args in (["finetune", "--export", "export/parquet", "--out", "finetune"],
                 ["evaluate", "--records", "export/parquet", "--checkpoint", "finetune",
                  "--out", "evaluate", "--metrics", "metrics/rs_gcg.json"]):
        proc = run_cli([*args, "--scheduler", dask_cluster.address], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "skipped" in proc.stderr
    assert json.loads((tmp_path / "metrics" / "rs_gcg.json").read_text())["evaluated"] is False


def test_a_single_task_runs_on_a_worker_with_absolute_paths(dask_cluster, tmp_path,
                                                            monkeypatch):
    """`Stage.call` (finetune's training, evaluate's predictions) on the cluster: the worker
    works in its own folder and still finds the file given by a relative path."""
    monkeypatch.chdir(tmp_path)
    Path("here.txt").write_text("x")
    stage = Stage("evaluate", Params(), dask_cluster.address, holds_model=True)
    assert stage.call(os.getcwd) == str(dask_cluster.worker_home.resolve())
    assert stage.call(os.path.abspath, Path("here.txt")) == str(tmp_path.resolve() / "here.txt")
    assert stage.call(os.path.isfile, Path("here.txt")) is True
