"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (tests/loopback_openai):
faults retried with bounds, Retry-After honoured, the cache asks nothing twice, failures are
retried next run, output cleaning re-asks, and the API key is written nowhere."""

from __future__ import annotations

import email.utils
import pickle
import time
from pathlib import Path

import cv2
import pytest
from loopback_openai import FAULTS, LoopbackOpenAI

import prompts
from annotators.base import AnnotationContext
from annotators.cache import ResponseCache
from annotators.openai_backend import (
    DEFAULT_BASE_URL,
    Endpoint,
    OpenAIBackend,
    endpoint_url,
    resolve_endpoint,
)
from annotators.retry import retry_after_seconds
from pipeline.core.errors import BadParamsError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import BackendParams, ModelPrice, OpenAIParams
from pipeline.core.shards import write_json, write_records
from schemas import Request, Response

KEY_ENV = "GEOPIXELD_TEST_OPENAI_KEY"
SECRET = "sk-test-SECRET123"
PRICE = ModelPrice(input_per_mtok=0.15, output_per_mtok=0.60)


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture(scope="module")
def images(isaid_root: Path) -> dict[str, bytes]:
    """Four small real patches of P0003 (small, so that 200 requests stay fast)."""
    rgb = cv2.cvtColor(cv2.imread(str(isaid_root / "val" / "images" / "P0003.png")),
                       cv2.COLOR_BGR2RGB)
    pngs = [encode_png(rgb[y:y + 48, x:x + 48].copy()) for y, x in
            [(0, 0), (100, 200), (400, 500), (700, 900)]]
    return {sha256(png): png for png in pngs}


def instance_requests(images: dict[str, bytes], n: int) -> list[Request]:
    shas = sorted(images)
    positions = ["top left", "top", "center", "bottom right"]
    return [Request(request_id=f"req-{i:04d}", tile_id=f"tile-{i % 4}", kind="instance",
                    prompt=prompts.render("instance", "v1", category_name="small vehicle",
                                          pos=positions[i % 4], mark_number=i + 1),
                    prompt_version="v1", image_sha256=shas[i % 4], object_ids=[1000 + i],
                    category="Small_Vehicle", position=positions[i % 4], mark_number=i + 1)
            for i in range(n)]


def backend_params(server: LoopbackOpenAI, backend: dict | None = None,
                   **openai: object) -> BackendParams:
    settings = dict(base_url=server.base_url, api_key_env=KEY_ENV, timeout_s=0.3,
                    backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=10, concurrency=16,
                    prices={"gpt-4o-mini": PRICE})
    settings.update(openai)
    return BackendParams(name="openai", model="gpt-4o-mini", openai=OpenAIParams(**settings),
                         **(backend or {}))


def run(params: BackendParams, requests, images,
        cache=None) -> tuple[list[Response], OpenAIBackend]:
    backend = OpenAIBackend(params, cache)
    return backend.annotate(requests, AnnotationContext(tiles={}, images=images)), backend


def test_200_requests_with_faults_all_answered_once(api_key, images):
    requests = instance_requests(images, 200)
    # slow faults outlast the 0.5 s timeout; a sound answer takes milliseconds, so none
    # times out and is then answered twice, even on a busy machine
    with LoopbackOpenAI(fault_rate=0.2, seed=7, slow_s=0.8, api_key=api_key) as server:
        responses, backend = run(backend_params(server, timeout_s=0.5), requests, images)
    counters = server.counters
    assert [r.request_id for r in responses] == [q.request_id for q in requests]
    assert all(r.status == "ok" and r.text or r.status == "failed" and r.error
               for r in responses)
    ok = [r for r in responses if r.status == "ok"]
    assert len(ok) >= 199  # 10 attempts at 20% faults: a failure is ~1e-7 likely
    # every fault kind was served, and retried
    assert set(counters.faults) == set(FAULTS)
    assert sum(counters.faults.values()) > 20
    # no request was answered twice, and every answer the server sent reached a response
    assert max(counters.answered.values()) == 1
    assert counters.answers == len(ok)
    # HTTP attempts counted by the client are the requests the server saw
    assert sum(r.attempts for r in responses) == counters.requests == backend.stats.http_attempts
    # usage and cost summed correctly
    assert sum(r.usage.prompt_tokens for r in responses) == counters.prompt_tokens
    assert sum(r.usage.completion_tokens for r in responses) == counters.completion_tokens
    for r in responses:
        assert r.cost_usd == pytest.approx(
            (r.usage.prompt_tokens * 0.15 + r.usage.completion_tokens * 0.60) / 1e6)
    assert sum(r.cost_usd for r in responses) == pytest.approx(
        (counters.prompt_tokens * 0.15 + counters.completion_tokens * 0.60) / 1e6)
    assert all(not r.cached and r.backend == "openai" and r.model == "gpt-4o-mini" for r in ok)
    # the model was asked exactly what the request says
    assert all(s["model"] == "gpt-4o-mini" and s["images"] == ["image/png/auto"]
               for s in counters.seen)


def test_retry_after_is_honoured(api_key, images):
    requests = instance_requests(images, 1)
    with LoopbackOpenAI(script=["429"], retry_after="0.2") as server:
        started = time.monotonic()
        (response,), backend = run(backend_params(server), requests, images)
        waited = time.monotonic() - started
    assert response.status == "ok" and response.attempts == 2
    assert waited >= 0.2 and response.latency_s >= 0.2
    assert backend.stats.retries == {"rate limited (429)": 1}


def test_retry_after_header_forms():
    now = time.time()
    assert retry_after_seconds({"retry-after": "1.5"}, 60) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250"}, 60) == 0.25
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after_seconds({"retry-after": date}, 60) <= 30
    assert retry_after_seconds({"retry-after": "3600"}, 60) == 60  # capped
    assert retry_after_seconds({"retry-after": "soon"}, 60) is None
    assert retry_after_seconds({}, 60) is None


def test_cache_second_run_makes_no_call_and_changed_prompts_are_reasked(api_key, images, tmp_path):
    requests = instance_requests(images, 30)
    cache = ResponseCache(tmp_path / "responses.sqlite")
    with LoopbackOpenAI(api_key=api_key) as server:
        params = backend_params(server)
        first, _ = run(params, requests, images, cache)
        assert server.counters.requests == 30 and len(cache) == 30
        server.reset_counters()
        second, backend = run(params, requests, images, ResponseCache(cache.path))
        assert server.counters.requests == 0
        assert [r.text for r in second] == [r.text for r in first]
        assert all(r.cached for r in second) and backend.stats.cache_hits == 30
        assert [r.cost_usd for r in second] == [r.cost_usd for r in first]
        changed = [q.model_copy(update={"prompt": q.prompt.replace("small vehicle", "car")})
                   if i in (3, 11, 27) else q for i, q in enumerate(requests)]
        third, _ = run(params, changed, images, cache)
        assert server.counters.requests == 3
        assert set(server.counters.answered_prompts) == {changed[i].prompt for i in (3, 11, 27)}
        assert [r.cached for r in third].count(False) == 3
        assert all(r.status == "ok" for r in third)


def test_failed_requests_are_not_cached_and_retried_next_run(api_key, images, tmp_path):
    requests = instance_requests(images, 8)
    cache = ResponseCache(tmp_path / "responses.sqlite")
    with LoopbackOpenAI(api_key=api_key) as server:
        params = backend_params(server, max_attempts=3)
        server.fail_prompts = {requests[5].prompt}
        first, _ = run(params, requests, images, cache)
        assert [r.status for r in first].count("ok") == 7
        assert first[5].status == "failed" and first[5].text == ""
        assert first[5].error == "server error (500) after 3 attempts"
        assert first[5].attempts == 3 and len(cache) == 7
        server.fail_prompts.clear()  # the server heals
        server.reset_counters()
        second, _ = run(params, requests, images, cache)
    assert server.counters.requests == 1
    assert second[5].status == "ok" and not second[5].cached
    assert all(r.cached for i, r in enumerate(second) if i != 5)


def test_api_key_is_written_nowhere(api_key, images, tmp_path):
    requests = instance_requests(images, 12)
    cache = ResponseCache(tmp_path / "cache" / "responses.sqlite")
    with LoopbackOpenAI(fault_rate=0.3, seed=3, slow_s=0.6, api_key=api_key) as server:
        params = backend_params(server, max_attempts=2)
        responses, backend = run(params, requests, images, cache)
        with pytest.raises(BadParamsError) as refused:  # a server that refuses the key
            with LoopbackOpenAI(api_key="sk-other") as other:
                run(backend_params(other), requests, images)
    write_records(tmp_path / "responses.parquet", responses, Response)
    write_json(tmp_path / "stats.json", backend.stats.as_dict())
    (tmp_path / "backend.pickle").write_bytes(pickle.dumps(backend))
    for closed in (False, True):  # the write-ahead log while open, the database once closed
        if closed:
            cache.close()
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert any(p.name == "responses.sqlite" for p in written)
        assert closed or any(p.name == "responses.sqlite-wal" for p in written)
        for path in written:
            assert b"SECRET123" not in path.read_bytes(), path
    assert "SECRET123" not in refused.value.one_line()
    assert "HTTP 401" in refused.value.one_line()
    assert all("SECRET123" not in repr(r) for r in responses)


def test_missing_key_variable_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("GEOPIXELD_NO_SUCH_KEY", raising=False)
    params = BackendParams(name="openai", model="m",
                           openai=OpenAIParams(api_key_env="GEOPIXELD_NO_SUCH_KEY"))
    with pytest.raises(BadParamsError) as err:
        OpenAIBackend(params)
    line = err.value.one_line()
    assert "GEOPIXELD_NO_SUCH_KEY" in line and "\n" not in line


def test_malformed_model_output_is_reasked_and_never_reaches_a_response(api_key, images):
    requests = instance_requests(images, 3)

    def answer(prompt: str, call: int) -> str:
        if "number 3 " in prompt:  # this one is malformed every time
            return "<p> hi </p> [SEG] marked with number 3"
        return "<p> hi </p> [SEG] marked with number 3" if call == 0 else \
            "A white car parked beside the road."

    with LoopbackOpenAI(answer=answer, api_key=api_key) as server:
        responses, backend = run(backend_params(server, {"clean_retries": 2}), requests, images)
    good, bad = responses[:2], responses[2]
    assert [r.text for r in good] == ["A white car parked beside the road."] * 2
    assert all(r.status == "ok" and r.attempts == 2 for r in good)
    assert bad.status == "failed" and bad.text == "" and bad.attempts == 3
    assert bad.error == "output cleaning refused 3 answers: tags, tags, tags"
    assert bad.usage.completion_tokens > 0 and bad.cost_usd > 0  # paid answers are counted
    assert backend.stats.cleaning_refusals == {"tags": 5}
    # a re-ask is not the same greedy call again: another seed, some temperature
    reasks = [s for s in server.counters.seen if s["seed"] != 0]
    assert reasks and all(s["temperature"] == 0.7 for s in reasks)
    assert all("<" not in r.text and "[SEG]" not in r.text for r in responses)


def test_leaked_mark_number_is_cleaned_in_place(api_key, images):
    requests = instance_requests(images, 2)
    with LoopbackOpenAI(answer=lambda p, c: "Sure! The car marked with number 2 is white.",
                        api_key=api_key) as server:
        responses, backend = run(backend_params(server), requests, images)
    assert [r.text for r in responses] == ["The car is white."] * 2
    assert server.counters.requests == 2
    assert backend.stats.cleaning_fixes["mark_number_removed"] == 2


def test_jpeg_encoding_duplicates_and_unpriced_model(api_key, images, tmp_path):
    requests = instance_requests(images, 4)
    twice = requests + [requests[0].model_copy(update={"request_id": "req-dup"})]
    cache = ResponseCache(tmp_path / "responses.sqlite")
    with LoopbackOpenAI(api_key=api_key) as server:
        png, _ = run(backend_params(server), twice, images, cache)
        assert server.counters.requests == 4  # the duplicate question is asked once
        assert png[4].request_id == "req-dup" and png[4].text == png[0].text and png[4].cached
        server.reset_counters()
        params = backend_params(server, image_format="jpeg", jpeg_quality=80, image_detail="low",
                                prices={})
        jpeg, backend = run(params, requests, images, cache)
    assert server.counters.requests == 4  # another image encoding is another question
    assert all(s["images"] == ["image/jpeg/low"] for s in server.counters.seen)
    assert all(r.status == "ok" and r.cost_usd == 0 for r in jpeg)
    assert backend.stats.unpriced_models == {"gpt-4o-mini"}


def test_unreachable_server_or_missing_image_fails_with_reason(api_key, images):
    requests = instance_requests(images, 3)
    no_image = requests[0].model_copy(update={"request_id": "req-x", "image_sha256": "f" * 64})
    with LoopbackOpenAI() as server:
        params = backend_params(server, max_attempts=2)
    responses, backend = run(params, requests + [no_image], images)  # the server is gone
    assert all(r.status == "failed" and r.error == "connection dropped after 2 attempts"
               for r in responses[:3])
    assert responses[3].status == "failed" and responses[3].error.startswith("image: ")
    assert responses[3].attempts == 0
    assert backend.stats.failed == 4


def test_server_url_from_params_then_openai_base_url_then_default(api_key, images, monkeypatch):
    requests = instance_requests(images, 2)
    with LoopbackOpenAI(api_key=api_key) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        responses, backend = run(backend_params(server, base_url=""), requests, images)
        assert all(r.status == "ok" for r in responses) and server.counters.requests == 2
        assert backend.stats.as_dict()["endpoint"] == {"url": server.base_url,
                                                       "source": "OPENAI_BASE_URL"}
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens
        responses, backend = run(backend_params(server), requests, images)
        assert all(r.status == "ok" for r in responses)
        assert backend.stats.as_dict()["endpoint"] == {"url": server.base_url, "source": "params"}
    assert resolve_endpoint(OpenAIParams(), environ={}) == Endpoint(DEFAULT_BASE_URL, "default")
    # what a report shows of a server: no credentials, no query
    assert endpoint_url("https://user:pw@llm.example:8443/v1?api-key=x#f") == \
        "https://llm.example:8443/v1"
    with pytest.raises(BadParamsError) as bad:
        resolve_endpoint(OpenAIParams(), environ={"OPENAI_BASE_URL": "ftp://u:hunter2-pw@h/v1"})
    line = bad.value.one_line()
    assert "OPENAI_BASE_URL" in line and "hunter2" not in line


def test_token_limit_field_for_servers_that_refuse_max_tokens(api_key, images, tmp_path):
    requests = instance_requests(images, 3)
    cache = ResponseCache(tmp_path / "responses.sqlite")
    with LoopbackOpenAI(api_key=api_key, token_field="max_completion_tokens") as server:
        with pytest.raises(BadParamsError) as refused:  # every request would fail: one line
            run(backend_params(server), requests, images)
        assert "HTTP 400" in refused.value.one_line()
        assert "token_limit_field" in refused.value.one_line()
        server.reset_counters()
        params = backend_params(server, token_limit_field="max_completion_tokens")
        responses, _ = run(params, requests, images, cache)
        assert all(r.status == "ok" for r in responses)
        assert all(s["max_completion_tokens"] == 128 and s["max_tokens"] is None
                   for s in server.counters.seen)
    # the field an answer was asked with is not part of its cache key
    with LoopbackOpenAI(api_key=api_key, token_field="max_tokens") as server:
        again, _ = run(backend_params(server), requests, images, cache)
    assert server.counters.requests == 0 and all(r.cached for r in again)
