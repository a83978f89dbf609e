"""The run-wide request limit: at most `concurrency` requests in flight at once, and one
rate-limit pause, for every shard task of a run, in whatever thread or process it runs.

A rate limit is the account's and `concurrency` is what the server sees, so neither may be a
shard task's own: two tasks side by side would put twice as many requests in flight, and a 429
seen by one would not slow the other. `request_limiter(name, concurrency)` is shared by every
task that names the same limit (`name`: the server and key a backend talks to):

- in one process (the local `threads` and `synchronous` schedulers; stages run the shards of a
  backend that `shares_request_limit` in threads for this reason): one slot pool that works
  across the event loops of several threads, and one "paused until" time;
- on a dask.distributed cluster (the task runs in a worker): the same in each worker process,
  plus a `distributed.Semaphore(max_leases=concurrency)` that every request of every worker
  holds a lease of while in flight, and a `distributed.Variable` holding the wall-clock time a
  429's Retry-After pauses the run until (read before each request).

`slot()` waits out the pause, takes a slot, waits out a pause set meanwhile, and holds the slot
while the request is in flight; `pause(seconds)` pauses every later request of the run.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

# longest single wait for a cluster lease before the waiter looks again (so that a cancelled
# waiter gives its thread back within this time)
LEASE_POLL_S = 1.0


class _Slots:
    """At most `size` holders at once, across threads and their event loops: a waiter parks on
    a future of its own loop and a release hands the slot over through that loop, first come
    first served."""

    def __init__(self, size: int):
        self.size = size
        self._held = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque = collections.deque()  # (loop, future)

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._held < self.size and not self._waiters:
                self._held += 1
                return
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                try:
                    self._waiters.remove(waiter)
                    handed_over = False
                except ValueError:  # a release handed the slot to us meanwhile
                    handed_over = True
            if handed_over:
                self.release()
            raise

    def release(self) -> None:
        while True:
            with self._lock:
                if not self._waiters:
                    self._held -= 1
                    return
                loop, future = self._waiters.popleft()  # the slot goes on to it: held stays
            try:
                loop.call_soon_threadsafe(_grant, future)
                return
            except RuntimeError:  # its loop has closed: hand the slot to the next waiter
                continue


def _grant(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RequestLimiter:
    """The limit of one process (see the module docstring)."""

    def __init__(self, name: str, concurrency: int):
        self.name, self.concurrency = name, concurrency
        self._slots = _Slots(concurrency)
        self._lock = threading.Lock()
        self._paused_until = 0.0  # time.monotonic() before which no request starts

    async def _wait_pause(self) -> None:
        while (left := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(left)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._wait_pause()
        await self._slots.acquire()
        try:
            await self._wait_pause()
            yield
        finally:
            self._slots.release()

    async def pause(self, seconds: float) -> None:
        """No request of the run starts in the next `seconds` (a 429's Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


class ClusterRequestLimiter(RequestLimiter):
    """The limit of every worker of a dask.distributed cluster: this process's slots, then a
    lease of the cluster's semaphore for each request in flight; the pause is shared through a
    cluster variable (wall-clock time, as workers may run on several machines)."""

    def __init__(self, name: str, concurrency: int):
        from distributed import Semaphore, Variable, get_client

        super().__init__(name, concurrency)
        # made here, in the task's thread, so that both bind to this worker and its client
        self._semaphore = Semaphore(max_leases=concurrency, name=name)
        self._semaphore.register()
        self._pause_var = Variable(f"{name}-paused-until", client=get_client())
        self._seen_until = 0.0  # the cluster's pause as last read (time.time())
        # threads that wait for leases and read the pause (distributed's calls block)
        self._pool = ThreadPoolExecutor(concurrency + 1, thread_name_prefix="request-limit")

    def _lease(self) -> bool:
        return bool(self._semaphore.acquire(timeout=LEASE_POLL_S))

    def _cluster_paused_until(self) -> float:
        try:
            self._seen_until = float(self._pause_var.get(timeout=0))
        except (TimeoutError, asyncio.TimeoutError):  # never set: no pause yet
            self._seen_until = 0.0
        return self._seen_until

    async def _in_pool(self, fn, *args):
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def _acquire_lease(self) -> None:
        while True:
            future: Future = self._pool.submit(self._lease)
            try:
                if await asyncio.wrap_future(future):
                    return
            except asyncio.CancelledError:
                # the lease may still be granted to the thread: give it back then
                future.add_done_callback(self._give_back)
                raise

    def _give_back(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None and future.result():
            self._semaphore.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with super().slot():
            await self._acquire_lease()
            try:
                while (left := await self._in_pool(self._cluster_paused_until)
                       - time.time()) > 0:
                    await asyncio.sleep(left)
                yield
            finally:
                await asyncio.shield(self._in_pool(self._semaphore.release))

    async def pause(self, seconds: float) -> None:
        await super().pause(seconds)
        until = time.time() + seconds
        await self._in_pool(self._set_pause, until)

    def _set_pause(self, until: float) -> None:
        # one write, unless the pause last read is longer; two workers pausing at once keep
        # the later write (both about a Retry-After from now)
        if until > self._seen_until:
            self._pause_var.set(until)


_LIMITERS: dict[tuple[str, int], RequestLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def _in_dask_worker() -> bool:
    if "distributed" not in sys.modules:  # never imported: not a dask worker
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def request_limiter(name: str, concurrency: int) -> RequestLimiter:
    """The run-wide limiter of `name` in this process (a cluster one inside a dask worker),
    made by the first task that asks for it."""
    key = (name, concurrency)
    with _LIMITERS_LOCK:
        limiter: Optional[RequestLimiter] = _LIMITERS.get(key)
        if limiter is None:
            cls = ClusterRequestLimiter if _in_dask_worker() else RequestLimiter
            limiter = _LIMITERS[key] = cls(name, concurrency)
        return limiter

