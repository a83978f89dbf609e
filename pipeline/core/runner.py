"""Map a per-shard task over shards: local worker processes by default, or a dask cluster.

Tasks read their inputs and write their outputs themselves (I/O stays on the worker); what they
return is a small report. `scheduler` (or DASK_SCHEDULER_ADDRESS) names a dask.distributed
scheduler; without one the tasks run locally: `processes` (the default: shard work is partly
pure Python, which threads would serialise on the GIL; shards are handed out one at a time in
item order), or through dask's local scheduler `threads` (for a task that must share the
process, e.g. a model loaded in memory) or `synchronous` (debugging).

Local worker processes are started by a fork server: forked from a fresh single-threaded
process, not from the caller (which may hold threads, e.g. OpenCV's or Arrow's pools, that a
plain fork would copy mid-lock); modules the tasks need are loaded once into that server.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence, TypeVar

import dask
from dask.callbacks import Callback

T = TypeVar("T")
R = TypeVar("R")


def scheduler_address(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def show_progress() -> bool:
    """Progress bars only for a person at a terminal, never in CI or pipes."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class _RichCallback(Callback):
    def __init__(self, progress, task_id):
        super().__init__()
        self._progress, self._task = progress, task_id

    def _posttask(self, key, result, dsk, state, id):  # noqa: A002 (dask's signature)
        if isinstance(key, tuple) and str(key[0]).startswith("shard-task"):
            self._progress.advance(self._task)


class _Outcome:
    """A task's result or its exception, so that no task is still running when one fails."""

    __slots__ = ("value", "error")

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error


def _settled(task, item):
    try:
        return _Outcome(value=task(item))
    except Exception as exc:  # re-raised in the caller once every task has settled
        return _Outcome(error=exc)


def _unwrap(outcomes: list[_Outcome]) -> list:
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [o.value for o in outcomes]


def map_shards(task: Callable[[T], R], items: Sequence[T], *, label: str,
               scheduler: str | None = None, local_scheduler: str = "threads",
               workers: int = 2, resources: dict | None = None) -> list[R]:
    """Run `task(item)` for every item; results in item order.

    `resources` (a dask cluster only, e.g. {"GPU": 1}): what each task takes of a worker's
    `--resources`; only workers that have them run it.

    Every task settles before anything is raised: a failing shard never leaves siblings still
    writing into a staging folder that the stage is about to remove. The first error (in item
    order) is then raised as is.
    """
    items = list(items)
    if not items:
        return []
    settled = functools.partial(_settled, task)
    address = scheduler_address(scheduler)
    if address:
        return _unwrap(_map_distributed(settled, items, address, label, resources))
    if local_scheduler == "processes" and workers > 1 and len(items) > 1:
        return _unwrap(_map_processes(settled, items, label, workers))
    if local_scheduler == "processes":
        local_scheduler = "synchronous"  # nothing to run side by side
    delayed = [dask.delayed(settled, pure=False)(it, dask_key_name=("shard-task", i))
               for i, it in enumerate(items)]
    kwargs = {"scheduler": local_scheduler}
    if local_scheduler != "synchronous":
        kwargs.update(num_workers=workers)
    with contextlib.ExitStack() as stack:
        if show_progress():
            from rich.progress import Progress
            progress = stack.enter_context(Progress(transient=True))
            stack.enter_context(_RichCallback(progress, progress.add_task(label,
                                                                          total=len(items))))
        return _unwrap(list(dask.compute(*delayed, **kwargs)))


