"""`annotate.backend.openai.concurrency` and a 429's Retry-After hold for the whole run, not for
one shard task: two tasks side by side (threads of one process, or two worker processes of a
dask.distributed cluster) never have more than `concurrency` requests in flight at the loopback
server together, and a rate limit seen by one pauses the other.

The two-worker-process run takes half a minute here (cluster start-up), so it is marked slow;
the default run checks the cluster limiter on an in-process cluster instead: two limiters that
share nothing but the cluster's semaphore and variable."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from loopback_openai import LoopbackOpenAI

from annotators.base import AnnotationContext, local_scheduler_for
from annotators.limiter import ClusterRequestLimiter
from annotators.openai_backend import OpenAIBackend
from pipeline.core.params import BackendParams, OpenAIParams
from schemas import Request

KEY_ENV = "GEOPIXELD_TEST_LIMIT_KEY"
SECRET = "sk-test-LIMIT-SECRET"
LATENCY_S = 0.15  # each answer held open this long at the server
RETRY_AFTER_S = 1.0
PROPAGATION_S = 0.3  # longest a pause may take to reach another task (a busy 2-core machine)


def params(base_url: str, concurrency: int) -> BackendParams:
    return BackendParams(name="openai", model="gpt-4o-mini", openai=OpenAIParams(
        base_url=base_url, api_key_env=KEY_ENV, concurrency=concurrency, timeout_s=10.0,
        backoff_base_s=0.01, backoff_max_s=0.02, retry_after_max_s=5.0, max_attempts=4,
        http_client="httpx", prices={}))


def text_requests(tag: str, n: int) -> list[Request]:
    """`n` distinct text-only instance questions; `tag` tells the askers apart at the server."""
    return [Request(request_id=f"{tag}-{i}", tile_id="t", kind="instance",
                    prompt=f"Describe object {tag}-{i}.", prompt_version="v1", image_sha256="",
                    object_ids=[i]) for i in range(n)]


def ask(base_url: str, concurrency: int, tag: str, n: int, start_at: float = 0.0) -> list[str]:
    """One shard task: `n` questions through a backend of its own; waits until `start_at`
    (time.time()) so that tasks on several workers start together. Returns the statuses."""
    backend = OpenAIBackend(params(base_url, concurrency))
    requests = text_requests(tag, n)
    time.sleep(max(0.0, start_at - time.time()))
    return [r.status for r in backend.annotate(requests, AnnotationContext(tiles={}))]


def check_pause(server: LoopbackOpenAI, tags: list[str]) -> None:
    """After the 429 (Retry-After RETRY_AFTER_S), no request of any task reached the server
    until the pause was over, and every task still had requests to send after it."""
    arrivals = server.counters.arrivals
    (limited,) = [(t, prompt) for t, fault, prompt in arrivals if fault == "429"]
    at, prompt = limited
    other = next(tag for tag in tags if f"object {tag}-" not in prompt)
    # requests sent before the pause reached their task (one scheduler round trip on a
    # cluster) may arrive just after the 429; none later, until the pause is over
    early = [t - at for t, _, _ in arrivals if PROPAGATION_S < t - at < RETRY_AFTER_S - 0.05]
    assert early == [], f"requests {early} s after a 429 asking to wait {RETRY_AFTER_S} s"
    assert any(f"object {other}-" in p and t - at >= RETRY_AFTER_S - 0.05
               for t, _, p in arrivals), "the other task had nothing left after the 429"


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def test_an_api_backend_runs_its_local_shards_in_threads(api_key):
    backend = OpenAIBackend(params("http://127.0.0.1:9/v1", 4))
    assert backend.shares_request_limit
    assert local_scheduler_for(backend, "processes") == "threads"


def _in_threads(base_url: str, concurrency: int, n: int) -> list[list[str]]:
    results: list[list[str]] = [[], []]

    def task(i: int) -> None:
        results[i] = ask(base_url, concurrency, f"t{i}", n)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_two_shard_threads_share_concurrency_and_a_rate_limit_pause(api_key):
    with LoopbackOpenAI(latency_s=LATENCY_S, api_key=api_key) as server:
        results = _in_threads(server.base_url, 3, 10)
    assert all(s == ["ok"] * 10 for s in results)
    # each task alone would put 3 in flight: together still 3
    assert server.counters.max_in_flight == 3

    with LoopbackOpenAI(latency_s=0.05, api_key=api_key, script=["429"],
                        retry_after=str(RETRY_AFTER_S)) as server:
        results = _in_threads(server.base_url, 2, 6)
    assert all(s == ["ok"] * 6 for s in results)
    check_pause(server, ["t0", "t1"])


class _InFlight:
    """Slot holders of every limiter of this process at once, and the most seen."""

    def __init__(self) -> None:
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


IN_FLIGHT = _InFlight()


def _hold_slots(name: str, concurrency: int, n: int, pause_s: float = 0.0) -> list[float]:
    """A limiter of its own (not the process's shared one) on a dask worker: `n` holders of a
    slot for 0.1 s each, after pausing the run `pause_s`; returns when each got its slot
    (time.time())."""
    limiter = ClusterRequestLimiter(name, concurrency)

    async def hold() -> float:
        async with limiter.slot():
            got = time.time()
            IN_FLIGHT.enter()
            await asyncio.sleep(0.1)
            IN_FLIGHT.leave()
            return got

    async def run() -> list[float]:
        if pause_s:
            await limiter.pause(pause_s)
        return list(await asyncio.gather(*(hold() for _ in range(n))))

    return asyncio.run(run())


def test_cluster_limiters_share_the_semaphore_and_the_pause():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as made, Client(made) as client:
        workers = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(_hold_slots, "limit-test", 2, 6, pure=False,
                                 workers=[worker]) for worker in workers]
        client.gather(futures)
        # each limiter alone would let 2 in: together still 2
        assert IN_FLIGHT.most == 2

        paused_at = time.time()
        client.submit(_hold_slots, "pause-test", 2, 0, RETRY_AFTER_S, pure=False,
                      workers=[workers[0]]).result()
        got = client.submit(_hold_slots, "pause-test", 2, 3, pure=False,
                            workers=[workers[1]]).result()
    assert min(got) >= paused_at + RETRY_AFTER_S - 0.05  # the other limiter waited it out


@pytest.fixture(scope="module")
def cluster():
    """A dask.distributed LocalCluster of 2 worker processes (one thread each)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as made, Client(made) as client:
        yield client


def _on_two_workers(client, base_url: str, concurrency: int, n: int) -> list[list[str]]:
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    start_at = time.time() + 2.0  # both tasks imported and ready by then
    futures = [client.submit(ask, base_url, concurrency, f"w{i}", n, start_at, pure=False,
                             workers=[worker], allow_other_workers=False)
               for i, worker in enumerate(workers)]
    return client.gather(futures)


@pytest.mark.slow
def test_two_worker_processes_share_concurrency_and_a_rate_limit_pause(api_key, cluster):
    # the workers were started with this environment: they read the key from it
    cluster.run(lambda: __import__("os").environ.__setitem__(KEY_ENV, SECRET))
    with LoopbackOpenAI(latency_s=LATENCY_S, api_key=api_key) as server:
        results = _on_two_workers(cluster, server.base_url, 3, 10)
    assert all(s == ["ok"] * 10 for s in results)
    assert server.counters.max_in_flight == 3  # each worker alone would put 3 in flight

    with LoopbackOpenAI(latency_s=0.05, api_key=api_key, script=["429"],
                        retry_after=str(RETRY_AFTER_S)) as server:
        results = _on_two_workers(cluster, server.base_url, 2, 6)
    assert all(s == ["ok"] * 6 for s in results)
    check_pause(server, ["w0", "w1"])
