"""Batch API mode of the `openai` backend (`annotate.backend.openai.mode: batch`): half price,
answers within the completion window instead of at once.

A shard's requests not already in the response cache become JSONL lines (`custom_id` = the
request's cache key, `body` = the chat-completions body the synchronous mode would send), split
into input files under the API's limits (`batch.max_requests_per_file`,
`batch.max_bytes_per_file`). Each file is uploaded (purpose "batch"), recorded in the cache db,
turned into a batch (`/v1/chat/completions`, window "24h") whose id is recorded at once, and
only then polled, with a growing wait, until it ends. Its output (and error) file is matched by
`custom_id`; every answer is cleaned like a synchronous one, costed at `batch.discount` of the
synchronous price and stored in the cache as it is collected. Answers that cleaning refuses are
re-asked in a follow-up batch (another seed), `clean_retries` times at most.

Resuming: open batches of this server are in the cache db. A run whose keys an open batch
covers polls that batch instead of sending its keys again; a file uploaded by a run killed
before its batch was created is found again (by listing the server's batches) or turned into a
batch now, never uploaded twice. A batch that is still running when `batch.max_wait_s` runs out
stays open: its requests are recorded failed for now and the next run collects them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from annotators.base import AnnotationContext
from annotators.cache import OpenBatch
from annotators.cleaning import Cleaned
from annotators.openai_backend import (
    ERROR_CHARS,
    MARKS_MISSING,
    RETRY_STATUSES,
    SETUP_STATUSES,
    OpenAIBackend,
    answer_for,
    api_key,
    clean_answer,
    marks_count,
    public_url,
    redact,
    retry_after_seconds,
    without_cut_sentence,
)
from pipeline.core.errors import BadImageError, BadParamsError
from schemas import Request, Response, Usage

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


@dataclass
class _Outcome:
    """What one key has cost so far in this run, and how it ended."""

    usage: Usage = Usage()
    cost: float = 0.0
    attempts: int = 0
    response: Optional[Response] = None
    error: Optional[str] = None
    partial: Optional[tuple[Cleaned, str, str]] = None  # fullest batched-marks answer so far
    refusals: list[str] = field(default_factory=list)


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


def annotate_batch(backend: OpenAIBackend, requests: list[Request],
                   context: AnnotationContext) -> list[Response]:
    """One response per request, in request order, through the Batch API."""
    from openai import OpenAI

    o = backend.params.openai
    with OpenAI(base_url=o.base_url, api_key=api_key(o), max_retries=0,
                timeout=o.timeout_s) as client:
        return _BatchRun(backend, context, client).run(requests)


class _BatchRun:
    """State of one `annotate` call in batch mode."""

    def __init__(self, backend: OpenAIBackend, context: AnnotationContext, client: object):
        self.backend, self.context, self.client = backend, context, client
        self.o = backend.params.openai
        self.b = self.o.batch
        self.cache = backend.cache
        assert self.cache is not None  # OpenAIBackend refuses batch mode without a cache
        self.stats = backend.stats
        self.rng = random.Random(backend.params.seed)
        self.urls: dict[str, str] = {}
        self.requests: dict[str, Request] = {}  # key -> the first request asking it
        self.outcomes: dict[str, _Outcome] = {}
        self.stale: set[str] = set()
        # the server as the cache db knows it: without credentials (https://user:pass@host)
        self.server = public_url(self.o.base_url)

    def _response(self, request: Request, **fields: object) -> Response:
        return Response(request_id=request.request_id, tile_id=request.tile_id,
                        kind=request.kind, backend=self.backend.name, model=self.backend.model,
                        prompt_version=request.prompt_version, **fields)

    # -- the run ----------------------------------------------------------------------------

    def run(self, requests: list[Request]) -> list[Response]:
        keys = [self.backend.request_key(r) for r in requests]
        for key, request in zip(keys, requests):
            self.requests.setdefault(key, request)
        answers: dict[str, Response] = {}
        hits = self.cache.get_many(list(self.requests))
        for key, request in self.requests.items():
            hit = hits.get(key)
            if hit is None:
                continue
            cleaned = clean_answer(redact(hit.raw_text), request, self.backend.limits)
            if cleaned.ok:
                self.stats.cache_hits += 1
                answers[key] = self._response(
                    request, status="ok", text=cleaned.text, usage=hit.usage,
                    cost_usd=hit.cost_usd, latency_s=hit.latency_s, attempts=hit.attempts,
                    cached=True)
            else:
                self.stale.add(key)  # stored before a cleaning rule that now refuses it
        pending = {key: 0 for key in self.requests if key not in answers}
        self.outcomes = {key: _Outcome() for key in pending}

        resumed = self._resume(set(pending))
        covered = {key for batch in resumed for key in batch.keys}
        asks = {key: ask for key, ask in pending.items() if key not in covered}
        jobs = resumed
        while jobs or asks:
            jobs = jobs + self._submit(asks)
            asks = self._wait(jobs)
            jobs = []
        for key, outcome in self.outcomes.items():
            answers[key] = self._final(key, outcome)

        return [answer_for(request, answers[key]) for key, request in zip(keys, requests)]

    def _final(self, key: str, outcome: _Outcome) -> Response:
        request = self.requests[key]
        if outcome.response is not None:
            return outcome.response
        if outcome.partial is not None:  # marks missing after every re-ask: keep the fullest
            return self._accept(key, outcome, *outcome.partial)
        self.stats.failed += 1
        error = outcome.error or (f"output cleaning refused {len(outcome.refusals)} answers: "
                                  f"{', '.join(outcome.refusals)}")
        return self._response(request, status="failed", error=redact(error)[:ERROR_CHARS],
                              usage=outcome.usage, cost_usd=outcome.cost,
                              attempts=outcome.attempts)

    # -- control-plane calls with retries ------------------------------------------------------

    def _control(self, what: str, call: Callable, *args: object, attempts: int = 0,
                 **kwargs: object) -> object:
        """A files/batches call, retried like a chat completion (429 honouring Retry-After,
        5xx, timeouts, dropped connections) up to `attempts` (default `max_attempts`);
        BatchCallError after that."""
        import openai

        attempts = attempts or self.o.max_attempts
        last = ""
        for attempt in range(1, attempts + 1):
            delay: Optional[float] = None
            try:
                return call(*args, **kwargs)
            except openai.RateLimitError as exc:
                last = "rate limited (429)"
                delay = retry_after_seconds(exc.response.headers, self.o.retry_after_max_s)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in SETUP_STATUSES:
                    raise BadParamsError(
                        f"annotate.backend.openai: {self.server} answered HTTP {status} to "
                        f"{what} ({SETUP_STATUSES[status]}; key from {self.o.api_key_env})"
                    ) from None
                if status < 500 and status not in RETRY_STATUSES:
                    raise BatchCallError(f"{what}: HTTP {status}: {exc.message}",
                                         permanent=True) from None
                last = f"server error ({status})"
            except openai.APITimeoutError:
                last = "timeout"
            except openai.APIConnectionError:
                last = "connection dropped"
            self.stats.retries[f"{what}: {last}"] += 1
            if attempt < attempts:
                time.sleep(delay if delay is not None else self._backoff(attempt))
        raise BatchCallError(f"{what}: {last} after {attempts} attempt(s)")

    def _backoff(self, attempt: int) -> float:
        """Full jitter, as the synchronous mode."""
        ceiling = min(self.o.backoff_max_s, self.o.backoff_base_s * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)

    # -- submit, resume, wait, collect ---------------------------------------------------------

    def _resume(self, pending: set[str]) -> list[OpenBatch]:
        """Open batches of this server that answer some pending key, each with its batch id
        (a file left without a batch by a killed run gets one now)."""
        found = []
        for batch in self.cache.open_batches(self.server):
            if not pending & set(batch.keys):
                continue
            if batch.batch_id is None:
                try:
                    batch = self._create(batch)
                except BatchCallError as exc:
                    for key in pending & set(batch.keys):
                        self.outcomes[key].error = str(exc)
                    continue
            self.stats.batches_resumed += 1
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
                    created = self._control("batches.create", self.client.batches.create,
                                            attempts=1, input_file_id=batch.input_file_id,
                                            endpoint=ENDPOINT, completion_window=COMPLETION_WINDOW,
                                            metadata={"source": "geopixeld"})
                except BatchCallError as exc:
                    if exc.permanent:
                        raise
                    last = str(exc)
                    time.sleep(self._backoff(attempt))
                    continue
                batch_id = created.id
                self.stats.batches_created += 1
            self.cache.set_batch_id(batch.input_file_id, batch_id)
            return OpenBatch(batch.input_file_id, batch_id, batch.keys, batch.created_at)
        raise BatchCallError(f"{last} (batch creation tried {self.o.max_attempts} times)")

    def _made_from(self, batch: OpenBatch) -> Optional[str]:
        """The id of a batch the server made from this input file, if any."""
        listing = self._control("batches.list", self.client.batches.list, limit=100)
        for existing in listing:  # newest first; pages on while needed
            if existing.input_file_id == batch.input_file_id:
                return existing.id
            if existing.created_at < batch.created_at - LISTING_SLACK_S:
                return None  # made before the file was uploaded: none further back is its batch
        return None

    def _submit(self, asks: dict[str, int]) -> list[OpenBatch]:
        """Upload the asks (key -> re-ask number) as input files and create their batches."""
        lines = []
        for key, ask in asks.items():
            request = self.requests[key]
            try:
                messages = self.backend.messages(request, self.context, self.urls)
            except (KeyError, BadImageError) as exc:
                self.outcomes[key].error = f"image: {exc}"
                continue
            body = self.backend.body(request, messages, ask)
            line = {"custom_id": key, "method": "POST", "url": ENDPOINT, "body": body}
            lines.append((key, (json.dumps(line, separators=(",", ":")) + "\n").encode()))
        files, too_large = split_lines(lines, self.b.max_requests_per_file,
                                       self.b.max_bytes_per_file)
        for key in too_large:
            self.outcomes[key].error = (f"request larger than batch.max_bytes_per_file "
                                        f"({self.b.max_bytes_per_file} bytes)")
        jobs = []
        for file_lines in files:
            content = b"".join(line for _, line in file_lines)
            file_keys = {key: asks[key] for key, _ in file_lines}
            try:
                uploaded = self._control("files.create", self.client.files.create,
                                         file=("requests.jsonl", content, "application/jsonl"),
                                         purpose="batch")
                self.stats.batch_files += 1
                # recorded before the batch exists: a kill from here on loses no upload
                self.cache.add_batch_file(uploaded.id, self.server, file_keys)
                jobs.append(self._create(OpenBatch(uploaded.id, None, file_keys, time.time())))
            except BatchCallError as exc:
                for key in file_keys:
                    self.outcomes[key].error = str(exc)
        return jobs

    def _wait(self, jobs: list[OpenBatch]) -> dict[str, int]:
        """Poll the batches until each ends (collecting each as it ends) or `max_wait_s` runs
        out; returns the re-asks (key -> re-ask number) that cleaning calls for."""
        reasks: dict[str, int] = {}
        waiting = {job.batch_id: job for job in jobs}
        interval = self.b.poll_interval_s
        deadline = time.monotonic() + self.b.max_wait_s
        status: dict[str, str] = {}
        while waiting:
            for batch_id, job in list(waiting.items()):
                try:
                    batch = self._control("batches.retrieve", self.client.batches.retrieve,
                                          batch_id)
                except BatchCallError:
                    continue  # the server is unwell: poll again later
                self.stats.batch_polls += 1
                status[batch_id] = batch.status
                if batch.status in TERMINAL:
                    del waiting[batch_id]
                    reasks.update(self._collect(job, batch))
            if not waiting or time.monotonic() + interval > deadline:
                break
            time.sleep(interval)
            interval = min(interval * self.b.poll_backoff, self.b.poll_max_interval_s)
        for batch_id, job in waiting.items():
            for key in job.keys:
                if key in self.outcomes and self.outcomes[key].response is None:
                    self.outcomes[key].error = (
                        f"batch {batch_id} still {status.get(batch_id, 'unpolled')} after "
                        f"{self.b.max_wait_s:g} s; the next run collects it")
        return reasks

    def _collect(self, job: OpenBatch, batch: object) -> dict[str, int]:
        """Store every answer of an ended batch and close it; returns the re-asks."""
        reasks: dict[str, int] = {}
        seen: set[str] = set()
        for file_id in (batch.output_file_id, batch.error_file_id):  # type: ignore[attr-defined]
            if not file_id:
                continue
            try:
                content = self._control("files.content", self.client.files.content, file_id)
            except BatchCallError as exc:
                for key in job.keys:
                    if key in self.outcomes and self.outcomes[key].response is None:
                        self.outcomes[key].error = str(exc)
                return reasks  # left open: the next run downloads it again
            for line in content.content.decode("utf-8").splitlines():  # type: ignore[attr-defined]
                if line.strip():
                    key, reask = self._result(job, json.loads(line))
                    seen.add(key)
                    if reask is not None:
                        reasks[key] = reask
        errors = getattr(batch, "errors", None)
        reason = "; ".join(e.message or e.code or "" for e in (errors.data or [])) if errors else ""
        for key in set(job.keys) - seen:
            if key in self.outcomes and self.outcomes[key].response is None:
                self.outcomes[key].error = (f"batch {job.batch_id} {batch.status} without an "
                                            f"answer{': ' + reason if reason else ''}")
        self.cache.close_batch(job.input_file_id, batch.status)  # type: ignore[attr-defined]
        return reasks

    def _result(self, job: OpenBatch, item: dict) -> tuple[str, Optional[int]]:
        """Handle one output or error line; returns its key and the re-ask it calls for."""
        key = item.get("custom_id", "")
        ask = int(job.keys.get(key, 0))
        response = item.get("response") or {}
        body = response.get("body") or {}
        outcome = self.outcomes.get(key)
        if response.get("status_code") != 200 or item.get("error"):
            error = item.get("error") or body.get("error") or {}
            if outcome is not None and outcome.response is None:
                outcome.error = (f"batch line HTTP {response.get('status_code')}: "
                                 f"{error.get('message', 'error')}")
            return key, None
        last = ask >= self.o.clean_retries
        if isinstance(body, dict) and body.get("choices") == []:
            # a 200 without an answer: failed, asked again while re-asks are left
            if outcome is not None and outcome.response is None:
                outcome.attempts += 1
                outcome.error = "no choices in the answer"
                return key, (None if last else ask + 1)
            return key, None
        try:
            choice = body["choices"][0]
            raw, finish = choice["message"]["content"], choice.get("finish_reason")
            if isinstance(raw, str):  # scrubbed first: a key in an answer is never kept
                raw = redact(raw)
            usage = Usage(prompt_tokens=body.get("usage", {}).get("prompt_tokens", 0) or 0,
                          completion_tokens=body.get("usage", {}).get("completion_tokens", 0) or 0)
        except (KeyError, IndexError, TypeError):
            if outcome is not None and outcome.response is None:
                outcome.error = "malformed batch output line"
            return key, None
        served = body.get("model", "") or ""
        cost = self.backend.cost(usage, served) * self.b.discount
        if outcome is None:  # asked by another run (its request is not here): keep it raw
            self.cache.put(key, Response(
                request_id=key, tile_id="", kind="holistic", status="ok", text=raw,
                backend=self.backend.name, model=self.backend.model, prompt_version="",
                usage=usage, cost_usd=cost, latency_s=time.time() - job.created_at, attempts=1),
                raw_text=raw, served_model=served)
            return key, None
        request = self.requests[key]
        outcome.usage = Usage(prompt_tokens=outcome.usage.prompt_tokens + usage.prompt_tokens,
                              completion_tokens=outcome.usage.completion_tokens
                              + usage.completion_tokens)
        outcome.cost += cost
        outcome.attempts += 1
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            # an empty answer: failed, asked again while re-asks are left
            outcome.error = "empty answer"
            return key, (None if last else ask + 1)
        if not isinstance(raw, str):
            outcome.error = "malformed batch output line"
            return key, None
        raw = without_cut_sentence(raw, request, finish)
        cleaned = clean_answer(raw, request, self.backend.limits)
        self.stats.cleaning_fixes.update(cleaned.fixes)
        if cleaned.ok and MARKS_MISSING in cleaned.fixes:
            if outcome.partial is None or marks_count(cleaned) > marks_count(outcome.partial[0]):
                outcome.partial = (cleaned, raw, served)
            self.stats.cleaning_refusals[MARKS_MISSING] += 1
            outcome.refusals.append(MARKS_MISSING)
            if last:
                outcome.response = self._accept(key, outcome, *outcome.partial,
                                                latency=time.time() - job.created_at)
                return key, None
            return key, ask + 1
        if cleaned.ok:
            outcome.response = self._accept(key, outcome, cleaned, raw, served,
                                            latency=time.time() - job.created_at)
            return key, None
        self.stats.cleaning_refusals[cleaned.reason] += 1
        outcome.refusals.append(cleaned.reason)
        return key, (None if last else ask + 1)

    def _accept(self, key: str, outcome: _Outcome, cleaned: Cleaned, raw: str, served: str,
                latency: float = 0.0) -> Response:
        """The ok response of a key, stored in the cache at once."""
        response = self._response(self.requests[key], status="ok", text=cleaned.text,
                                  usage=outcome.usage, cost_usd=outcome.cost,
                                  latency_s=latency, attempts=outcome.attempts)
        self.cache.put(key, response, raw_text=raw, served_model=served,
                       replace=key in self.stale)
        self.stats.answered += 1
        outcome.response = response
        return response
