"""The OpenAI-compatible backend: OpenAI itself or any compatible server (vLLM, SGLang, Ollama,
LM Studio) through `base_url`, with the official `openai` client.

One `annotate` call answers a whole shard concurrently (asyncio, at most `concurrency` requests
in flight). Retries live here and only here: exponential backoff with full jitter, Retry-After
honoured on 429 (and every request waits it out, since a rate limit is the account's), retries
on 5xx, timeouts, dropped connections and malformed JSON, at most `max_attempts` HTTP attempts;
then the request is recorded as failed (and, not being cached, asked again next run). Every
answer passes `annotators.cleaning`; one that fails is re-asked `clean_retries` times with
another seed. Usage and cost come from the server's `usage`.

With a `ResponseCache`, a request whose content key is stored is answered from it (cached=True,
no HTTP call; its usage and cost are those of the original call, so the spend of this run is
the sum over cached=False responses) and each success is stored as soon as it arrives.

The API key is read from the environment variable named by `openai.api_key_env` when a run
starts (and registered with `pipeline.core.errors.register_secret` in the process that reads it, a
worker process included); it is never stored on the backend, in the cache, in a response or in a
message: answers and error texts are scrubbed of it (whole, or any 8+ character prefix) before
they are cleaned, cached or recorded. Credentials in `base_url` (https://user:pass@host) are
registered alike and `public_url` leaves them out wherever the server is named.

A 200 answer without choices, or whose content is empty or missing, is a failed attempt
(retried, then recorded as failed), never an empty answer. The stage fails when too many
requests still fail (`pipeline.core.failure_policy`).

Two request kinds besides the paper's passes: `instance_batch` (every mark of a patch in one
call) is sent with structured output (a JSON schema) and its answer is split into per-mark
descriptions, each cleaned like an instance answer; `compose` (the LLM composer's paragraph) is
passed on as written, for `pipeline.stages.compose.llm` to validate. A request with an empty image
hash is sent as text only. With `openai.mode: batch` a shard goes through the Batch API instead
(`annotators.openai_batch`).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from annotators.base import AnnotationContext
from annotators.cache import CachedAnswer, ResponseCache, cache_key
from annotators.cleaning import Cleaned, CleaningLimits, clean_output, drop_unfinished_sentence
from pipeline.core.errors import BadImageError, BadParamsError, register_secret, scrub
from pipeline.core.imaging import PNG_SIGNATURE
from pipeline.core.params import BackendParams, OpenAIParams
from schemas import Request, Response, Usage

log = logging.getLogger(__name__)

NAME = "openai"
# HTTP statuses worth another attempt besides 429 and 5xx (as the openai client itself does).
RETRY_STATUSES = (408, 409)
# Statuses that mean the set-up is wrong for every request: stop the run with one line.
SETUP_STATUSES = {401: "the server refused the API key", 403: "the API key may not use this",
                  404: "no such model or endpoint"}
ERROR_CHARS = 200  # longest error text kept in a Response
CHAT_PATH = "/chat/completions"  # under base_url
# Fix code of a batched-marks answer that describes only some of the marks (re-asked while
# re-asks are left, then accepted as it is).
MARKS_MISSING = "marks_missing"
# Structured output of an instance_batch request (strict JSON schema: the root is an object).
MARKS_FORMAT = {"type": "json_schema", "json_schema": {"name": "marks", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["marks"],
    "properties": {"marks": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["mark", "description"],
        "properties": {"mark": {"type": "integer"}, "description": {"type": "string"}}}}}}}}
_FENCED = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.S)


@dataclass
class BackendStats:
    """What a run did, for the stage's report: calls, retries by cause, cleaning outcomes."""

    http_attempts: int = 0
    batch_files: int = 0
    batches_created: int = 0
    batches_resumed: int = 0
    batch_polls: int = 0
    cache_hits: int = 0
    answered: int = 0
    failed: int = 0
    retries: Counter = field(default_factory=Counter)
    cleaning_refusals: Counter = field(default_factory=Counter)
    cleaning_fixes: Counter = field(default_factory=Counter)
    unpriced_models: set = field(default_factory=set)

    def as_dict(self) -> dict:
        return {"http_attempts": self.http_attempts, "batch_files": self.batch_files,
                "batches_created": self.batches_created,
                "batches_resumed": self.batches_resumed, "batch_polls": self.batch_polls,
                "cache_hits": self.cache_hits,
                "answered": self.answered, "failed": self.failed,
                "retries": dict(self.retries), "cleaning_refusals": dict(self.cleaning_refusals),
                "cleaning_fixes": dict(self.cleaning_fixes),
                "unpriced_models": sorted(self.unpriced_models)}


