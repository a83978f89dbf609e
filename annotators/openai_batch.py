"""The Batch API transport of the `openai` backend (`annotate.backend.openai.mode: batch`): half
price, answers within the completion window instead of at once. The cache, cleaning and re-asks
are `annotators.answering`'s; the files and batches calls go through `annotators.retry`.

A round's asks become JSONL lines (`custom_id` = the request's cache key, `body` = the
chat-completions body the synchronous mode would send), split into input files under the API's
limits (`batch.max_requests_per_file`, `batch.max_bytes_per_file`). Each file is uploaded
(purpose "batch"), recorded in the cache db, turned into a batch (`/v1/chat/completions`, window
"24h") whose id is recorded at once, and only then polled, with a growing wait, until it ends.
Its output (and error) file is matched by `custom_id`; every answer is costed at
`batch.discount` of the synchronous price and delivered as it is collected, so that it is
stored in the cache before the batch is marked collected. Re-asks (another seed) go in a
follow-up batch, the next round.

Resuming: open batches of this server are in the cache db. A run whose keys an open batch
covers polls that batch instead of sending its keys again; a file uploaded by a run killed
before its batch was created is found again (by listing the server's batches) or turned into a
batch now, never uploaded twice. A batch that is still running when `batch.max_wait_s` runs out
stays open: its requests are recorded failed for now and the next run collects them.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional, Sequence

from annotators.answering import Answer, Ask, Deliver, image_error
from annotators.base import AnnotationContext
from annotators.cache import OpenBatch, ResponseCache
from annotators.openai_backend import OpenAIBackend, api_key, setup_refused
from annotators.retry import FatalError, GaveUp, RetryableError, RetryPolicy, SetupError, classify
from pipeline.core.errors import BadImageError
from schemas import Request, Usage

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"  # the only window the Batch API offers
# Clock difference tolerated between this machine and the server when listing batches.
LISTING_SLACK_S = 3600
# Statuses after which a batch changes no more.
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchCallError(Exception):
    """A files or batches call that failed after every attempt (`permanent`: an error no
    retry fixes, such as HTTP 400)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def split_lines(lines: list[tuple[str, bytes]], max_requests: int,
                max_bytes: int) -> tuple[list[list[tuple[str, bytes]]], list[str]]:
    """JSONL lines (key, bytes with newline) grouped into files of at most `max_requests` lines
    and `max_bytes` bytes, in order; and the keys of lines too large for any file."""
    files: list[list[tuple[str, bytes]]] = []
    too_large: list[str] = []
    size = 0
    for key, line in lines:
        if len(line) > max_bytes:
            too_large.append(key)
            continue
        if not files or len(files[-1]) >= max_requests or size + len(line) > max_bytes:
            files.append([])
            size = 0
        files[-1].append((key, line))
        size += len(line)
    return files, too_large


