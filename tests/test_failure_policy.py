"""The failure policy (pipeline/core/failure_policy.py), end to end through the real CLI and a
loopback OpenAI-compatible server: a pass whose requests still fail after their retries (API
down, 500 to everything, 200 without an answer, every answer refused by cleaning) exits 3 with
one line, the previous output stays byte for byte, answers already paid for stay in the cache,
and the next run asks only the failed ones; a threshold lets a partial failure pass; compose
fails (exit 2) when too many tiles with objects make no record; parameters that would drop
every record are refused when params are loaded."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import yaml
from hostile import assert_one_line, assert_refused, cli_env, merge, run_cli, tree_digest
from loopback_openai import LoopbackOpenAI

from annotators.base import AnnotationContext
from annotators.cache import ResponseCache
from annotators.openai_backend import OpenAIBackend
from pipeline.core.failure_policy import too_many
from pipeline.core.params import BackendParams, OpenAIParams
from pipeline.core.shards import list_shards, read_records
from schemas import GroundedRecord, Request

KEY_ENV = "GEOPIXELD_POLICY_KEY"
KEY = "sk-policy-7c1e4b9d2a6f"
# what a failed run may change besides the stage's lock files: the response cache
CACHE = ".cache"


def env() -> dict[str, str]:
    return cli_env(**{KEY_ENV: KEY})


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openai_params(ws: Path, base_url: str, name: str = "openai.yaml", **sections) -> Path:
    """The workspace's params with the openai backend at `base_url`, tiny retries and waits."""
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["data"].update(root="data/isaid", splits=["val"])
    raw["annotate"]["backend"].update(name="openai", model="gpt-4o-mini")
    raw["annotate"]["backend"]["openai"].update(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0, max_attempts=2,
        backoff_base_s=0.01, backoff_max_s=0.02, retry_after_max_s=0.1, concurrency=8)
    raw["annotate"]["backend"]["clean_retries"] = 1
    merge(raw, copy.deepcopy(sections))
    path = ws / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_may_change(kind: str) -> list[str]:
    """What a failed annotate-<kind> run may leave changed: the cache, and its lock files."""
    return [CACHE, f"build/responses/.{kind}.lock", "build/responses/.geopixeld.lock"]


def instance_prompts(ws: Path) -> list[str]:
    return [r.prompt for s in list_shards(ws / "build" / "plan" / "requests" / "instance")
            for r in read_records(s, Request)]


# ---------------------------------------------------------------------------------------------
# the rule itself


def test_share_rule():
    assert not too_many(0, 10, 0.0)
    assert too_many(1, 10, 0.0)
    assert not too_many(1, 10, 0.1) and too_many(2, 10, 0.1)
    assert not too_many(0, 0, 0.0)          # nothing asked: nothing failed
    assert not too_many(10, 10, 1.0)        # 1.0 lets everything through


# ---------------------------------------------------------------------------------------------
# a 200 without an answer is a failed attempt, retried, then recorded as failed