def answer_for(request: Request, answer: Response) -> Response:
    """`answer` as the response to `request`: the same question asked twice in one run is sent
    once, and its other askers get the answer as if from the cache."""
    if answer.request_id == request.request_id:
        return answer
    return answer.model_copy(update={
        "request_id": request.request_id, "tile_id": request.tile_id, "kind": request.kind,
        "prompt_version": request.prompt_version, "cached": answer.status == "ok"})


def api_key(params: OpenAIParams) -> str:
    """The key from the environment variable `params.api_key_env` names, registered as a
    secret of this process (with any credentials in `base_url`), so that no text this process
    writes or prints holds it."""
    register_url_secrets(params.base_url)
    key = os.environ.get(params.api_key_env, "").strip()
    if not key:
        raise BadParamsError(
            f"annotate.backend.openai.api_key_env: environment variable {params.api_key_env} "
            f"is not set (it must hold the API key; any value for a server without keys)")
    register_secret(key)
    return key


def _userinfo(url: str) -> str:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[0] if "@" in netloc else ""


def register_url_secrets(url: str) -> None:
    """Register the credentials of a URL (user:pass@, and the password alone) as secrets."""
    userinfo = _userinfo(url)
    if userinfo:
        register_secret(userinfo)
        register_secret(userinfo.partition(":")[2])


def public_url(url: str) -> str:
    """`url` without its credentials (https://user:pass@host/v1 -> https://host/v1): the form
    in which a server is named in messages, reports and the cache."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` without registered secrets (API keys, whole or by an 8+ character prefix) or any
    URL's credentials: what answers and error texts pass through before they are kept."""
    return scrub(_URL_USERINFO.sub("", text)) if text else text


def generation_params(params: BackendParams, kind: Optional[str] = None) -> dict:
    """Everything besides prompt and image that shapes an answer: part of the cache key.
    `kind` picks its own max_tokens where `openai.max_tokens_by_kind` names it."""
    o = params.openai
    gen = {"temperature": params.temperature,
           "max_tokens": o.max_tokens_by_kind.get(kind or "", params.max_tokens),
           "seed": params.seed, "image_format": o.image_format, "image_detail": o.image_detail}
    if o.image_format == "jpeg":
        gen["jpeg_quality"] = o.jpeg_quality
    return gen


def _unfenced(text: str) -> str:
    text = text.strip()
    m = _FENCED.match(text)
    return m.group(1).strip() if m else text


def parse_marks(text: str) -> list[tuple[int, str]]:
    """(mark, description) pairs of a batched-marks answer: {"marks": [...]} as the schema
    asks, or a bare list [{"mark": n, "description": "..."}, ...] (servers without structured
    output); raises ValueError for anything else."""
    data = json.loads(_unfenced(text))
    if isinstance(data, dict):
        data = data.get("marks")
    if not isinstance(data, list):
        raise ValueError("not a list of marks")
    pairs = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("description"), str):
            raise ValueError("a mark without a description")
        mark = item.get("mark")
        if isinstance(mark, str) and mark.strip().isdigit():
            mark = int(mark)
        if not isinstance(mark, int) or isinstance(mark, bool):
            raise ValueError(f"mark {mark!r} is not a number")
        pairs.append((mark, item["description"]))
    return pairs


