"""The one retry policy of every call to a model server (chat completions, Batch API files and
batches): what an error means, how long to wait, when to give up.

An error is one of three kinds (`classify`):
  retry   another attempt may fix it: 429 (rate limited; its Retry-After says how long the
          whole run waits), 5xx, 408, 409, timeouts, dropped connections, malformed responses
  fatal   this request will never succeed as it is (400, 422, ...): recorded as failed
  setup   the set-up is wrong for every request (401 key refused, 403, 404 no such model or
          endpoint, 400 for a token-limit field the model does not take): the run stops with
          one `BadParamsError` line
Waits are full-jitter exponential backoff, uniform in [0, min(backoff_max_s, backoff_base_s *
2^(attempt-1))], except after a 429 whose Retry-After (Retry-After-Ms, seconds or an HTTP date)
is honoured up to `retry_after_max_s`. At most `max_attempts` attempts; then `GaveUp` says the
last cause ("server error (500) after 3 attempts").
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Mapping, Optional, TypeVar

from pipeline.core.params import OpenAIParams

T = TypeVar("T")

# HTTP statuses worth another attempt besides 429 and 5xx (as the openai client itself does).
RETRY_STATUSES = (408, 409)
# Statuses that mean the set-up is wrong for every request.
SETUP_STATUSES = {401: "the server refused the API key", 403: "the API key may not use this",
                  404: "no such model or endpoint"}
# A 400 that refuses the token-limit field (newer models take only max_completion_tokens).
_TOKEN_FIELD_REFUSED = re.compile(r"unsupported (parameter|value).*\b(max_tokens|"
                                  r"max_completion_tokens)\b|\b(max_tokens|max_completion_tokens)"
                                  r"\b.*\b(not supported|unsupported)", re.I | re.S)


class RetryableError(Exception):
    """What another attempt may fix; `delay` is the server's Retry-After (None: back off)."""

    def __init__(self, cause: str, delay: Optional[float] = None):
        super().__init__(cause)
        self.cause, self.delay = cause, delay


class FatalError(Exception):
    """A per-request error no retry fixes (HTTP 400, 422, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SetupError(Exception):
    """An answer that means the set-up is wrong for every request: `status` and what it
    means; the caller names the server, model and key variable in a `BadParamsError`."""

    def __init__(self, status: int, meaning: str):
        super().__init__(meaning)
        self.status, self.meaning = status, meaning


class GaveUp(Exception):
    """Every attempt failed with an error worth retrying; the message names the last one."""

    def __init__(self, cause: str, attempts: int):
        super().__init__(f"{cause} after {attempts} attempt{'s' if attempts != 1 else ''}")
        self.cause, self.attempts = cause, attempts


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


def timeout_cause(exc: BaseException) -> str:
    """"timeout", or "connection dropped" for a connection failure that the transport reports
    as a timeout (openai's aiohttp transport maps every aiohttp connection error to one)."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if type(seen).__module__.startswith("aiohttp") and not isinstance(seen, TimeoutError):
            return "connection dropped"
        seen = seen.__cause__ or seen.__context__
    return "timeout"


def classify(exc: BaseException, retry_after_max_s: float
             ) -> RetryableError | FatalError | SetupError | None:
    """The kind of an error raised by an `openai` client call (see the module docstring), or
    None for an error that is not the server's answer (a bug: let it propagate)."""
    import openai

    if isinstance(exc, openai.RateLimitError):
        return RetryableError("rate limited (429)",
                              retry_after_seconds(exc.response.headers, retry_after_max_s))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500 or status in RETRY_STATUSES:
            return RetryableError(f"server error ({status})")
        if status in SETUP_STATUSES:
            return SetupError(status, SETUP_STATUSES[status])
        if status == 400 and _TOKEN_FIELD_REFUSED.search(str(exc.message)):
            return SetupError(status, "the model refuses the token-limit field; set "
                              "annotate.backend.openai.token_limit_field to the other one "
                              "(max_tokens or max_completion_tokens)")
        return FatalError(f"HTTP {status}: {exc.message}")
    if isinstance(exc, openai.APITimeoutError):
        return RetryableError(timeout_cause(exc))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return RetryableError("timeout")
    if isinstance(exc, openai.APIConnectionError):
        return RetryableError("connection dropped")
    if isinstance(exc, (ValueError, openai.APIResponseValidationError)):
        return RetryableError("malformed response")
    return None


@dataclass
class RetryPolicy:
    """Attempts and waits of one run (see the module docstring); `rng` seeds the jitter."""

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    retry_after_max_s: float
    rng: random.Random

    @classmethod
    def from_params(cls, params: OpenAIParams, seed: int) -> "RetryPolicy":
        return cls(params.max_attempts, params.backoff_base_s, params.backoff_max_s,
                   params.retry_after_max_s, random.Random(seed))

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)

    def call(self, attempt: Callable[[int], T], *,
             on_retry: Callable[[RetryableError], None], attempts: int = 0) -> T:
        """`attempt(n)` for n = 1, 2, ... until it returns, sleeping between tries; it raises
        RetryableError for what another try may fix (FatalError and SetupError pass through).
        Raises GaveUp after `attempts` (default `max_attempts`) tries."""
        attempts = attempts or self.max_attempts
        for n in range(1, attempts + 1):
            try:
                return attempt(n)
            except RetryableError as retry:
                on_retry(retry)
                if n == attempts:
                    raise GaveUp(retry.cause, attempts) from None
                time.sleep(retry.delay if retry.delay is not None else self.backoff(n))
        raise AssertionError("unreachable")

    async def call_async(self, attempt: Callable[[int], Awaitable[T]], *,
                         on_retry: Callable[[RetryableError], None],
                         pause: Callable[[float], Awaitable[None]]) -> T:
        """As `call`, in an event loop; a Retry-After goes to `pause` (the run-wide rate-limit
        pause every later attempt waits out) instead of a sleep of this caller alone."""
        for n in range(1, self.max_attempts + 1):
            try:
                return await attempt(n)
            except RetryableError as retry:
                on_retry(retry)
                if n == self.max_attempts:
                    raise GaveUp(retry.cause, self.max_attempts) from None
                if retry.delay is not None:
                    await pause(retry.delay)
                else:
                    await asyncio.sleep(self.backoff(n))
        raise AssertionError("unreachable")
