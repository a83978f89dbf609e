"""A real OpenAI-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

It speaks `POST /v1/chat/completions` (OpenAI JSON: id, object, created, model, choices, usage)
and answers deterministically from the prompt text. Faults are injected by a seeded RNG at a
given rate: 429 with Retry-After, 500, a response slower than the client's timeout (the server
sleeps, then drops the connection, so it never counts as answered), a dropped connection, a
malformed JSON body. Counters say how many requests came, which faults were served, and how
many times each request fingerprint (hash of its messages) was answered, so that a test can
show that no request was answered twice.

    with LoopbackOpenAI(fault_rate=0.2, seed=0) as server:
        params = ...base_url=server.base_url...
        ...
        assert max(server.counters.answered.values()) == 1

It only ever binds 127.0.0.1.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Sequence

FAULTS = ("429", "500", "slow", "drop", "malformed")
IMAGE_TOKENS = 85  # prompt tokens counted per image, like OpenAI's low-detail image cost
HOST = "127.0.0.1"

_COLOURS = ("grey", "white", "black", "red", "blue", "silver", "dark green", "beige")
_PLACES = ("parked beside a road", "parked in a lot", "moving along a street",
           "standing near a building", "next to a row of trees")


def fingerprint(messages: object) -> str:
    """Hash of a request's messages: the same question asked again has the same print."""
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_answer(prompt: str, call: int = 0) -> str:
    """A deterministic, clean answer in the shape the paper's prompt asks for."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    colour, place = _COLOURS[h % len(_COLOURS)], _PLACES[(h // 8) % len(_PLACES)]
    if "four short sentences" in prompt:
        return (f"The image shows an urban area with roads and buildings. Several vehicles are "
                f"{place}. A {colour} roof stands out near the center. Trees line the streets.")
    m = re.search(r"attributes of the (.+?) at the (.+?) that", prompt)
    if m:
        return f"A {colour} {m.group(1)} {place}."
    m = re.search(r"description of (\w+) (.+?) at the (.+?) in the", prompt)
    if m:
        return f"{m.group(1).capitalize()} {m.group(2)} are {place} at the {m.group(3)}."
    return f"A {colour} small vehicle {place}."


@dataclass
class Counters:
    """What the server saw and did (read them after the client is done)."""

    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)        # fingerprint -> answers sent
    answered_prompts: Counter = field(default_factory=Counter)  # prompt text -> answers sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Generation and image parameters of every request (never headers, never image bytes).
    seen: list = field(default_factory=list)

    @property
    def answers(self) -> int:
        return sum(self.answered.values())


class LoopbackOpenAI:
    """Context manager running the server in a thread; `base_url` is its `/v1` root."""

    def __init__(self, *, fault_rate: float = 0.0, seed: int = 0,
                 faults: Sequence[str] = FAULTS, retry_after: str = "0.05",
                 slow_s: float = 1.0, latency_s: float = 0.0,
                 answer: Callable[[str, int], str] = default_answer,
                 api_key: Optional[str] = None, model: Optional[str] = None,
                 script: Sequence[Optional[str]] = ()):
        unknown = (set(faults) | set(script)) - set(FAULTS) - {None}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.fault_rate, self.faults = fault_rate, tuple(faults)
        self.retry_after = retry_after  # header value as sent: seconds, or an HTTP date
        self.slow_s, self.latency_s = slow_s, latency_s
        self.answer, self.api_key, self.model = answer, api_key, model
        # Prompts containing any of these substrings always get a 500 (clear it to heal).
        self.fail_prompts: set[str] = set()
        # Faults (or None) served to the first requests, in order, before the RNG takes over.
        self.script = list(script)
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://{HOST}:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "LoopbackOpenAI":
        self._httpd = _Server((HOST, 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = Counters()

    # -- called by the handler ------------------------------------------------------------

    def _draw_fault(self, prompt: str) -> Optional[str]:
        with self._lock:
            self.counters.requests += 1
            if any(s in prompt for s in self.fail_prompts):
                fault = "forced_500"
            elif self.script:
                fault = self.script.pop(0)
            elif self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            else:
                fault = None
            if fault:
                self.counters.faults[fault] += 1
            return fault

    def _record_answer(self, fp: str, prompt: str, usage: dict) -> int:
        """Count an answer about to be sent; returns how many this print had before."""
        with self._lock:
            before = self.counters.answered[fp]
            self.counters.answered[fp] += 1
            self.counters.answered_prompts[prompt] += 1
            self.counters.prompt_tokens += usage["prompt_tokens"]
            self.counters.completion_tokens += usage["completion_tokens"]
            return before


class _Server(ThreadingHTTPServer):
    # A backlog for every client connection at once (the default 5 drops connects, which the
    # client would see as timeouts that the server never counted).
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass  # quiet: tests read counters, not logs

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._json(404, {"error": {"message": "not found", "type": "invalid_request"}})
        authorization = self.headers.get("Authorization")
        if owner.api_key is not None and authorization != f"Bearer {owner.api_key}":
            return self._json(401, {"error": {"message": "invalid api key", "type": "auth"}})
        try:
            payload = json.loads(body)
            messages = payload["messages"]
        except (ValueError, KeyError):
            return self._json(400, {"error": {"message": "bad request body", "type": "invalid"}})
        prompt, images = _prompt_and_images(messages)
        with owner._lock:
            owner.counters.seen.append({k: payload.get(k) for k in
                                        ("model", "temperature", "max_tokens", "seed")}
                                       | {"images": images})
        fault = owner._draw_fault(prompt)
        if fault in ("500", "forced_500"):
            return self._json(500, {"error": {"message": "internal error", "type": "server"}})
        if fault == "429":
            return self._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                              {"Retry-After": owner.retry_after})
        if fault == "slow":
            time.sleep(owner.slow_s)
            return self._drop()
        if fault == "drop":
            return self._drop()
        if fault == "malformed":
            raw = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"mess'
            return self._send(200, raw, {"Content-Type": "application/json"})
        if owner.latency_s:
            time.sleep(owner.latency_s)
        fp = fingerprint(messages)
        with owner._lock:
            call = owner.counters.answered[fp]
        text = owner.answer(prompt, call)
        usage = {"prompt_tokens": len(prompt.split()) + IMAGE_TOKENS * len(images),
                 "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        owner._record_answer(fp, prompt, usage)
        return self._json(200, {
            "id": f"chatcmpl-{fp}-{call}", "object": "chat.completion", "created": int(time.time()),
            "model": owner.model or payload.get("model", "loopback"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": usage})

    def _json(self, status: int, obj: dict, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        """Close the socket without a response."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _prompt_and_images(messages: list) -> tuple[str, list[str]]:
    """The text of every message part, and the media type and detail of every image part."""
    texts, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                media = url[5:url.index(";")] if url.startswith("data:") else "url"
                images.append(f"{media}/{part['image_url'].get('detail', 'auto')}")
    return "\n".join(texts), images


def http_date_after(seconds: float) -> str:
    """A Retry-After value as an HTTP date `seconds` from now (whole seconds, rounded up)."""
    return email.utils.formatdate(math.ceil(time.time() + seconds), usegmt=True)