def clean_marks_answer(raw: str, request: Request, limits: CleaningLimits) -> Cleaned:
    """A batched-marks answer with each description cleaned as an instance answer, as the
    JSON list [{"mark": n, "description": "..."}] by mark number. Marks are numbered 1..n in
    the order of `request.object_ids`. Refused: not that JSON, an unknown or repeated mark, or
    no description left; one that lacks some marks is kept with the fix MARKS_MISSING."""
    try:
        pairs = parse_marks(raw)
    except ValueError as exc:
        return Cleaned(None, "junk", (), f"batched marks: {exc}")
    expected = set(range(1, len(request.object_ids) + 1))
    one = request.model_copy(update={"kind": "instance"})
    kept: dict[int, str] = {}
    fixes: list[str] = []
    refused: list[str] = []
    seen: set[int] = set()
    for mark, description in pairs:
        if mark not in expected or mark in seen:
            return Cleaned(None, "junk", (), f"batched marks: unknown or repeated mark {mark}")
        seen.add(mark)
        cleaned = clean_output(description, one, limits)
        fixes.extend(cleaned.fixes)
        if cleaned.ok:
            kept[mark] = cleaned.text  # type: ignore[assignment]
        else:
            refused.append(cleaned.reason)
    if not kept:
        return Cleaned(None, refused[0] if refused else "empty", tuple(fixes))
    if len(kept) < len(expected):
        fixes.append(MARKS_MISSING)
    text = json.dumps([{"mark": m, "description": kept[m]} for m in sorted(kept)],
                      ensure_ascii=False)
    return Cleaned(text, "ok", tuple(fixes))


def without_cut_sentence(raw: str, request: Request, finish_reason: Optional[str]) -> str:
    """The model's text, less its last sentence when max_tokens cut it off (prose kinds only;
    JSON and compositions are judged whole). This is what is cleaned and cached."""
    if finish_reason == "length" and isinstance(raw, str) and request.kind not in (
            "instance_batch", "compose"):
        return drop_unfinished_sentence(raw)
    return raw


def clean_answer(raw: str, request: Request, limits: CleaningLimits) -> Cleaned:
    """The one cleaning entry of this backend: per request kind (see the module docstring)."""
    if request.kind == "instance_batch":
        return clean_marks_answer(raw, request, limits)
    if request.kind == "compose":
        text = _unfenced(raw) if isinstance(raw, str) else ""
        return Cleaned(text, "ok") if text else Cleaned(None, "empty")
    return clean_output(raw, request, limits)


def marks_count(cleaned: Cleaned) -> int:
    """Marks described by an accepted batched-marks answer."""
    return len(json.loads(cleaned.text)) if cleaned.text else 0


def image_data_url(image: bytes, params: OpenAIParams) -> str:
    """The image as a data URL in the configured format; PNG bytes are sent as they are (the
    exact image the request's sha256 names), anything else is re-encoded with OpenCV."""
    if params.image_format == "png" and image[:8] == PNG_SIGNATURE:
        data, media = image, "image/png"
    else:
        pixels = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        if pixels is None:
            raise BadImageError("cannot decode the request's image")
        if params.image_format == "jpeg":
            ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality])
            media = "image/jpeg"
        else:
            ok, buf = cv2.imencode(".png", pixels)
            media = "image/png"
        if not ok:
            raise BadImageError(f"cannot encode the request's image as {media}")
        data = buf.tobytes()
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def async_http_client(params: OpenAIParams) -> Optional[object]:
    """The HTTP client `openai.http_client` asks for: openai's aiohttp transport (less CPU per
    call) or None for the client's default httpx one."""
    if params.http_client == "httpx":
        return None
    if _userinfo(params.base_url):
        # aiohttp refuses credentials in the URL next to the client's Authorization header
        # (every request would fail); httpx sends them
        if params.http_client == "aiohttp":
            raise BadParamsError("annotate.backend.openai.http_client: aiohttp cannot send the "
                                 "credentials in base_url; use httpx (or auto)")
        return None
    try:
        import openai

        return openai.DefaultAioHttpClient(timeout=params.timeout_s)
    except (AttributeError, ImportError, RuntimeError):
        if params.http_client == "aiohttp":
            raise BadParamsError("annotate.backend.openai.http_client: aiohttp needs the openai "
                                 "package with its aiohttp extra (pip install 'openai[aiohttp]')"
                                 ) from None
        return None


def _timeout_cause(exc: BaseException) -> str:
    """"timeout", or "connection dropped" for a connection failure that the transport reports
    as a timeout (openai's aiohttp transport maps every aiohttp connection error to one)."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if type(seen).__module__.startswith("aiohttp") and not isinstance(seen, TimeoutError):
            return "connection dropped"
        seen = seen.__cause__ or seen.__context__
    return "timeout"


def retry_after_seconds(headers: Mapping[str, str], cap: float) -> Optional[float]:
    """Seconds a 429 asks to wait (Retry-After-Ms, Retry-After in seconds or as an HTTP date),
    at most `cap`; None when it does not say."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return min(max(float(value) / 1000, 0.0), cap)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), cap)