class BatchTransport:
    """The Batch API jobs of one `annotate` call (see the module docstring)."""

    def __init__(self, backend: OpenAIBackend, context: AnnotationContext):
        self.backend, self.context = backend, context
        self.o = backend.params.openai
        self.b = self.o.batch
        assert backend.cache is not None  # OpenAIBackend refuses batch mode without a cache
        self.cache: ResponseCache = backend.cache
        self.stats = backend.stats
        self.retry = RetryPolicy.from_params(self.o, backend.params.seed)
        self.urls: dict[str, str] = {}
        self.requests: dict[str, Request] = {}  # key -> request, of every ask so far
        self.resumed = False  # open batches of earlier runs looked for (first round)
        # the server as the cache db knows it: without credentials (https://user:pass@host)
        self.server = backend.server
        self.client = None
        self._deliver: Deliver = lambda key, answer: None
        self._answered: set[str] = set()  # keys given an answer this round

    def __enter__(self) -> "BatchTransport":
        from openai import OpenAI

        url = self.backend.endpoint.url
        self.client = OpenAI(base_url=url, api_key=api_key(self.o, url), max_retries=0,
                             timeout=self.o.timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()  # type: ignore[union-attr]

    def ask(self, asks: Sequence[Ask], deliver: Deliver) -> None:
        self._deliver, self._answered = deliver, set()
        self.requests.update((ask.key, ask.request) for ask in asks)
        jobs: list[OpenBatch] = []
        if not self.resumed:
            self.resumed = True
            jobs = self._resume({ask.key for ask in asks})
        covered = {key for job in jobs for key in job.keys}
        jobs += self._submit({ask.key: ask.number for ask in asks if ask.key not in covered})
        self._wait(jobs)

    def _give(self, key: str, answer: Answer) -> None:
        self._answered.add(key)
        self._deliver(key, answer)

    def _fail(self, keys, error: str) -> None:
        """An error answer to every key among `keys` of this call not answered this round."""
        for key in keys:
            if key in self.requests and key not in self._answered:
                self._give(key, Answer(0, error=error, attempts=0))

    # -- control-plane calls with retries ------------------------------------------------------

    def _control(self, what: str, call: Callable, *args: object, attempts: int = 0,
                 **kwargs: object) -> object:
        """A files/batches call through the retry policy (up to `attempts`, default
        `max_attempts`); BatchCallError when it fails."""

        def attempt(n: int) -> object:
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                kind = classify(exc, self.o.retry_after_max_s)
                if kind is None:
                    raise
                raise kind from None

        def count(retry: RetryableError) -> None:
            self.stats.retries[f"{what}: {retry.cause}"] += 1  # type: ignore[union-attr]

        try:
            return self.retry.call(attempt, on_retry=count, attempts=attempts)
        except SetupError as refused:
            raise setup_refused(refused, self.server, self.o, what=what) from None
        except FatalError as fatal:
            raise BatchCallError(f"{what}: {fatal.reason}", permanent=True) from None
        except GaveUp as gave_up:
            raise BatchCallError(f"{what}: {gave_up}") from None

    # -- submit, resume, wait, collect ---------------------------------------------------------

    def _resume(self, pending: set[str]) -> list[OpenBatch]:
        """Open batches of this server that answer some pending key, each with its batch id
        (a file left without a batch by a killed run gets one now; if that fails, its keys
        are sent again)."""
        found = []
        for batch in self.cache.open_batches(self.server):
            if not pending & set(batch.keys):
                continue
            if batch.batch_id is None:
                try:
                    batch = self._create(batch)
                except BatchCallError:
                    continue
            self.stats.batches_resumed += 1  # type: ignore[union-attr]
            found.append(batch)
        return found

    def _create(self, batch: OpenBatch) -> OpenBatch:
        """The batch of an uploaded input file, its id committed. A create is never retried
        blind (a create whose answer was lost may have made the batch): before each try the
        server's batches are searched for one made from this file (a run killed right after
        creating it, or a dropped answer)."""
        last = ""
        for attempt in range(1, self.o.max_attempts + 1):
            batch_id = self._made_from(batch)
            if batch_id is None:
                try:
                    created = self._control("batches.create",
                                            self.client.batches.create,  # type: ignore[union-attr]
                                            attempts=1, input_file_id=batch.input_file_id,
                                            endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                                            metadata={"source": "geopixeld"})
                except BatchCallError as exc:
                    if exc.permanent:
                        raise
                    last = str(exc)
                    time.sleep(self.retry.backoff(attempt))
                    continue
                batch_id = created.id  # type: ignore[attr-defined]
                self.stats.batches_created += 1  # type: ignore[union-attr]
            self.cache.set_batch_id(batch.input_file_id, batch_id)
            return OpenBatch(batch.input_file_id, batch_id, batch.keys, batch.created_at)
        raise BatchCallError(f"{last} (batch creation tried {self.o.max_attempts} times)")

    def _made_from(self, batch: OpenBatch) -> Optional[str]:
        """The id of a batch the server made from this input file, if any."""
        listing = self._control("batches.list", self.client.batches.list,  # type: ignore[union-attr]
                                limit=100)
        for existing in listing:  # type: ignore[attr-defined]  # newest first; pages on
            if existing.input_file_id == batch.input_file_id:
                return existing.id
            if existing.created_at < batch.created_at - LISTING_SLACK_S:
                return None  # made before the file was uploaded: none further back is its batch
        return None

    def _submit(self, asks: dict[str, int]) -> list[OpenBatch]:
        """Upload the asks (key -> ask number) as input files and create their batches."""
        lines = []
        for key, number in asks.items():
            request = self.requests[key]
            try:
                messages = self.backend.messages(request, self.context, self.urls)
            except (KeyError, BadImageError) as exc:
                self._give(key, Answer(number, error=image_error(exc), attempts=0))
                continue
            body = self.backend.body(request, messages, number)
            line = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
            lines.append((key, (json.dumps(line, separators=(",", ":")) + "\n").encode()))
        files, too_large = split_lines(lines, self.b.max_requests_per_file,
                                       self.b.max_bytes_per_file)
        self._fail(too_large, f"request larger than batch.max_bytes_per_file "
                              f"({self.b.max_bytes_per_file} bytes)")
        jobs = []
        for file_lines in files:
            content = b"".join(line for _, line in file_lines)
            file_keys = {key: asks[key] for key, _ in file_lines}
            try:
                uploaded = self._control("files.create",
                                         self.client.files.create,  # type: ignore[union-attr]
                                         file=("requests.jsonl", content, "application/jsonl"),
                                         purpose="batch")
                self.stats.batch_files += 1  # type: ignore[union-attr]
                # recorded before the batch exists: a kill from here on loses no upload
                self.cache.add_batch_file(uploaded.id, self.server,  # type: ignore[attr-defined]
                                          file_keys)
                jobs.append(self._create(OpenBatch(uploaded.id,  # type: ignore[attr-defined]
                                                   None, file_keys, time.time())))
            except BatchCallError as exc:
                self._fail(file_keys, str(exc))
        return jobs

    def _wait(self, jobs: list[OpenBatch]) -> None:
        """Poll the batches until each ends (collecting each as it ends) or `max_wait_s` runs
        out (their keys then fail for now; the next run collects them)."""
        waiting = {job.batch_id: job for job in jobs}
        interval = self.b.poll_interval_s
        deadline = time.monotonic() + self.b.max_wait_s
        status: dict[str, str] = {}
        while waiting:
            for batch_id, job in list(waiting.items()):
                try:
                    batch = self._control("batches.retrieve",
                                          self.client.batches.retrieve,  # type: ignore[union-attr]
                                          batch_id)
                except BatchCallError:
                    continue  # the server is unwell: poll again later
                self.stats.batch_polls += 1  # type: ignore[union-attr]
                status[batch_id] = batch.status  # type: ignore[attr-defined]
                if batch.status in TERMINAL:  # type: ignore[attr-defined]
                    del waiting[batch_id]
                    self._collect(job, batch)
            if not waiting or time.monotonic() + interval > deadline:
                break
            time.sleep(interval)
            interval = min(interval * self.b.poll_backoff, self.b.poll_max_interval_s)
        for batch_id, job in waiting.items():
            self._fail(job.keys, f"batch {batch_id} still {status.get(batch_id, 'unpolled')} "
                                 f"after {self.b.max_wait_s:g} s; the next run collects it")

    def _collect(self, job: OpenBatch, batch: object) -> None:
        """Deliver every answer of an ended batch (each is stored as it is delivered), then
        mark the batch collected."""
        seen: set[str] = set()
        for file_id in (batch.output_file_id, batch.error_file_id):  # type: ignore[attr-defined]
            if not file_id:
                continue
            try:
                content = self._control("files.content",
                                        self.client.files.content,  # type: ignore[union-attr]
                                        file_id)
            except BatchCallError as exc:
                self._fail(job.keys, str(exc))
                return  # left open: the next run downloads it again
            for line in content.content.decode("utf-8").splitlines():  # type: ignore[attr-defined]
                if line.strip():
                    item = json.loads(line)
                    key = item.get("custom_id", "")
                    seen.add(key)
                    self._give(key, self._answer(job, item))
        ended = batch.status  # type: ignore[attr-defined]
        errors = getattr(batch, "errors", None)
        reason = "; ".join(e.message or e.code or "" for e in (errors.data or [])) if errors else ""
        self._fail(set(job.keys) - seen, f"batch {job.batch_id} {ended} without an answer"
                                         f"{': ' + reason if reason else ''}")
        self.cache.close_batch(job.input_file_id, ended)

    def _answer(self, job: OpenBatch, item: dict) -> Answer:
        """The answer of one output or error line."""
        number = int(job.keys.get(item.get("custom_id", ""), 0))
        response = item.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200 or item.get("error"):
            error = item.get("error") or body.get("error") or {}
            return Answer(number, error=f"batch line HTTP {response.get('status_code')}: "
                                        f"{error.get('message', 'error')}")
        if isinstance(body, dict) and body.get("choices") == []:
            # a 200 without an answer: failed, asked again while re-asks are left
            return Answer(number, error="no choices in the answer", reask=True)
        try:
            choice = body["choices"][0]
            raw, finish = choice["message"]["content"], choice.get("finish_reason")
            usage = Usage(prompt_tokens=body.get("usage", {}).get("prompt_tokens", 0) or 0,
                          completion_tokens=body.get("usage", {}).get("completion_tokens", 0) or 0)
        except (KeyError, IndexError, TypeError, AttributeError):
            return Answer(number, error="malformed batch output line")
        served = body.get("model", "") or ""
        cost = self.backend.cost(usage, served) * self.b.discount
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            # an empty answer: failed, asked again while re-asks are left
            return Answer(number, error="empty answer", usage=usage, cost_usd=cost, reask=True)
        if not isinstance(raw, str):
            return Answer(number, error="malformed batch output line", usage=usage,
                          cost_usd=cost)
        return Answer(number, text=raw, finish_reason=finish, usage=usage, cost_usd=cost,
                      latency_s=time.time() - job.created_at, served_model=served)
