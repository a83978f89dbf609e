"""Batch API mode of the openai backend against the loopback server's files/batches API: every
request answered at the batch discount, files split under the limits, a run killed after the
batch was created resumes that batch (one batch created, nothing paid twice), a create whose
answer was lost is found again, failed lines and refused answers are asked again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from loopback_openai import LoopbackOpenAI

import prompts
from annotators.base import AnnotationContext
from annotators.cache import ResponseCache
from annotators.openai_backend import OpenAIBackend
from annotators.openai_batch import split_lines
from pipeline.core.errors import BadParamsError
from pipeline.core.imaging import encode_png, sha256
from pipeline.core.params import BackendParams, BatchParams, ModelPrice, OpenAIParams
from schemas import Request

KEY_ENV = "GEOPIXELD_TEST_BATCH_KEY"
SECRET = "sk-test-BATCH-SECRET"
PRICE = ModelPrice(input_per_mtok=0.15, output_per_mtok=0.60)
ISAID = Path(__file__).resolve().parent.parent / "data" / "isaid"
POSITIONS = ["top left", "top", "center", "bottom right"]


def patches() -> dict[str, bytes]:
    """Three small real patches of P0003, by sha256."""
    rgb = cv2.cvtColor(cv2.imread(str(ISAID / "val" / "images" / "P0003.png")), cv2.COLOR_BGR2RGB)
    pngs = [encode_png(rgb[y:y + 32, x:x + 32].copy()) for y, x in [(0, 0), (300, 300), (600, 900)]]
    return {sha256(png): png for png in pngs}


def instance_requests(images: dict[str, bytes], n: int) -> list[Request]:
    shas = sorted(images)
    return [Request(request_id=f"req-{i:04d}", tile_id=f"tile-{i % 3}", kind="instance",
                    prompt=prompts.render("instance", "v1", category_name="ship",
                                          pos=POSITIONS[i % 4], mark_number=i + 1),
                    prompt_version="v1", image_sha256=shas[i % 3], object_ids=[100 + i],
                    category="ship", position=POSITIONS[i % 4], mark_number=i + 1)
            for i in range(n)]


def batch_params(base_url: str, **batch: object) -> BackendParams:
    settings = dict(poll_interval_s=0.01, poll_backoff=1.0, poll_max_interval_s=0.05,
                    max_wait_s=10.0)
    settings.update(batch)
    return BackendParams(name="openai", model="gpt-4o-mini", openai=OpenAIParams(
        base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0, backoff_base_s=0.01,
        backoff_max_s=0.05, max_attempts=4, mode="batch", prices={"gpt-4o-mini": PRICE},
        batch=BatchParams(**settings)))


def run(params: BackendParams, requests, images, cache_path: Path):
    backend = OpenAIBackend(params, ResponseCache(cache_path))
    return backend.annotate(requests, AnnotationContext(tiles={}, images=images)), backend


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return patches()


def test_batch_run_answers_all_at_the_discount_and_caches(api_key, images, tmp_path):
    requests = instance_requests(images, 12)
    cache = tmp_path / "responses.sqlite"
    with LoopbackOpenAI(api_key=api_key, batch_polls=3) as server:
        params = batch_params(server.base_url)
        responses, backend = run(params, requests, images, cache)
        c = server.counters
        assert c.requests == 0  # no chat completion: everything went through the batch
        assert (c.files_uploaded, c.batches_created, c.batch_lines) == (1, 1, 12)
        assert c.batch_polls >= 3 and backend.stats.batch_polls == c.batch_polls
        assert [r.request_id for r in responses] == [q.request_id for q in requests]
        assert all(r.status == "ok" and r.text and not r.cached for r in responses)
        assert max(c.answered.values()) == 1 and c.answers == 12
        # half price: tokens the server counted, at the model's price, times 0.5
        full = (c.prompt_tokens * 0.15 + c.completion_tokens * 0.60) / 1e6
        assert sum(r.cost_usd for r in responses) == pytest.approx(0.5 * full)
        assert all(s["model"] == "gpt-4o-mini" and s["images"] == ["image/png/auto"]
                   for s in c.seen)
        assert ResponseCache(cache).open_batches(server.base_url) == []  # collected

        server.reset_counters()  # a second run: all from the cache, nothing sent
        again, _ = run(params, requests, images, cache)
        assert server.counters.files_uploaded == 0 and server.counters.batches_created == 0
        assert [r.text for r in again] == [r.text for r in responses]
        assert all(r.cached for r in again)
    assert all(SECRET.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_split_under_small_limits_makes_several_files(api_key, images, tmp_path):
    requests = instance_requests(images, 11)
    with LoopbackOpenAI(api_key=api_key, batch_polls=1) as server:
        responses, backend = run(batch_params(server.base_url, max_requests_per_file=4),
                                 requests, images, tmp_path / "c.sqlite")
    assert server.counters.files_uploaded == 3 and server.counters.batches_created == 3
    assert backend.stats.batch_files == 3
    assert all(r.status == "ok" for r in responses)
    assert max(server.counters.answered.values()) == 1

    lines = [(f"k{i}", b"x" * size + b"\n") for i, size in enumerate([10, 10, 10, 40, 10])]
    files, too_large = split_lines(lines, max_requests=10, max_bytes=25)
    assert [[k for k, _ in f] for f in files] == [["k0", "k1"], ["k2", "k4"]]
    assert too_large == ["k3"]
    assert all(sum(len(b) for _, b in f) <= 25 for f in files)


def test_byte_limit_splits_and_an_oversized_request_fails_alone(api_key, images, tmp_path):
    requests = instance_requests(images, 4)
    big = requests[0].model_copy(update={"request_id": "req-big", "prompt": "word " * 2000})
    with LoopbackOpenAI(api_key=api_key, batch_polls=1) as server:
        # a line is 1 to 3 kB here (image as a data URL): 4 kB holds one or two
        responses, _ = run(batch_params(server.base_url, max_bytes_per_file=4000),
                           requests + [big], images, tmp_path / "c.sqlite")
        inputs = [server.files[b["input_file_id"]] for b in server.batches.values()]
    assert len(inputs) == server.counters.files_uploaded >= 3
    assert all(len(f) <= 4000 for f in inputs) and sum(f.count(b"\n") for f in inputs) == 4
    assert [r.status for r in responses] == ["ok"] * 4 + ["failed"]
    assert "max_bytes_per_file" in responses[4].error


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_openai_batch import batch_params, instance_requests, patches, run
images = patches()
run(batch_params({url!r}), instance_requests(images, 9), images, {cache!r})
"""