def request_cost(usage: Usage, price: Optional[object]) -> float:
    """USD for one call: tokens times the model's per-million-token prices."""
    if price is None:
        return 0.0
    return (usage.prompt_tokens * price.input_per_mtok  # type: ignore[attr-defined]
            + usage.completion_tokens * price.output_per_mtok) / 1e6  # type: ignore[attr-defined]


@dataclass
class _Call:
    """The outcome of one call through the retry loop."""

    attempts: int
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    served_model: str = ""
    usage: Usage = Usage()
    error: Optional[str] = None


class _Retry(Exception):
    def __init__(self, cause: str, delay: Optional[float] = None):
        super().__init__(cause)
        self.cause, self.delay = cause, delay


class OpenAIBackend:
    """Answers requests through an OpenAI-compatible chat-completions endpoint."""

    name = NAME
    answers_instance_batch = True  # describes every mark of a patch in one call

    def __init__(self, params: BackendParams, cache: Optional[ResponseCache] = None):
        self.params = params
        self.model = params.model
        self.cache = cache
        self.limits = CleaningLimits.from_params(params.openai)
        self.stats = BackendStats()
        api_key(params.openai)  # a missing key stops here, before any work
        if params.openai.mode == "batch" and cache is None:
            raise BadParamsError("annotate.backend.openai.mode: batch mode needs the response "
                                 "cache (annotate.cache.enabled: true): open batches are kept "
                                 "there so that a killed run does not pay again")

    def request_key(self, request: Request) -> str:
        return cache_key(backend=NAME, model=self.model, prompt_version=request.prompt_version,
                         prompt=request.prompt, image_sha256=request.image_sha256,
                         generation=generation_params(self.params, request.kind))

    def messages(self, request: Request, context: AnnotationContext,
                 urls: dict[str, str]) -> list[dict]:
        """The chat messages of a request: its image (encoded once per run, kept in `urls`)
        and its prompt; text only when the request names no image."""
        sha = request.image_sha256
        if not sha:
            return [{"role": "user", "content": request.prompt}]
        if sha not in urls:
            urls[sha] = image_data_url(context.image(sha), self.params.openai)
        return [{"role": "user", "content": [
            {"type": "image_url",
             "image_url": {"url": urls[sha], "detail": self.params.openai.image_detail}},
            {"type": "text", "text": request.prompt}]}]

    def body(self, request: Request, messages: list[dict], ask: int = 0) -> dict:
        """The chat-completions body of one ask. `ask` > 0 is a re-ask after cleaning refused
        an answer: another seed and some temperature, or the same answer would come back."""
        temperature = self.params.temperature
        if ask:
            temperature = max(temperature, self.params.openai.clean_retry_temperature)
        body = {"model": self.model, "messages": messages, "temperature": temperature,
                "max_tokens": generation_params(self.params, request.kind)["max_tokens"],
                "seed": self.params.seed + ask}
        if request.kind == "instance_batch":
            body["response_format"] = MARKS_FORMAT
        return body

    def cost(self, usage: Usage, served_model: str = "") -> float:
        """USD of one call at this model's price (0, flagged once, for an unpriced model)."""
        prices = self.params.openai.prices
        price = prices.get(self.model) or prices.get(served_model)
        if price is None and self.model not in self.stats.unpriced_models:
            self.stats.unpriced_models.add(self.model)
            log.warning("no price for model %s in annotate.backend.openai.prices: "
                        "cost counted as 0", self.model)
        return request_cost(usage, price)

    def annotate(self, requests: Sequence[Request], context: AnnotationContext) -> list[Response]:
        """One response per request, in request order."""
        if not requests:
            return []
        if self.params.openai.mode == "batch":
            from annotators.openai_batch import annotate_batch

            return annotate_batch(self, list(requests), context)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._annotate(list(requests), context))
        # Called from inside an event loop (a notebook): run ours in a thread of its own.
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._annotate(list(requests), context)).result()

    # -- one run ----------------------------------------------------------------------------

    async def _annotate(self, requests: list[Request],
                        context: AnnotationContext) -> list[Response]:
        from openai import AsyncOpenAI

        o = self.params.openai
        run = _Run(self, context)
        http = async_http_client(o)
        async with AsyncOpenAI(base_url=o.base_url, api_key=api_key(o), max_retries=0,
                               timeout=o.timeout_s,
                               **({"http_client": http} if http is not None else {})) as client:
            run.client = client
            keys = [self.request_key(r) for r in requests]
            if self.cache is not None:  # one lookup for the shard, not one per request
                run.hits = await asyncio.to_thread(self.cache.get_many, keys)
            tasks: dict[str, asyncio.Task] = {}
            for request, key in zip(requests, keys):
                if key not in tasks:  # the same question twice in a shard is asked once
                    tasks[key] = asyncio.ensure_future(run.answer(request, key))
            try:
                await asyncio.gather(*tasks.values())
            finally:
                for task in tasks.values():
                    task.cancel()
        return [answer_for(request, tasks[self.request_key(request)].result())
                for request in requests]


