"""`dvc repro` on a fresh copy of the repository: runs, is a no-op the second time, and a
parameter change re-runs exactly the stages downstream of it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

STAGES = ["prepare", "plan", "annotate-holistic", "annotate-instances", "annotate-clusters",
          "compose", "review", "export", "qa", "finetune", "evaluate"]


def _copy_checkout(repo: Path, dest: Path) -> None:
    """What a fresh clone holds: tracked files plus untracked, not-ignored ones."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = repo / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture()
def checkout(tmp_path, repo_root, venv_env):
    dest = tmp_path / "clone"
    dest.mkdir()
    _copy_checkout(repo_root, dest)
    _run(["git", "init", "-q"], dest, venv_env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest, venv_env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], dest,
         venv_env)
    # keep the test fast: one split of the bundled samples
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["splits"] = ["val"]
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def test_dvc_repro_fresh_clone_then_noop_then_partial(checkout, venv_env):
    first = _run(["dvc", "repro"], checkout, venv_env)
    assert _ran(first) == set(STAGES)
    shards = sorted((checkout / "build/export/parquet").glob("val-*.parquet"))
    assert shards and sum(pq.read_metadata(s).num_rows for s in shards) > 0
    assert (checkout / "dvc.lock").exists()

    second = _run(["dvc", "repro"], checkout, venv_env)
    assert _ran(second) == set()

    # run settings (throughput, retries, endpoint, cache, failure thresholds) re-run nothing
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    openai = params["annotate"]["backend"]["openai"]
    openai.update(concurrency=openai["concurrency"] + 5, timeout_s=12.5, http_client="httpx")
    openai["batch"]["poll_interval_s"] = 7.0
    params["annotate"]["cache"]["path"] = ".cache/elsewhere.sqlite"
    params["annotate"]["max_failed_share"] = 0.25
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], checkout, venv_env)) == set()

    params["plan"]["max_marks_per_tile"] = params["plan"]["max_marks_per_tile"] - 1
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], checkout, venv_env)
    assert "prepare" not in _ran(third)
    assert {"plan", "compose", "export", "qa"} <= _ran(third)
    assert json.loads((checkout / "metrics/rs_gcg.json").read_text())["evaluated"] is False

    params["compose"]["max_caption_chars"] = params["compose"]["max_caption_chars"] + 1
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = _run(["dvc", "repro"], checkout, venv_env)
    assert _ran(fourth) == {"compose", "review", "export", "qa", "finetune", "evaluate"}

    # a reviewer's decision re-runs review and what follows, nothing before it
    from pipeline.core.shards import list_shards, read_records
    from pipeline.stages.review import append_decisions, decide
    from schemas import GroundedRecord

    record = read_records(list_shards(checkout / "build/records")[0], GroundedRecord)[0]
    append_decisions(checkout / "reviews/decisions.jsonl", [decide(record, "reject")])
    fifth = _run(["dvc", "repro"], checkout, venv_env)
    assert _ran(fifth) == {"review", "export", "qa", "finetune", "evaluate"}
