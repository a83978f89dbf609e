"""The OpenAI-compatible backend: OpenAI itself or any compatible server (vLLM, SGLang, Ollama,
LM Studio), with the official `openai` client. Its transport is a chat completion per ask
(`ChatTransport`), or the Batch API with `openai.mode: batch` (`annotators.openai_batch`); the
cache, cleaning and re-asks are `annotators.answering`'s, retries `annotators.retry`'s.

The server is, in this order: `openai.base_url` when set, else the environment variable
OPENAI_BASE_URL, else https://api.openai.com/v1 (the openai client's own rule). The stage's
report says which one was used (`backend_stats.endpoint`: scheme://host[:port]/path, no
credentials, no query) and where it came from ("params", "OPENAI_BASE_URL" or "default").

The asks of a round are concurrent (asyncio), at most `concurrency` in flight for the whole
run, every shard task and worker process together (`annotators.limiter`); a 429's Retry-After
pauses every request of the run. A 200 answer without choices, or whose content is empty or
missing, is a failed attempt (retried), never an empty answer. The token limit is sent as
`openai.token_limit_field` (max_tokens, or max_completion_tokens for newer OpenAI models; a
server that refuses the field stops the run with one line saying to switch it). Usage and cost
come from the server's `usage` at `openai.prices`.

The API key is read from the environment variable named by `openai.api_key_env` when a run
starts (and registered with `pipeline.core.errors.register_secret` in the process that reads it,
a worker process included); it is never stored on the backend, in the cache, in a response or
in a message: answers and error texts are scrubbed of it (whole, or any 8+ character prefix)
before they are cleaned, cached or recorded. Credentials in the server URL
(https://user:pass@host) are registered alike and `public_url` leaves them out wherever the
server is named.

Two request kinds besides the paper's passes: `instance_batch` (every mark of a patch in one
call) is sent with structured output (a JSON schema) and its answer is split into per-mark
descriptions, each cleaned like an instance answer; `compose` (the LLM composer's paragraph) is
passed on as written, for `pipeline.stages.compose.llm` to validate. A request with an empty
image hash is sent as text only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ContextManager, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from annotators.answering import Answer, Ask, Deliver, ModelBackend, Transport, image_error
from annotators.base import AnnotationContext
from annotators.cache import ResponseCache, cache_key
from annotators.limiter import request_limiter
from annotators.retry import FatalError, GaveUp, RetryableError, RetryPolicy, SetupError, classify
from pipeline.core.errors import BadImageError, BadParamsError, register_secret
from pipeline.core.imaging import PNG_SIGNATURE
from pipeline.core.params import BackendParams, OpenAIParams, check_server_url
from schemas import Request, Response, Usage

log = logging.getLogger(__name__)

NAME = "openai"
CHAT_PATH = "/chat/completions"  # under the server URL
DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai client's default
BASE_URL_ENV = "OPENAI_BASE_URL"  # the openai client's variable
# Structured output of an instance_batch request (strict JSON schema: the root is an object).
MARKS_FORMAT = {"type": "json_schema", "json_schema": {"name": "marks", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["marks"],
    "properties": {"marks": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["mark", "description"],
        "properties": {"mark": {"type": "integer"}, "description": {"type": "string"}}}}}}}}


# ---------------------------------------------------------------------------------------------
# The server and its key


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
    in which a server is named in messages and the cache."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def endpoint_url(url: str) -> str:
    """scheme://host[:port]/path of `url`: no credentials, query or fragment (what a report
    may show of a server)."""
    parts = urlsplit(public_url(url))
    return urlunsplit(parts._replace(query="", fragment=""))


@dataclass(frozen=True)
class Endpoint:
    """The server a run talks to (`url`, possibly with credentials) and where it was set:
    "params" (openai.base_url), "OPENAI_BASE_URL" (the environment) or "default"."""

    url: str
    source: str

    def report(self) -> dict:
        return {"url": endpoint_url(self.url), "source": self.source}


def resolve_endpoint(params: OpenAIParams,
                     environ: Mapping[str, str] = os.environ) -> Endpoint:
    """`openai.base_url` if set, else OPENAI_BASE_URL, else the client's default URL."""
    if params.base_url:
        return Endpoint(params.base_url, "params")
    url = environ.get(BASE_URL_ENV, "").strip()
    if not url:
        return Endpoint(DEFAULT_BASE_URL, "default")
    register_url_secrets(url)  # before any message could name it
    try:
        check_server_url(url, f"environment variable {BASE_URL_ENV}")
    except ValueError as exc:
        raise BadParamsError(f"{exc} (it names the server because "
                             "annotate.backend.openai.base_url is empty)") from None
    return Endpoint(url, BASE_URL_ENV)


