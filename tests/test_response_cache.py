"""The response cache: content keys, successes only, durable at once, several writers."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sqlite3

import pytest

from annotators.cache import ResponseCache, cache_key
from pipeline.core.params import CacheParams
from schemas import Response, Usage

KEY_FIELDS = dict(backend="openai", model="gpt-4o-mini", prompt_version="v1",
                  prompt="Describe the image in four short sentences.", image_sha256="ab" * 32,
                  generation={"temperature": 0.0, "max_tokens": 128, "seed": 0,
                              "image_format": "png", "image_detail": "auto"})


def response(i: int, status: str = "ok", writer: str = "a") -> Response:
    return Response(request_id=f"r{i}", tile_id="t", kind="instance", status=status,
                    text=f"A white car number {i} by {writer}." if status == "ok" else "",
                    error=None if status == "ok" else "timeout after 6 attempts",
                    backend="openai", model="gpt-4o-mini", prompt_version="v1",
                    usage=Usage(prompt_tokens=100 + i, completion_tokens=10),
                    cost_usd=0.001 * i, latency_s=0.5, attempts=2)


def test_key_is_canonical_and_changes_with_every_field():
    base = cache_key(**KEY_FIELDS)
    assert len(base) == 64 and base == cache_key(**KEY_FIELDS)
    reordered = dict(KEY_FIELDS, generation=dict(reversed(KEY_FIELDS["generation"].items())))
    assert cache_key(**reordered) == base
    variants = [dict(KEY_FIELDS, **{name: value}) for name, value in [
        ("backend", "transformers"), ("model", "gpt-4o"), ("prompt_version", "v2"),
        ("prompt", "Describe the image in three short sentences."), ("image_sha256", "cd" * 32)]]
    for gen_field, value in [("temperature", 0.7), ("max_tokens", 64), ("seed", 1),
                             ("image_format", "jpeg"), ("image_detail", "low")]:
        variants.append(dict(KEY_FIELDS, generation={**KEY_FIELDS["generation"], gen_field: value}))
    keys = {cache_key(**v) for v in variants}
    assert len(keys) == len(variants) and base not in keys


def test_successes_round_trip_and_failures_are_not_stored(tmp_path):
    cache = ResponseCache(tmp_path / "c" / "responses.sqlite")
    assert cache.get("k1") is None
    assert cache.put("k1", response(1), raw_text="Sure! A white car number 1 by a.",
                     served_model="gpt-4o-mini-2024-07-18")
    got = cache.get("k1")
    assert got.text == "A white car number 1 by a."
    assert got.raw_text == "Sure! A white car number 1 by a."
    assert got.served_model == "gpt-4o-mini-2024-07-18" and got.model == "gpt-4o-mini"
    assert got.usage == Usage(prompt_tokens=101, completion_tokens=10)
    assert (got.cost_usd, got.latency_s, got.attempts) == (0.001, 0.5, 2)
    assert not cache.put("k2", response(2, status="failed"))
    assert cache.get("k2") is None and len(cache) == 1


def test_first_answer_kept_unless_replaced(tmp_path):
    cache = ResponseCache(tmp_path / "responses.sqlite")
    assert cache.put("k", response(1, writer="a"))
    assert not cache.put("k", response(1, writer="b"))
    assert cache.get("k").text.endswith("by a.")
    assert cache.put("k", response(1, writer="b"), replace=True)
    assert cache.get("k").text.endswith("by b.")


def test_answer_is_on_disk_before_close_and_reopens(tmp_path):
    path = tmp_path / "responses.sqlite"
    writer = ResponseCache(path)
    writer.put("k", response(3))
    reader = ResponseCache(path)  # another connection sees it without close or flush
    assert reader.get("k").text == "A white car number 3 by a."
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    clone = pickle.loads(pickle.dumps(writer))
    assert clone.get("k") is not None and clone.path == path


def _write_then_die(path: str, n: int) -> None:
    cache = ResponseCache(path)
    for i in range(n):
        cache.put(f"k{i}", response(i))
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit


def test_kill_9_loses_no_stored_answer(tmp_path):
    path = str(tmp_path / "responses.sqlite")
    proc = multiprocessing.get_context("fork").Process(target=_write_then_die, args=(path, 25))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert len(ResponseCache(path)) == 25


def _write_range(path: str, start: int, stop: int, writer: str, barrier) -> None:
    cache = ResponseCache(path, busy_timeout_s=30)
    barrier.wait()
    for i in range(start, stop):
        cache.put(f"k{i}", response(i, writer=writer))
        assert cache.get(f"k{i}") is not None


def test_two_processes_write_overlapping_keys(tmp_path):
    path = str(tmp_path / "responses.sqlite")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_range, args=(path, 0, 300, "a", barrier)),
             ctx.Process(target=_write_range, args=(path, 150, 450, "b", barrier))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = ResponseCache(path)
    assert len(cache) == 450
    for i in range(450):
        text = cache.get(f"k{i}").text
        owners = {"a"} if i < 150 else {"b"} if i >= 300 else {"a", "b"}
        assert text in {f"A white car number {i} by {w}." for w in owners}


def test_params_default_path_and_disabled(tmp_path):
    params = CacheParams()
    assert params.path == ".cache/geopixeld/responses.sqlite" and params.enabled
    assert ResponseCache.from_params(params).path.name == "responses.sqlite"
    assert ResponseCache.from_params(CacheParams(enabled=False)) is None
    with pytest.raises(ValueError):
        CacheParams(busy_timeout_s=0)


def test_request_keys_of_earlier_versions_are_kept(monkeypatch):
    """Keys of the openai backend as versions before the shared answer loop computed them (the
    limits moved to annotate.backend, base_url and the token field are run settings): answers
    cached by those versions stay hits."""
    from annotators.openai_backend import OpenAIBackend
    from pipeline.core.params import BackendParams, OpenAIParams
    from schemas import Request

    monkeypatch.setenv("GEOPIXELD_TEST_KEY_STABLE", "sk-test-stable-key")
    backend = OpenAIBackend(BackendParams(name="openai", model="gpt-4o-mini", openai=OpenAIParams(
        api_key_env="GEOPIXELD_TEST_KEY_STABLE", token_limit_field="max_completion_tokens")))
    keys = {kind: backend.request_key(Request(
        request_id="r", tile_id="t", kind=kind, prompt="Describe the plane.", prompt_version="v1",
        image_sha256="ab" * 32, object_ids=[1])) for kind in ("instance", "instance_batch")}
    assert keys == {
        "instance": "21e770b1e9fec7b64c241e5592955432e08c513ba7f1238e20a8191cc76fe604",
        "instance_batch": "225f823092c3da9472242b84c8ef5d235643c24f3ed638093e2bf9d0580f799f"}
