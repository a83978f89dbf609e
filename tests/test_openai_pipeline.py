"""The whole pipeline with the `openai` backend against a real loopback OpenAI-compatible server
with injected faults: the CLI works as with the template backend, records say which backend and
model made them, a second run pays for nothing, and the key is written nowhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loopback_openai import LoopbackOpenAI

from pipeline.core.params import Params, to_yaml
from pipeline.core.shards import list_shards, read_records
from schemas import GroundedRecord, Response

KEY = "sk-test-PIPELINE-SECRET-42"


def _params(tmp_path: Path, base_url: str, isaid_root: Path) -> Path:
    raw = Params().model_dump(mode="json")
    raw["data"]["root"] = str(isaid_root)
    raw["data"]["splits"] = ["val"]
    backend = raw["annotate"]["backend"]
    backend.update(name="openai", model="gpt-4o-mini")
    backend["openai"].update(base_url=base_url, api_key_env="GEOPIXELD_TEST_KEY", timeout_s=2.0,
                             backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=8,
                             concurrency=8)
    raw["annotate"]["cache"]["path"] = str(tmp_path / "cache" / "responses.sqlite")
    path = tmp_path / "params.yaml"
    path.write_text(to_yaml(Params.model_validate(raw)))
    return path


def _build(params: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--params", str(params),
                           "--out", str(out)], cwd=params.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def test_build_with_openai_backend_faults_cache_and_no_key_leak(tmp_path, isaid_root, venv_env):
    env = dict(venv_env, GEOPIXELD_TEST_KEY=KEY)
    # slow faults outlast the 2 s timeout; sound answers come in milliseconds, well under
    # it even on a loaded machine, so none is answered twice
    with LoopbackOpenAI(fault_rate=0.2, seed=11, slow_s=2.5, api_key=KEY) as server:
        params = _params(tmp_path, server.base_url, isaid_root)
        first = _build(params, tmp_path / "b1", env)
        assert first.returncode == 0, first.stderr
        answered = dict(server.counters.answered)
        assert answered and max(answered.values()) == 1          # nothing paid for twice
        assert sum(server.counters.faults.values()) > 0          # faults really happened

        responses = [r for kind in ("holistic", "instance", "cluster")
                     for s in list_shards(tmp_path / "b1" / "responses" / kind)
                     for r in read_records(s, Response)]
        assert responses and all(r.status == "ok" for r in responses)
        assert {r.backend for r in responses} == {"openai"}
        report = json.loads((tmp_path / "b1" / "responses" / "holistic" / "report.json").read_text())
        assert report["spent_usd"] > 0 and report["tokens"]["total"] > 0
        # the server the run asked, and where it was set
        assert report["backend_stats"]["endpoint"] == {"url": server.base_url,
                                                       "source": "params"}

        records = [r for s in list_shards(tmp_path / "b1" / "records")
                   for r in read_records(s, GroundedRecord)]
        assert records
        assert {(r.provenance.backend, r.provenance.model) for r in records} == {
            ("openai", "gpt-4o-mini")}

        server.reset_counters()
        second = _build(params, tmp_path / "b2", env)
        assert second.returncode == 0, second.stderr
        assert server.counters.requests == 0                     # all from the cache
        again = json.loads((tmp_path / "b2" / "responses" / "holistic" / "report.json").read_text())
        assert again["spent_usd"] == 0 and again["cached"] == again["requests"]

    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_missing_key_is_one_line_and_writes_nothing(tmp_path, isaid_root, venv_env):
    with LoopbackOpenAI(api_key=KEY) as server:
        params = _params(tmp_path, server.base_url, isaid_root)
        proc = _build(params, tmp_path / "b", venv_env)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "GEOPIXELD_TEST_KEY" in lines[0], proc.stderr
    assert not (tmp_path / "b").exists()                         # stopped before prepare