def api_key(params: OpenAIParams, url: str) -> str:
    """The key from the environment variable `params.api_key_env` names, registered as a
    secret of this process (with any credentials in the server `url`), so that no text this
    process writes or prints holds it."""
    register_url_secrets(url)
    key = os.environ.get(params.api_key_env, "").strip()
    if not key:
        raise BadParamsError(
            f"annotate.backend.openai.api_key_env: environment variable {params.api_key_env} "
            f"is not set (it must hold the API key; any value for a server without keys)")
    register_secret(key)
    return key


def setup_refused(error: SetupError, server: str, params: OpenAIParams, what: str = "",
                  model: str = "") -> BadParamsError:
    """The one line that stops a run whose set-up the server refused (key, model, field)."""
    to = f" to {what}" if what else ""
    of = f"model {model!r}, " if model else ""
    return BadParamsError(f"annotate.backend.openai: {server} answered HTTP {error.status}{to} "
                          f"({error.meaning}; {of}key from {params.api_key_env})")


# ---------------------------------------------------------------------------------------------
# What is asked


def generation_params(params: BackendParams, kind: Optional[str] = None) -> dict:
    """Everything besides prompt and image that shapes an answer: part of the cache key.
    `kind` picks its own max_tokens where `max_tokens_by_kind` names it (the field it is sent
    in, `openai.token_limit_field`, does not shape the answer and is not part of the key)."""
    o = params.openai
    gen = {"temperature": params.temperature, "max_tokens": params.max_tokens_for(kind or ""),
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


def async_http_client(params: OpenAIParams, url: str) -> Optional[object]:
    """The HTTP client `openai.http_client` asks for: openai's aiohttp transport (less CPU per
    call) or None for the client's default httpx one."""
    if params.http_client == "httpx":
        return None
    if _userinfo(url):
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


def request_cost(usage: Usage, price: Optional[object]) -> float:
    """USD for one call: tokens times the model's per-million-token prices."""
    if price is None:
        return 0.0
    return (usage.prompt_tokens * price.input_per_mtok  # type: ignore[attr-defined]
            + usage.completion_tokens * price.output_per_mtok) / 1e6  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# The backend


class OpenAIBackend(ModelBackend):
    """Answers requests through an OpenAI-compatible chat-completions endpoint."""

    name = NAME
    answers_instance_batch = True  # describes every mark of a patch in one call
    shares_request_limit = True  # concurrency and rate-limit pauses hold for the whole run
    reported_stats = ("http_attempts", "batch_files", "batches_created", "batches_resumed",
                      "batch_polls", "cache_hits", "answered", "failed", "retries",
                      "cleaning_refusals", "cleaning_fixes", "unpriced_models", "endpoint")

    def __init__(self, params: BackendParams, cache: Optional[ResponseCache] = None):
        super().__init__(params, cache)
        self.model = params.model
        self.endpoint = resolve_endpoint(params.openai)
        self.stats.endpoint = self.endpoint.report()  # type: ignore[union-attr]
        api_key(params.openai, self.endpoint.url)  # a missing key stops here, before any work
        if params.openai.mode == "batch" and cache is None:
            raise BadParamsError("annotate.backend.openai.mode: batch mode needs the response "
                                 "cache (annotate.cache.enabled: true): open batches are kept "
                                 "there so that a killed run does not pay again")

    @property
    def server(self) -> str:
        """The server as messages and the cache db name it (no credentials)."""
        return public_url(self.endpoint.url)

    @property
    def limit_name(self) -> str:
        """The run-wide request limit this backend shares: one per server, key variable and
        concurrency (`annotators.limiter`)."""
        o = self.params.openai
        digest = hashlib.sha256(f"{self.server}\0{o.api_key_env}".encode()).hexdigest()[:16]
        return f"geopixeld-openai-{digest}-{o.concurrency}"

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
            temperature = max(temperature, self.params.clean_retry_temperature)
        body = {"model": self.model, "messages": messages, "temperature": temperature,
                self.params.openai.token_limit_field: self.params.max_tokens_for(request.kind),
                "seed": self.params.seed + ask}
        if request.kind == "instance_batch":
            body["response_format"] = MARKS_FORMAT
        return body

    def cost(self, usage: Usage, served_model: str = "") -> float:
        """USD of one call at this model's price (0, flagged once, for an unpriced model)."""
        prices = self.params.openai.prices
        price = prices.get(self.model) or prices.get(served_model)
        if price is None and self.model not in self.stats.unpriced_models:  # type: ignore[union-attr]
            self.stats.unpriced_models.add(self.model)  # type: ignore[union-attr]
            log.warning("no price for model %s in annotate.backend.openai.prices: "
                        "cost counted as 0", self.model)
        return request_cost(usage, price)

    def transport(self, context: AnnotationContext) -> ContextManager[Transport]:
        if self.params.openai.mode == "batch":
            from annotators.openai_batch import BatchTransport

            return BatchTransport(self, context)
        return ChatTransport(self, context)

    def annotate(self, requests: Sequence[Request], context: AnnotationContext) -> list[Response]:
        """One response per request, in request order."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return super().annotate(requests, context)
        # Called from inside an event loop (a notebook): ours runs in a thread of its own.
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(ModelBackend.annotate, self, requests, context).result()


# ---------------------------------------------------------------------------------------------
# Chat completions


class ChatTransport:
    """The chat completions of one `annotate` call: one event loop and one client for all its
    rounds, the asks of a round concurrent under the run-wide limit, each through the retry
    policy."""

    def __init__(self, backend: OpenAIBackend, context: AnnotationContext):
        self.backend, self.context = backend, context
        self.o: OpenAIParams = backend.params.openai
        self.retry = RetryPolicy.from_params(self.o, backend.params.seed)
        self.limiter = request_limiter(backend.limit_name, self.o.concurrency)
        self.urls: dict[str, str] = {}  # image sha256 -> data URL, encoded once per call
        self.client = None

    def __enter__(self) -> "ChatTransport":
        self._runner = asyncio.Runner()
        try:
            self.client = self._runner.run(self._open())
        except BaseException:
            self._runner.close()
            raise
        return self

    async def _open(self) -> object:
        from openai import AsyncOpenAI

        url = self.backend.endpoint.url
        http = async_http_client(self.o, url)
        return AsyncOpenAI(base_url=url, api_key=api_key(self.o, url), max_retries=0,
                           timeout=self.o.timeout_s,
                           **({"http_client": http} if http is not None else {}))

    def __exit__(self, *exc: object) -> None:
        try:
            self._runner.run(self.client.close())  # type: ignore[union-attr]
        finally:
            self._runner.close()

    def ask(self, asks: Sequence[Ask], deliver: Deliver) -> None:
        self._runner.run(self._round(asks, deliver))

    async def _round(self, asks: Sequence[Ask], deliver: Deliver) -> None:
        tasks = [asyncio.ensure_future(self._ask(ask, deliver)) for ask in asks]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    def _count_retry(self, retry: RetryableError) -> None:
        self.backend.stats.retries[retry.cause] += 1  # type: ignore[union-attr]

    async def _ask(self, ask: Ask, deliver: Deliver) -> None:
        """One answer through the retry loop, delivered with its attempts and seconds."""
        started = time.monotonic()
        try:
            messages = self.backend.messages(ask.request, self.context, self.urls)
        except (KeyError, BadImageError) as exc:
            deliver(ask.key, Answer(ask.number, error=image_error(exc), attempts=0))
            return
        body = self.backend.body(ask.request, messages, ask.number)
        tried = 0

        async def attempt(n: int) -> Answer:
            nonlocal tried
            tried = n
            return await self._attempt(body)

        try:
            answer = await self.retry.call_async(attempt, on_retry=self._count_retry,
                                                 pause=self.limiter.pause)
        except GaveUp as gave_up:
            answer = Answer(ask.number, error=str(gave_up))
        except FatalError as fatal:
            answer = Answer(ask.number, error=fatal.reason)
        except SetupError as refused:
            raise setup_refused(refused, self.backend.server, self.o,
                                model=self.backend.model) from None
        deliver(ask.key, dataclasses.replace(answer, number=ask.number, attempts=tried,
                                             latency_s=time.monotonic() - started))

    async def _attempt(self, body: dict) -> Answer:
        """One HTTP attempt; raises RetryableError for what another attempt may fix."""
        from openai.types.chat import ChatCompletion

        async with self.limiter.slot():
            self.backend.stats.http_attempts += 1  # type: ignore[union-attr]
            try:
                # the body is already in the API's shape: posted as it is, which spares the
                # client's per-call parameter transform (a quarter of its CPU per call)
                completion = await asyncio.wait_for(
                    self.client.post(CHAT_PATH, cast_to=ChatCompletion,  # type: ignore[union-attr]
                                     body=body, options={"timeout": self.o.timeout_s}),
                    self.o.timeout_s)
            except Exception as exc:
                kind = classify(exc, self.o.retry_after_max_s)
                if kind is None:
                    raise
                raise kind from None
        try:
            choices = completion.choices
        except AttributeError:
            choices = None
        if not choices:  # a 200 without an answer: a failed attempt, never an empty answer
            raise RetryableError("no choices in the answer")
        try:
            choice = choices[0]
            text = choice.message.content
            usage = completion.usage
        except (AttributeError, IndexError, TypeError):
            raise RetryableError("malformed response") from None
        if text is None or (isinstance(text, str) and not text.strip()):
            raise RetryableError("empty answer")
        if not isinstance(text, str):
            raise RetryableError("malformed response")
        served = getattr(completion, "model", "") or ""
        used = Usage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                     completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        return Answer(0, text=text, finish_reason=choice.finish_reason, usage=used,
                      cost_usd=self.backend.cost(used, served), served_model=served)
