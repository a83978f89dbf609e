"""Hostile inputs about secrets: an API key that comes back in an answer or in an error body, and
credentials in `base_url`, never reach a response shard, a record, an export (Parquet, COCO,
GeoPixel), a report, the response cache or stderr. Every case runs the real CLI against the
loopback OpenAI-compatible server and greps every file it wrote for the key's first 8
characters (the longest prefix `pipeline.core.errors.scrub` may leave is 7)."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import loopback_openai
import pytest
import yaml
from hostile import assert_one_line, cli_env, merge, run_cli
from loopback_openai import LoopbackOpenAI, compose_answer, default_answer

KEY_ENV = "GEOPIXELD_HOSTILE_KEY"
KEY = "sk-h0st1le-5e9c0b7a41d2f8"
HEAD = KEY[:8]
USER, PASSWORD = "alice", "s3cretpassw0rd"


def env() -> dict[str, str]:
    return cli_env(**{KEY_ENV: KEY})


def with_credentials(base_url: str, userinfo: str = f"{USER}:{PASSWORD}") -> str:
    return base_url.replace("http://", f"http://{userinfo}@", 1)


def openai_params(ws: Path, base_url: str, name: str = "openai.yaml", **sections) -> Path:
    """The workspace's params with the openai backend at `base_url`: tiny retries, three tile
    shards (so that shards are answered in worker processes, which read the key themselves)."""
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["data"].update(root="data/isaid", splits=["val"])
    raw["prepare"]["tiles_per_shard"] = 4
    raw["runner"].update(local_scheduler="processes", workers=2)
    raw["annotate"]["backend"].update(name="openai", model="gpt-4o-mini")
    raw["annotate"]["backend"]["openai"].update(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0, max_attempts=2,
        backoff_base_s=0.01, backoff_max_s=0.02, retry_after_max_s=0.1, concurrency=8)
    raw["annotate"]["backend"]["clean_retries"] = 1
    raw["annotate"]["backend"]["openai"]["batch"].update(
        poll_interval_s=0.01, poll_max_interval_s=0.02, max_wait_s=30)
    merge(raw, copy.deepcopy(sections))
    path = ws / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build(ws: Path, params: Path):
    return run_cli(["build", "--params", params.name, "--split", "val", "--out", "build"], ws,
                   env())


def leaks(ws: Path, *needles: str, streams: tuple[str, ...] = ()) -> list[str]:
    """Files written under the workspace (outputs, cache, reports; not the inputs nor the params
    files a test wrote), and streams, that hold any needle."""
    found = []
    for stream in streams:
        found += [f"<stream>: {n}" for n in needles if n in stream]
    for dirpath, _, filenames in os.walk(ws):
        here = Path(dirpath)
        if (ws / "data") in (here, *here.parents):
            continue
        for name in filenames:
            path = here / name
            if here == ws and name.endswith(".yaml"):
                continue
            data = path.read_bytes()
            found += [f"{path.relative_to(ws)}: {n}" for n in needles if n.encode() in data]
    return found


def written(ws: Path) -> list[str]:
    """The kinds of output a build wrote, to show the grep covered them."""
    names = {p.suffix for p in (ws / "build").rglob("*") if p.is_file()}
    return sorted(names)


def report(ws: Path, kind: str) -> dict:
    return json.loads((ws / "build" / "responses" / kind / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# the key in an answer


@pytest.mark.parametrize("secret", [KEY, pytest.param(KEY[:10], marks=pytest.mark.slow)],
                         ids=["whole_key", "10_char_prefix"])
def test_an_answer_holding_the_key_is_written_nowhere(workspace, secret):
    """Every first answer carries the key: it is scrubbed before cleaning, so cleaning refuses
    it ('[redacted]' is tag-like) and asks again; the build completes from the clean answers."""

    def answer(prompt: str, call: int) -> str:
        text = default_answer(prompt, call)
        if call == 0 and "Answer in JSON only" not in prompt:
            return text.rstrip(".") + f" near the sign {secret} by the road."
        return text

    with LoopbackOpenAI(answer=answer) as server:
        proc = build(workspace, openai_params(workspace, server.base_url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {".parquet", ".json"} <= set(written(workspace))
    assert (workspace / "build" / "export" / "coco").is_dir()
    assert (workspace / "build" / "export" / "geopixel").is_dir()
    assert report(workspace, "holistic")["backend_stats"]["cleaning_refusals"]["tags"] >= 10
    assert not leaks(workspace, HEAD, streams=(proc.stdout, proc.stderr))


def test_answers_that_always_hold_the_key_fail_and_their_errors_hold_no_key(workspace):
    """Every instance answer carries the key: each instance request fails (a threshold lets
    the build go on); the records, the reports' failures and the cache hold no key."""

    def answer(prompt: str, call: int) -> str:
        text = default_answer(prompt, call)
        return f"{KEY} {text}" if "attributes of the" in prompt else text

    with LoopbackOpenAI(answer=answer) as server:
        params = openai_params(workspace, server.base_url, annotate={"max_failed_share": 1.0})
        proc = build(workspace, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    instance = report(workspace, "instance")
    assert instance["failed"] == instance["requests"] > 0
    assert instance["failures"][0]["error"].startswith("output cleaning refused 2 answers")
    assert not leaks(workspace, HEAD, streams=(proc.stdout, proc.stderr))


@pytest.mark.slow  # ~20 s: a whole build through the LLM composer
def test_the_llm_composer_answer_holding_the_key_is_written_nowhere(workspace):
    def answer(prompt: str, call: int) -> str:
        if "Merge these annotations" in prompt:
            return compose_answer(prompt) + f" The key is {KEY}."
        return default_answer(prompt, call)

    with LoopbackOpenAI(answer=answer) as server:
        params = openai_params(workspace, server.base_url)
        first = build(workspace, params)
        assert first.returncode == 0, first.stderr[-3000:]
        proc = run_cli(["compose", "--params", params.name, "--composer", "llm"], workspace,
                       env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leaks(workspace, HEAD, streams=(first.stderr, proc.stdout, proc.stderr))


def test_a_batch_answer_holding_the_key_and_a_base_url_with_credentials(workspace):
    """Batch API mode: answers scrubbed before they are cached; the open batches are recorded
    in the cache under the server's address without its credentials."""

    def answer(prompt: str, call: int) -> str:
        text = default_answer(prompt, call)
        return text.rstrip(".") + f" by {KEY}." if call == 0 else text

    with LoopbackOpenAI(answer=answer, batch_polls=2) as server:
        params = openai_params(workspace, with_credentials(server.base_url))
        proc = run_cli(["annotate-holistic", "--params", params.name, "--mode", "batch"],
                       workspace, env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert server.counters.batches_created == 2  # the refused answers asked again
    assert report(workspace, "holistic")["ok"] == 10
    assert not leaks(workspace, HEAD, PASSWORD, f"{USER}:",
                     streams=(proc.stdout, proc.stderr))


# ---------------------------------------------------------------------------------------------
# the key in an error body


class _EchoHandler(loopback_openai._Handler):
    """Answers every chat completion with HTTP `owner.echo_status` and an error body that
    echoes `owner.echo` (as a careless proxy echoes the request's Authorization header)."""

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        owner = self.server.owner  # type: ignore[attr-defined]
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return super().do_POST()
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with owner._lock:
            owner.counters.requests += 1
        return self._json(owner.echo_status, {"error": {
            "message": f"{owner.echo} is not allowed here", "type": "invalid_request_error"}})


class Echo(LoopbackOpenAI):
    def __init__(self, status: int, echo: str, **kwargs):
        super().__init__(**kwargs)
        self.echo_status, self.echo = status, echo

    def __enter__(self) -> "Echo":
        super().__enter__()
        self._httpd.RequestHandlerClass = _EchoHandler  # type: ignore[union-attr]
        return self


@pytest.mark.parametrize("secret", [f"Bearer {KEY}", pytest.param(KEY[:10], marks=pytest.mark.slow)],
                         ids=["whole_key", "prefix"])
def test_an_error_body_echoing_the_key_reaches_no_report_and_no_stderr(workspace, secret):
    with Echo(400, secret) as server:
        params = openai_params(workspace, server.base_url)
        proc = run_cli(["annotate-holistic", "--params", params.name], workspace, env())
        line = assert_one_line(proc, "10 of 10 holistic requests failed", "HTTP 400", code=3)
        assert HEAD not in line and "[redacted]" in line
        # over a threshold the failures are written: report.json and the response shards
        lenient = openai_params(workspace, server.base_url, name="lenient.yaml",
                                annotate={"max_failed_share": 1.0})
        again = run_cli(["annotate-holistic", "--params", lenient.name], workspace, env())
    assert again.returncode == 0, again.stderr[-3000:]
    failures = report(workspace, "holistic")["failures"]
    assert len(failures) == 10 and all("[redacted]" in f["error"] for f in failures)
    assert not leaks(workspace, HEAD, streams=(proc.stdout, proc.stderr, again.stdout,
                                                again.stderr))


# ---------------------------------------------------------------------------------------------
# credentials in base_url


def test_base_url_credentials_appear_in_no_output(workspace):
    with LoopbackOpenAI() as server:  # a server that takes any key: the credentials work
        proc = build(workspace, openai_params(workspace, with_credentials(server.base_url)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((workspace / "build" / "records" / "report.json").read_text())["records"]
    assert not leaks(workspace, PASSWORD, f"{USER}:", HEAD, streams=(proc.stdout, proc.stderr))


@pytest.mark.parametrize("userinfo", [f"{USER}:{PASSWORD}", "user:pass"],
                         ids=["long_password", "short_password"])
def test_a_refused_key_line_names_the_server_without_its_credentials(workspace, userinfo):
    with LoopbackOpenAI(api_key="sk-some-other-key") as server:
        url = with_credentials(server.base_url, userinfo)
        params = openai_params(workspace, url)
        proc = run_cli(["annotate-holistic", "--params", params.name], workspace, env())
    line = assert_one_line(proc, "answered HTTP 401", server.base_url, code=2)
    assert userinfo not in line and userinfo.split(":")[1] not in line
    assert not leaks(workspace, userinfo, HEAD)


def test_an_unreachable_server_with_credentials_fails_without_them(workspace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = openai_params(workspace, f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/v1")
    proc = run_cli(["annotate-holistic", "--params", params.name], workspace, env())
    line = assert_one_line(proc, "10 of 10 holistic requests failed", code=3)
    assert PASSWORD not in line and f"{USER}:" not in line and HEAD not in line
    assert not leaks(workspace, PASSWORD, f"{USER}:", HEAD)