class _Run:
    """State of one `annotate` call: client, concurrency bound, shared rate-limit pause."""

    def __init__(self, backend: OpenAIBackend, context: AnnotationContext):
        self.backend, self.params, self.context = backend, backend.params, context
        self.o: OpenAIParams = backend.params.openai
        self.stats = backend.stats
        self.client = None
        self.slots = asyncio.Semaphore(self.o.concurrency)
        self.pause_until = 0.0  # loop time before which no attempt starts (Retry-After)
        self.rng = random.Random(self.params.seed)
        self.urls: dict[str, str] = {}
        self.limits = backend.limits
        self.hits: dict[str, CachedAnswer] = {}  # cached answers of this run's keys

    def _response(self, request: Request, **fields: object) -> Response:
        return Response(request_id=request.request_id, tile_id=request.tile_id,
                        kind=request.kind, backend=NAME, model=self.backend.model,
                        prompt_version=request.prompt_version, **fields)

    def _failed(self, request: Request, error: str, **fields: object) -> Response:
        self.stats.failed += 1
        return self._response(request, status="failed", error=redact(error)[:ERROR_CHARS],
                              **fields)

    async def answer(self, request: Request, key: str) -> Response:
        """The answer to one request: from the cache, or asked (and re-asked while cleaning
        refuses it), or the record of its failure."""
        cache = self.backend.cache
        stale = False
        if cache is not None:
            hit = self.hits.get(key)
            if hit is not None:
                cleaned = clean_answer(redact(hit.raw_text), request, self.limits)
                if cleaned.ok:
                    self.stats.cache_hits += 1
                    return self._response(
                        request, status="ok", text=cleaned.text, usage=hit.usage,
                        cost_usd=hit.cost_usd, latency_s=hit.latency_s, attempts=hit.attempts,
                        cached=True)
                stale = True  # stored before a cleaning rule that now refuses it
        try:
            messages = self.backend.messages(request, self.context, self.urls)
        except (KeyError, BadImageError) as exc:
            return self._failed(request, f"image: {exc}")
        started = time.monotonic()
        attempts, prompt_tokens, completion_tokens, cost = 0, 0, 0, 0.0
        refusals: list[str] = []
        partial: Optional[tuple[Cleaned, str, str]] = None  # best batched-marks answer so far
        for ask in range(self.o.clean_retries + 1):
            call = await self._call(request, messages, ask)
            attempts += call.attempts
            if call.text is None:
                if partial is not None:
                    break
                return self._failed(
                    request, call.error or "no answer", attempts=attempts, cost_usd=cost,
                    latency_s=time.monotonic() - started,
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
            prompt_tokens += call.usage.prompt_tokens
            completion_tokens += call.usage.completion_tokens
            cost += self.backend.cost(call.usage, call.served_model)
            # scrubbed first: a key in an answer is never cleaned, cached or recorded
            raw = redact(without_cut_sentence(call.text, request, call.finish_reason))
            cleaned = clean_answer(raw, request, self.limits)
            self.stats.cleaning_fixes.update(cleaned.fixes)
            if cleaned.ok and MARKS_MISSING in cleaned.fixes:
                # some marks undescribed: keep the fullest answer, and ask again while allowed
                if partial is None or marks_count(cleaned) > marks_count(partial[0]):
                    partial = (cleaned, raw, call.served_model)
                self.stats.cleaning_refusals[MARKS_MISSING] += 1
                refusals.append(MARKS_MISSING)
                continue
            if cleaned.ok:
                partial = (cleaned, raw, call.served_model)
                break
            self.stats.cleaning_refusals[cleaned.reason] += 1
            refusals.append(cleaned.reason)
        if partial is not None:
            cleaned, raw, served_model = partial
            response = self._response(
                request, status="ok", text=cleaned.text, cost_usd=cost,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                latency_s=time.monotonic() - started, attempts=attempts)
            if cache is not None:
                await asyncio.to_thread(cache.put, key, response, raw_text=raw,
                                        served_model=served_model, replace=stale)
            self.stats.answered += 1
            return response
        return self._failed(
            request, f"output cleaning refused {len(refusals)} answers: {', '.join(refusals)}",
            attempts=attempts, cost_usd=cost, latency_s=time.monotonic() - started,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))

    async def _call(self, request: Request, messages: list[dict], ask: int) -> _Call:
        """One answer through the retry loop (`ask`: see OpenAIBackend.body)."""
        body = self.backend.body(request, messages, ask)
        last = ""
        for attempt in range(1, self.o.max_attempts + 1):
            try:
                return await self._attempt(body, attempt)
            except _Retry as retry:
                last = retry.cause
                self.stats.retries[retry.cause] += 1
                if attempt == self.o.max_attempts:
                    break
                if retry.delay is not None:  # Retry-After: everyone waits
                    loop = asyncio.get_running_loop()
                    self.pause_until = max(self.pause_until, loop.time() + retry.delay)
                else:
                    await asyncio.sleep(self._backoff(attempt))
            except _Fatal as fatal:
                return _Call(attempts=attempt, error=fatal.reason)
        return _Call(attempts=self.o.max_attempts,
                     error=f"{last} after {self.o.max_attempts} attempts")

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        ceiling = min(self.o.backoff_max_s, self.o.backoff_base_s * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)

    async def _wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (left := self.pause_until - loop.time()) > 0:
            await asyncio.sleep(left)

    async def _attempt(self, body: dict, attempt: int) -> _Call:
        """One HTTP attempt; raises _Retry for what another attempt may fix."""
        import openai
        from openai.types.chat import ChatCompletion

        await self._wait_pause()
        async with self.slots:
            await self._wait_pause()
            self.stats.http_attempts += 1
            try:
                # the body is already in the API's shape: posted as it is, which spares the
                # client's per-call parameter transform (a quarter of its CPU per call)
                completion = await asyncio.wait_for(
                    self.client.post(CHAT_PATH, cast_to=ChatCompletion, body=body,
                                     options={"timeout": self.o.timeout_s}),
                    self.o.timeout_s)
            except openai.RateLimitError as exc:
                raise _Retry("rate limited (429)", retry_after_seconds(
                    exc.response.headers, self.o.retry_after_max_s)) from None
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status >= 500 or status in RETRY_STATUSES:
                    raise _Retry(f"server error ({status})") from None
                if status in SETUP_STATUSES:
                    raise BadParamsError(
                        f"annotate.backend.openai: {public_url(self.o.base_url)} answered HTTP "
                        f"{status} ({SETUP_STATUSES[status]}; model {self.backend.model!r}, key "
                        f"from {self.o.api_key_env})") from None
                raise _Fatal(f"HTTP {status}: {exc.message}") from None
            except openai.APITimeoutError as exc:
                raise _Retry(_timeout_cause(exc)) from None
            except asyncio.TimeoutError:
                raise _Retry("timeout") from None
            except openai.APIConnectionError:
                raise _Retry("connection dropped") from None
            except (ValueError, openai.APIResponseValidationError):
                raise _Retry("malformed response") from None
        try:
            choices = completion.choices
        except AttributeError:
            choices = None
        if not choices:  # a 200 without an answer: a failed attempt, never an empty answer
            raise _Retry("no choices in the answer")
        try:
            choice = choices[0]
            text = choice.message.content
            usage = completion.usage
        except (AttributeError, IndexError, TypeError):
            raise _Retry("malformed response") from None
        if text is None or (isinstance(text, str) and not text.strip()):
            raise _Retry("empty answer")
        if not isinstance(text, str):
            raise _Retry("malformed response")
        return _Call(attempts=attempt, text=text, finish_reason=choice.finish_reason,
                     served_model=getattr(completion, "model", "") or "",
                     usage=Usage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                 completion_tokens=getattr(usage, "completion_tokens", 0) or 0))


class _Fatal(Exception):
    """A per-request error no retry fixes (HTTP 400, 422, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