def test_killed_after_batch_creation_resumes_the_same_batch(api_key, images, tmp_path):
    cache = tmp_path / "responses.sqlite"
    requests = instance_requests(images, 9)
    env = dict(os.environ, **{KEY_ENV: api_key})
    with LoopbackOpenAI(api_key=api_key, batch_polls=10 ** 9) as server:  # never finishes
        script = _CHILD.format(tests=str(Path(__file__).parent), url=server.base_url,
                               cache=str(cache))
        child = subprocess.Popen([sys.executable, "-c", script], env=env,
                                 cwd=Path(__file__).parent.parent)
        try:
            deadline = time.monotonic() + 30
            while not (cache.exists() and server.counters.batch_polls >= 2):
                assert child.poll() is None and time.monotonic() < deadline, "child ended"
                time.sleep(0.02)
            opened = ResponseCache(cache).open_batches(server.base_url)
            assert len(opened) == 1 and opened[0].batch_id  # persisted before polling
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert server.counters.batches_created == 1 and server.counters.answers == 0

        server.batch_polls = 0  # the batch finishes at the next poll
        responses, backend = run(batch_params(server.base_url), requests, images, cache)
    c = server.counters
    assert (c.files_uploaded, c.batches_created) == (1, 1)  # the same batch, collected
    assert backend.stats.batches_resumed == 1 and backend.stats.batches_created == 0
    assert all(r.status == "ok" for r in responses)
    assert c.batch_lines == 9 and max(c.answered.values()) == 1  # nothing paid twice
    assert ResponseCache(cache).open_batches(server.base_url) == []


def test_lost_create_answer_and_create_failure_make_no_second_batch(api_key, images, tmp_path):
    cache = tmp_path / "responses.sqlite"
    requests = instance_requests(images, 5)
    # the first create makes the batch but its answer is lost; the run finds it by listing
    with LoopbackOpenAI(api_key=api_key, batch_polls=1,
                        batch_create_faults=["drop_after"]) as server:
        responses, backend = run(batch_params(server.base_url), requests, images, cache)
        assert server.counters.batches_created == 1 and backend.stats.batches_created == 0
        assert all(r.status == "ok" for r in responses)
    # every create refused: the uploaded file is kept, the next run makes its batch from it
    with LoopbackOpenAI(api_key=api_key, batch_polls=1,
                        batch_create_faults=["500"] * 4) as server:
        params = batch_params(server.base_url)
        others = [r.model_copy(update={"prompt": r.prompt.replace("ship", "boat")})
                  for r in requests]
        first, _ = run(params, others, images, cache)
        assert all(r.status == "failed" and "batches.create" in r.error for r in first)
        assert server.counters.files_uploaded == 1 and server.counters.batches_created == 0
        second, backend = run(params, others, images, cache)
        assert all(r.status == "ok" for r in second)
        assert server.counters.files_uploaded == 1 and server.counters.batches_created == 1
        assert backend.stats.batches_resumed == 1


def test_failed_lines_and_refused_answers_are_asked_again(api_key, images, tmp_path):
    requests = instance_requests(images, 6)

    def answer(prompt: str, call: int) -> str:
        if "number 2 " in prompt and call == 0:
            return "<p> a ship </p> [SEG]"  # refused by cleaning: re-asked in a new batch
        return "A white ship moored beside the pier."

    cache = tmp_path / "responses.sqlite"
    with LoopbackOpenAI(api_key=api_key, batch_polls=1, answer=answer) as server:
        server.fail_prompts = {requests[4].prompt}
        params = batch_params(server.base_url)
        first, backend = run(params, requests, images, cache)
        assert server.counters.batches_created == 2  # the re-ask went in a second batch
        assert first[1].status == "ok" and first[1].attempts == 2
        assert backend.stats.cleaning_refusals == {"tags": 1}
        assert [s["seed"] for s in server.counters.seen].count(1) == 1
        assert first[4].status == "failed" and "HTTP 500" in first[4].error
        assert sum(r.status == "ok" for r in first) == 5
        server.fail_prompts.clear()
        server.reset_counters()
        second, _ = run(params, requests, images, cache)
    assert server.counters.batch_lines == 1  # only the failed one was sent again
    assert all(r.status == "ok" for r in second)


def test_batch_mode_needs_the_cache(api_key):
    params = batch_params("http://127.0.0.1:9/v1")
    with pytest.raises(BadParamsError) as err:
        OpenAIBackend(params, cache=None)
    assert "annotate.cache.enabled" in err.value.one_line()