def _map_processes(settled, items: list, label: str, workers: int) -> list[_Outcome]:
    """Tasks handed to worker processes one at a time, in item order (a split's short last
    shard comes last, so the workers finish together). Interrupted, the tasks not yet started
    are cancelled."""
    with _worker_pool(workers) as pool:
        futures = [pool.submit(settled, item) for item in items]
        try:
            if show_progress():
                from rich.progress import Progress
                with Progress(transient=True) as progress:
                    tid = progress.add_task(label, total=len(items))
                    for _ in as_completed(futures):
                        progress.advance(tid)
            return [f.result() for f in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# Worker processes outlive one map: the stages of one run (`geopixeld build`, the benchmark)
# reuse them with their imports and caches warm. A pool serves only the working directory and
# environment it was started in (a worker keeps the ones it started with); a pool that broke (a
# worker died) is dropped, and the next map starts a fresh one.
_POOLS: dict[tuple, ProcessPoolExecutor] = {}


@contextlib.contextmanager
def _worker_pool(workers: int):
    key = (workers, os.getcwd(), tuple(sorted(os.environ.items())))
    pool = _POOLS.get(key)
    if pool is None:
        for stale in _POOLS.values():
            stale.shutdown(wait=False, cancel_futures=True)
        _POOLS.clear()
        pool = _POOLS[key] = ProcessPoolExecutor(workers, mp_context=_forkserver())
    try:
        yield pool
    except BrokenProcessPool:
        _POOLS.pop(key, None)
        pool.shutdown(wait=False, cancel_futures=True)
        raise


# loaded once into the fork server, so that each worker starts with them
PRELOAD = ["numpy", "cv2", "pyarrow.parquet", "pydantic", "schemas", "pipeline.geometry.masks",
           "pipeline.core.shards"]


@functools.lru_cache(maxsize=1)
def _forkserver():
    """The start method of local worker processes: a fork server (spawn where there is none)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


# how long a dask scheduler may take to answer before the run stops (dask's default is 30 s)
SCHEDULER_CONNECT_TIMEOUT_S = 5.0


def connect(address: str, timeout_s: float = SCHEDULER_CONNECT_TIMEOUT_S):
    """A dask.distributed Client of the scheduler at `address`. A scheduler that does not
    answer within `timeout_s` (nothing listening, or something that is not a scheduler), or
    an address that is not one, is one SchedulerError (dask's own retries and log lines about
    it are kept off the terminal)."""
    import asyncio
    import logging

    from distributed import Client

    from pipeline.core.errors import SchedulerError

    check_address(address)
    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop here, so the probe can run
            asyncio.run(_probe(address, timeout_s))
        return Client(address, set_as_default=False, timeout=timeout_s)
    except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else "no answer"
        raise SchedulerError(f"cannot reach the dask scheduler at {address} within "
                             f"{timeout_s:g} s ({reason}); start it, or leave out --scheduler, "
                             "DASK_SCHEDULER_ADDRESS and runner.scheduler to run locally"
                             ) from None
    except (ValueError, TypeError) as exc:
        raise SchedulerError(f"{address!r} is not a dask scheduler address (tcp://host:port): "
                             f"{str(exc)[:200]}") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


async def _probe(address: str, timeout_s: float) -> None:
    """Connect to `address` and finish dask's handshake within `timeout_s`. dask bounds the
    connection but not the handshake: a listener that accepts and never answers would hold a
    Client (and the run) until it hangs up."""
    import asyncio

    from distributed.comm import connect as comm_connect

    comm = await asyncio.wait_for(comm_connect(address, timeout=timeout_s), timeout_s)
    await comm.close()


def check_address(address: str) -> None:
    """Refuse, before any connection, an address dask cannot parse (a Client made from one
    would hang on its way out): a known scheme and, for network schemes, host:port."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port
    from distributed.comm.registry import get_backend

    from pipeline.core.errors import SchedulerError

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            _, port = parse_host_port(location)
            if not 0 < int(port) < 65536:
                raise ValueError(f"port {port} outside 1-65535")
    except (ValueError, TypeError) as exc:
        raise SchedulerError(f"{address!r} is not a dask scheduler address (tcp://host:port): "
                             f"{str(exc)[:200]}") from None


def _map_distributed(task, items, address, label, resources=None):
    from distributed import as_completed

    with connect(address) as client:
        futures = client.map(task, items, pure=False, resources=resources or None,
                             key=[f"{label}-{i}-{uuid.uuid4().hex[:8]}"
                                  for i in range(len(items))])
        if show_progress():
            from rich.progress import Progress
            with Progress(transient=True) as progress:
                tid = progress.add_task(label, total=len(items))
                for _ in as_completed(futures):
                    progress.advance(tid)
        return client.gather(futures)
