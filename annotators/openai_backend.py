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
starts; it is never stored on the backend, in the cache, in a response or in a message.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np

from annotators.base import AnnotationContext
from annotators.cache import ResponseCache, cache_key
from annotators.cleaning import CleaningLimits, clean_output, drop_unfinished_sentence
from pipeline.errors import BadImageError, BadParamsError
from pipeline.imaging import PNG_SIGNATURE
from pipeline.params import BackendParams, OpenAIParams
from schemas import Request, Response, Usage

log = logging.getLogger(__name__)

NAME = "openai"
# HTTP statuses worth another attempt besides 429 and 5xx (as the openai client itself does).
RETRY_STATUSES = (408, 409)
# Statuses that mean the set-up is wrong for every request: stop the run with one line.
SETUP_STATUSES = {401: "the server refused the API key", 403: "the API key may not use this",
                  404: "no such model or endpoint"}
ERROR_CHARS = 200  # longest error text kept in a Response


@dataclass
class BackendStats:
    """What a run did, for the stage's report: calls, retries by cause, cleaning outcomes."""

    http_attempts: int = 0
    cache_hits: int = 0
    answered: int = 0
    failed: int = 0
    retries: Counter = field(default_factory=Counter)
    cleaning_refusals: Counter = field(default_factory=Counter)
    cleaning_fixes: Counter = field(default_factory=Counter)
    unpriced_models: set = field(default_factory=set)

    def as_dict(self) -> dict:
        return {"http_attempts": self.http_attempts, "cache_hits": self.cache_hits,
                "answered": self.answered, "failed": self.failed,
                "retries": dict(self.retries), "cleaning_refusals": dict(self.cleaning_refusals),
                "cleaning_fixes": dict(self.cleaning_fixes),
                "unpriced_models": sorted(self.unpriced_models)}


def api_key(params: OpenAIParams) -> str:
    """The key from the environment variable `params.api_key_env` names."""
    key = os.environ.get(params.api_key_env, "").strip()
    if not key:
        raise BadParamsError(
            f"annotate.backend.openai.api_key_env: environment variable {params.api_key_env} "
            f"is not set (it must hold the API key; any value for a server without keys)")
    return key