class Hollow(LoopbackOpenAI):
    """Answers 200 without an answer: no choices, content null, or blank content; for the
    first `times` calls of each prompt (None: always)."""

    def __init__(self, shape: str, times: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.shape, self.times = shape, times
        self.hollow = 0

    def completion(self, payload: dict, prompt: str, images: list[str]) -> dict:
        out = super().completion(payload, prompt, images)
        call = int(out["id"].rsplit("-", 1)[1])
        if self.times is None or call < self.times:
            with self._lock:
                self.hollow += 1
            if self.shape == "no_choices":
                out["choices"] = []
            else:
                out["choices"][0]["message"]["content"] = None if self.shape == "null" else " \n"
        return out


@pytest.mark.parametrize("shape", ["no_choices", "null", "blank"])
def test_a_200_without_an_answer_is_retried_then_failed(monkeypatch, shape):
    monkeypatch.setenv(KEY_ENV, KEY)
    request = Request(request_id="r1", tile_id="t", kind="holistic", prompt="Describe it.",
                      prompt_version="v1", image_sha256="", object_ids=[])
    with Hollow(shape, times=1) as server:
        params = BackendParams(name="openai", model="m", openai=OpenAIParams(
            base_url=server.base_url, api_key_env=KEY_ENV, max_attempts=2, backoff_base_s=0.01,
            backoff_max_s=0.01, timeout_s=2))
        healed = OpenAIBackend(params).annotate([request], AnnotationContext(tiles={}))[0]
        assert (healed.status, healed.attempts) == ("ok", 2) and healed.text
        server.times = None
        other = request.model_copy(update={"request_id": "r2", "prompt": "Describe it again."})
        failed = OpenAIBackend(params).annotate([other], AnnotationContext(tiles={}))[0]
    cause = "no choices in the answer" if shape == "no_choices" else "empty answer"
    assert (failed.status, failed.text, failed.attempts) == ("failed", "", 2)
    assert failed.error == f"{cause} after 2 attempts"


# ---------------------------------------------------------------------------------------------
# the annotate stage: exit 3, one line, the previous output kept


def test_api_down_fails_the_build_keeps_the_export_then_a_rerun_completes(workspace):
    export = tree_digest(workspace / "build" / "export")
    records = tree_digest(workspace / "build" / "records")
    params = openai_params(workspace, f"http://127.0.0.1:{closed_port()}/v1")
    proc = run_cli(["build", "--params", params, "--split", "val", "--out", "build"], workspace,
                   env())
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("backend failed: 10 of 10 holistic requests failed after their "
                           "retries (first: "), last
    assert "connection dropped after 2 attempts" in last and "asks only the failed ones" in last
    # the good template build is still there, byte for byte
    assert tree_digest(workspace / "build" / "export") == export
    assert tree_digest(workspace / "build" / "records") == records
    assert not list((workspace / "build" / "responses").glob(".holistic.staging-*"))

    with LoopbackOpenAI() as server:  # the API is back
        params = openai_params(workspace, server.base_url)
        proc = run_cli(["build", "--params", params, "--split", "val", "--out", "build"],
                       workspace, env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert max(server.counters.answered.values()) == 1
    built = [r for s in list_shards(workspace / "build" / "records")
             for r in read_records(s, GroundedRecord)]
    assert len(built) == 10 and {r.provenance.backend for r in built} == {"openai"}


def _refused_answer(prompt: str, call: int) -> str:
    return "<p> ship </p> [SEG] is moored at the pier."


FAILING = {
    "all_500": (lambda: LoopbackOpenAI(fault_rate=1.0, faults=("500",)),
                "server error (500) after 2 attempts"),
    "no_choices": (lambda: Hollow("no_choices"), "no choices in the answer after 2 attempts"),
    "null_content": (lambda: Hollow("null"), "empty answer after 2 attempts"),
    "blank_content": (lambda: Hollow("blank"), "empty answer after 2 attempts"),
    "all_refused": (lambda: LoopbackOpenAI(answer=_refused_answer),
                    "output cleaning refused 2 answers: tags, tags"),
}


# blank content fails as null content does ("empty answer"; both shapes are retried and failed
# in-process above): its run through the stage is slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if c == "blank_content" else c for c in sorted(FAILING)])
def test_a_pass_that_answers_nothing_exits_3_and_keeps_the_previous_output(workspace, case):
    make, cause = FAILING[case]
    with make() as server:
        params = openai_params(workspace, server.base_url)
        line = assert_refused(["annotate-holistic", "--params", params], workspace,
                              "10 of 10 holistic requests failed after their retries",
                              cause, "annotate.max_failed_share is 0",
                              "the next run asks only the failed ones again",
                              code=3, may_change=stage_may_change("holistic"), env=env())
    assert line.startswith("backend failed: ")
    assert server.counters.requests >= 10


@pytest.mark.slow  # ~25 s; the API-down test covers the rerun in the default run
def test_paid_answers_are_kept_and_the_rerun_asks_only_the_failed_ones(workspace):
    prompts = instance_prompts(workspace)
    failing = prompts[0]
    k = prompts.count(failing)
    with LoopbackOpenAI() as server:
        server.fail_prompts = {failing}
        params = openai_params(workspace, server.base_url)
        export = tree_digest(workspace / "build" / "export")
        proc = run_cli(["build", "--params", params, "--split", "val", "--out", "build"],
                       workspace, env())
        assert proc.returncode == 3, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert f"{k} of {len(prompts)} instance requests failed" in last, last
        assert "server error (500) after 2 attempts" in last
        assert tree_digest(workspace / "build" / "export") == export
        first = set(server.counters.answered)
        assert max(server.counters.answered.values()) == 1
        cache = ResponseCache(workspace / CACHE / "geopixeld" / "responses.sqlite")
        assert len(cache) == len(first)  # every paid answer is kept
        cache.close()

        server.fail_prompts.clear()  # the server heals
        before = dict(server.counters.answered)
        proc = run_cli(["build", "--params", params, "--split", "val", "--out", "build"],
                       workspace, env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        answered = server.counters.answered
        assert max(answered.values()) == 1  # nothing paid twice, over both runs
        again = {fp for fp in answered if answered[fp] > before.get(fp, 0)}
        assert not again & first
        # the second run asked the failed instance requests, and the clusters never reached
        asked = server.counters.answered_prompts
        assert asked[failing] == 1 and sum(asked[p] for p in set(prompts)) == len(set(prompts))
    report = json.loads((workspace / "build" / "responses" / "instance" / "report.json")
                        .read_text())
    assert report["failed"] == 0 and report["cached"] == len(prompts) - k


def test_a_threshold_lets_a_partial_failure_pass_and_the_report_counts_it(workspace):
    prompts = instance_prompts(workspace)
    failing = prompts[0]
    k = prompts.count(failing)
    assert k / len(prompts) < 0.5
    with LoopbackOpenAI() as server:
        server.fail_prompts = {failing}
        params = openai_params(workspace, server.base_url,
                               annotate={"max_failed_share": 0.5})
        proc = run_cli(["annotate-instances", "--params", params], workspace, env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the same failures over a lower threshold fail the stage
        strict = openai_params(workspace, server.base_url, name="strict.yaml",
                               annotate={"max_failed_share": (k - 1) / len(prompts)})
        assert_refused(["annotate-instances", "--params", strict], workspace,
                       f"{k} of {len(prompts)} instance requests failed", code=3,
                       may_change=stage_may_change("instance"), env=env())
    report = json.loads((workspace / "build" / "responses" / "instance" / "report.json")
                        .read_text())
    assert report["failed"] == k and report["ok"] == len(prompts) - k
    assert report["failures"][0]["error"] == "server error (500) after 2 attempts"


# ---------------------------------------------------------------------------------------------
# the compose stage


def test_compose_fails_when_too_many_tiles_with_objects_make_no_record(workspace):
    records = [r for s in list_shards(workspace / "build" / "records")
               for r in read_records(s, GroundedRecord)]
    lengths = sorted(len(r.caption) for r in records)
    limit = lengths[len(lengths) // 2]  # about half the captions are longer
    dropped = sum(n > limit for n in lengths)
    assert 0 < dropped < len(records)
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["compose"].update(max_caption_chars=limit, max_dropped_share=0.25)
    (workspace / "strict.yaml").write_text(yaml.safe_dump(raw))
    line = assert_refused(
        ["compose", "--params", "strict.yaml"], workspace,
        f"{dropped} of {len(records)} tiles with objects made no record (first: tile ",
        "caption_too_long", "compose.max_dropped_share is 0.25", code=2,
        may_change=["build/.records.lock", "build/.geopixeld.lock"])
    assert line.startswith("bad record: ")

    raw["compose"]["max_dropped_share"] = 0.9
    (workspace / "lenient.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["compose", "--params", "lenient.yaml"], workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workspace / "build" / "records" / "report.json").read_text())
    assert report["tiles_with_objects"] == len(records)
    assert report["dropped_with_objects"] == dropped == report["dropped"]["caption_too_long"]
    assert report["records"] == len(records) - dropped


def test_default_compose_threshold_passes_the_bundled_sample(workspace):
    report = json.loads((workspace / "build" / "records" / "report.json").read_text())
    assert report["tiles_with_objects"] == report["tiles"] == report["records"]
    assert report["dropped_with_objects"] == 0


# ---------------------------------------------------------------------------------------------
# parameters that would drop every record: refused when loaded


BAD_PARAMS = {
    "caption_limits": ({"compose": {"min_caption_chars": 3000, "max_caption_chars": 2500}},
                       "compose", "min_caption_chars (3000) is above max_caption_chars (2500)"),
    "max_chars": ({"annotate": {"backend": {"max_chars": {"instance": 5}}}},
                  "annotate-instances", "max_chars.instance (5) is below what min_words"),
    "max_sentences": ({"annotate": {"backend": {"max_sentences": {"holistic": 0}}}},
                      "annotate-holistic", "max_sentences.holistic (0) must be at least 1"),
    "max_tokens": ({"annotate": {"backend": {"name": "openai", "max_tokens": 2}}},
                   "annotate-holistic", "max_tokens (2) is below min_words (3)"),
    "share": ({"annotate": {"max_failed_share": 1.5}}, "annotate-holistic",
              "annotate.max_failed_share"),
    # a URL every request would fail on (said without its credentials)
    "base_url": ({"annotate": {"backend": {"openai": {
        "base_url": "http://user:pw@127.0.0.1:99999/v1"}}}}, "annotate-holistic",
        "base_url is not a valid URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_params_that_would_drop_every_record_are_refused_at_load(workspace, case):
    change, command, needle = BAD_PARAMS[case]
    raw = merge(yaml.safe_load((workspace / "params.yaml").read_text()), change)
    (workspace / "bad.yaml").write_text(yaml.safe_dump(raw))
    line = assert_refused([command, "--params", "bad.yaml"], workspace, "bad.yaml", needle,
                          code=2, env=env())
    assert line.startswith("bad parameters: bad.yaml: ") and "user:pw" not in line


@pytest.mark.cold_cli  # exit code 3 from a fresh `python -m pipeline.cli` (the others fork)
def test_the_one_line_of_a_failed_pass_is_one_line_through_the_stage_command(workspace):
    """The same stage through `annotate-clusters` (another kind, another count)."""
    with LoopbackOpenAI(fault_rate=1.0, faults=("500",)) as server:
        params = openai_params(workspace, server.base_url)
        proc = run_cli(["annotate-clusters", "--params", params], workspace, env())
    assert_one_line(proc, "34 of 34 cluster requests failed", code=3)