def generation_params(params: BackendParams) -> dict:
    """Everything besides prompt and image that shapes an answer: part of the cache key."""
    o = params.openai
    gen = {"temperature": params.temperature, "max_tokens": params.max_tokens,
           "seed": params.seed, "image_format": o.image_format, "image_detail": o.image_detail}
    if o.image_format == "jpeg":
        gen["jpeg_quality"] = o.jpeg_quality
    return gen


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

    def __init__(self, params: BackendParams, cache: Optional[ResponseCache] = None):
        self.params = params
        self.model = params.model
        self.cache = cache
        self.limits = CleaningLimits.from_params(params.openai)
        self.generation = generation_params(params)
        self.stats = BackendStats()
        api_key(params.openai)  # a missing key stops here, before any work

    def request_key(self, request: Request) -> str:
        return cache_key(backend=NAME, model=self.model, prompt_version=request.prompt_version,
                         prompt=request.prompt, image_sha256=request.image_sha256,
                         generation=self.generation)

    def annotate(self, requests: Sequence[Request], context: AnnotationContext) -> list[Response]:
        """One response per request, in request order."""
        if not requests:
            return []
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
        async with AsyncOpenAI(base_url=o.base_url, api_key=api_key(o), max_retries=0,
                               timeout=o.timeout_s) as client:
            run.client = client
            tasks: dict[str, asyncio.Task] = {}
            for request in requests:
                key = self.request_key(request)
                if key not in tasks:  # the same question twice in a shard is asked once
                    tasks[key] = asyncio.ensure_future(run.answer(request, key))
            try:
                await asyncio.gather(*tasks.values())
            finally:
                for task in tasks.values():
                    task.cancel()
        responses = []
        for request in requests:
            answer = tasks[self.request_key(request)].result()
            if answer.request_id != request.request_id:
                answer = answer.model_copy(update={
                    "request_id": request.request_id, "tile_id": request.tile_id,
                    "kind": request.kind, "prompt_version": request.prompt_version,
                    "cached": answer.status == "ok"})
            responses.append(answer)
        return responses


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

    def _response(self, request: Request, **fields: object) -> Response:
        return Response(request_id=request.request_id, tile_id=request.tile_id,
                        kind=request.kind, backend=NAME, model=self.backend.model,
                        prompt_version=request.prompt_version, **fields)

    def _failed(self, request: Request, error: str, **fields: object) -> Response:
        self.stats.failed += 1
        return self._response(request, status="failed", error=self._scrub(error)[:ERROR_CHARS],
                              **fields)

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.o.api_key_env, "").strip()
        return text.replace(key, "***") if key else text

    async def answer(self, request: Request, key: str) -> Response:
        """The answer to one request: from the cache, or asked (and re-asked while cleaning
        refuses it), or the record of its failure."""
        cache = self.backend.cache
        stale = False
        if cache is not None:
            hit = await asyncio.to_thread(cache.get, key)
            if hit is not None:
                cleaned = clean_output(hit.raw_text, request, self.backend.limits)
                if cleaned.ok:
                    self.stats.cache_hits += 1
                    return self._response(
                        request, status="ok", text=cleaned.text, usage=hit.usage,
                        cost_usd=hit.cost_usd, latency_s=hit.latency_s, attempts=hit.attempts,
                        cached=True)
                stale = True  # stored before a cleaning rule that now refuses it
        try:
            messages = self._messages(request)
        except (KeyError, BadImageError) as exc:
            return self._failed(request, f"image: {exc}")
        started = time.monotonic()
        attempts, prompt_tokens, completion_tokens, cost = 0, 0, 0, 0.0
        refusals: list[str] = []
        for ask in range(self.o.clean_retries + 1):
            call = await self._call(messages, ask)
            attempts += call.attempts
            if call.text is None:
                return self._failed(
                    request, call.error or "no answer", attempts=attempts, cost_usd=cost,
                    latency_s=time.monotonic() - started,
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
            prompt_tokens += call.usage.prompt_tokens
            completion_tokens += call.usage.completion_tokens
            cost += self._cost(call)
            raw = call.text
            if call.finish_reason == "length":  # cut by max_tokens: drop the broken sentence
                raw = drop_unfinished_sentence(raw)
            cleaned = clean_output(raw, request, self.backend.limits)
            self.stats.cleaning_fixes.update(cleaned.fixes)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            if cleaned.ok:
                response = self._response(
                    request, status="ok", text=cleaned.text, usage=usage, cost_usd=cost,
                    latency_s=time.monotonic() - started, attempts=attempts)
                if cache is not None:
                    await asyncio.to_thread(cache.put, key, response, raw_text=raw,
                                            served_model=call.served_model, replace=stale)
                self.stats.answered += 1
                return response
            self.stats.cleaning_refusals[cleaned.reason] += 1
            refusals.append(cleaned.reason)
        return self._failed(
            request, f"output cleaning refused {len(refusals)} answers: {', '.join(refusals)}",
            attempts=attempts, cost_usd=cost, latency_s=time.monotonic() - started,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))

    def _messages(self, request: Request) -> list[dict]:
        sha = request.image_sha256
        if sha not in self.urls:
            self.urls[sha] = image_data_url(self.context.image(sha), self.o)
        return [{"role": "user", "content": [
            {"type": "image_url",
             "image_url": {"url": self.urls[sha], "detail": self.o.image_detail}},
            {"type": "text", "text": request.prompt}]}]

    def _cost(self, call: _Call) -> float:
        prices = self.o.prices
        price = prices.get(self.backend.model) or prices.get(call.served_model)
        if price is None and self.backend.model not in self.stats.unpriced_models:
            self.stats.unpriced_models.add(self.backend.model)
            log.warning("no price for model %s in annotate.backend.openai.prices: "
                        "cost counted as 0", self.backend.model)
        return request_cost(call.usage, price)

    async def _call(self, messages: list[dict], ask: int) -> _Call:
        """One answer through the retry loop. `ask` > 0 is a re-ask after cleaning refused an
        answer: another seed and some temperature, or the same answer would come back."""
        temperature = self.params.temperature
        if ask:
            temperature = max(temperature, self.o.clean_retry_temperature)
        last = ""
        for attempt in range(1, self.o.max_attempts + 1):
            try:
                return await self._attempt(messages, temperature, self.params.seed + ask, attempt)
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

    async def _attempt(self, messages: list[dict], temperature: float, seed: int,
                       attempt: int) -> _Call:
        """One HTTP attempt; raises _Retry for what another attempt may fix."""
        import openai

        await self._wait_pause()
        async with self.slots:
            await self._wait_pause()
            self.stats.http_attempts += 1
            try:
                completion = await asyncio.wait_for(
                    self.client.chat.completions.create(
                        model=self.backend.model, messages=messages, temperature=temperature,
                        max_tokens=self.params.max_tokens, seed=seed, timeout=self.o.timeout_s),
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
                        f"annotate.backend.openai: {self.o.base_url} answered HTTP {status} "
                        f"({SETUP_STATUSES[status]}; model {self.backend.model!r}, key from "
                        f"{self.o.api_key_env})") from None
                raise _Fatal(f"HTTP {status}: {exc.message}") from None
            except (openai.APITimeoutError, asyncio.TimeoutError):
                raise _Retry("timeout") from None
            except openai.APIConnectionError:
                raise _Retry("connection dropped") from None
            except (ValueError, openai.APIResponseValidationError):
                raise _Retry("malformed response") from None
        try:
            choice = completion.choices[0]
            text = choice.message.content
            usage = completion.usage
        except (AttributeError, IndexError, TypeError):
            raise _Retry("malformed response") from None
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
