"""A real OpenAI-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

It speaks `POST /v1/chat/completions` (OpenAI JSON: id, object, created, model, choices, usage)
and answers deterministically from the prompt text: the paper's three passes, a batched-marks
prompt (a JSON object of per-mark descriptions) and a compose prompt (a paragraph using every
phrase id once).

It also speaks the Batch API: `POST /v1/files` (multipart upload, purpose "batch"),
`POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}` and `GET /v1/files/{id}/content`.
A batch moves validating -> in_progress -> finalizing -> completed over `batch_polls` polls of
its status; on completion every line of its input is answered as a chat completion would be
(counted alike), lines whose prompt holds a `fail_prompts` string go to the error file.

`hold_after(n)` lets n more chat answers through and holds every later request until
`release()`, which drops unanswered every request that arrived before it (held or still on its
way to the hold): a client killed while requests are held had requests in flight, none of them
answered. Faults are injected by a seeded RNG at a
given rate: 429 with Retry-After, 500, a response slower than the client's timeout (the server
sleeps, then drops the connection, so it never counts as answered), a dropped connection, a
malformed JSON body. Counters say how many requests came, which faults were served, and how
many times each request fingerprint (hash of its messages) was answered, so that a test can
show that no request was answered twice; how many chat requests were in flight at most
(`max_in_flight`, with `latency_s` keeping each one open that long) and when each arrived
(`arrivals`: time.monotonic(), the fault served and the prompt), so that a test can show a
run-wide limit.

`token_field` makes the server take the token limit in one field only ("max_tokens" or
"max_completion_tokens"): a request that sends the other gets OpenAI's HTTP 400 "Unsupported
parameter", as newer OpenAI models answer `max_tokens`.

    with LoopbackOpenAI(fault_rate=0.2, seed=0) as server:
        params = ...base_url=server.base_url...
        ...
        assert max(server.counters.answered.values()) == 1

It only ever binds 127.0.0.1.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hashlib
import itertools
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
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
IMAGE_TOKENS = 85  # prompt tokens counted per image, like OpenAI's low-detail image cost
HOST = "127.0.0.1"

_COLOURS = ("grey", "white", "black", "red", "blue", "silver", "dark green", "beige")
_PLACES = ("parked beside a road", "parked in a lot", "moving along a street",
           "standing near a building", "next to a row of trees")


def fingerprint(messages: object) -> str:
    """Hash of a request's messages: the same question asked again has the same print."""
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MARK_LINE = re.compile(r"^Mark (\d+): the (.+?) at the (.+?)$", re.M)
_PHRASE_LINE = re.compile(r"^\[(\d+)\] (.+?)(?: \((.+?)\))?: (.+)$", re.M)


def default_answer(prompt: str, call: int = 0) -> str:
    """A deterministic, clean answer in the shape the paper's prompt asks for."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    colour, place = _COLOURS[h % len(_COLOURS)], _PLACES[(h // 8) % len(_PLACES)]
    if "Answer in JSON only" in prompt:  # batched marks
        return json.dumps({"marks": [
            {"mark": int(n), "description": f"A {_COLOURS[(h + int(n)) % len(_COLOURS)]} "
                                            f"{category} {_PLACES[(h + int(n)) % len(_PLACES)]}."}
            for n, category, _ in _MARK_LINE.findall(prompt)]})
    if "Merge these annotations" in prompt:  # compose: every id once, in the given order
        return compose_answer(prompt)
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


def compose_answer(prompt: str, order: Optional[Sequence[int]] = None) -> str:
    """A valid composition of a compose prompt: the scene, then one sentence per phrase id
    (in `order`, default as listed) built from the annotator's text."""
    scene = prompt.split("Scene:\n", 1)[1].split("\n\n", 1)[0].strip()
    phrases = {int(i): (where, text) for i, _, where, text in _PHRASE_LINE.findall(prompt)}
    sentences = [scene]
    for i in order or sorted(phrases):
        where, text = phrases[i]
        said = text.rstrip(".")
        said = said[0].lower() + said[1:] if said[:1].isupper() else said
        sentences.append(f"The {{{i}}}{' ' + where if where else ''} is described as: {said}.")
    return " ".join(sentences)


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
    files_uploaded: int = 0
    batches_created: int = 0
    batch_polls: int = 0
    batch_lines: int = 0
    in_flight: int = 0  # chat requests being handled now
    max_in_flight: int = 0  # the most at once
    arrivals: list = field(default_factory=list)  # (time.monotonic(), fault or None, prompt)

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
                 script: Sequence[Optional[str]] = (), batch_polls: int = 3,
                 batch_create_faults: Sequence[str] = (), token_field: Optional[str] = None):
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
        self.batch_polls = batch_polls  # status polls before a batch completes
        # Served to the next batch creations, in order: "500" (refused, nothing made) or
        # "drop_after" (the batch is made, the connection then dropped without an answer).
        self.batch_create_faults = list(batch_create_faults)
        if token_field not in (None, *TOKEN_FIELDS):
            raise ValueError(f"token_field {token_field!r}: one of {TOKEN_FIELDS} or None")
        self.token_field = token_field
        self.counters = Counters()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._admit: Optional[int] = None  # chat answers still let through; None = all
        self._released = threading.Event()
        self._generation = 0  # releases so far: a request older than the last one is dropped
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

    def hold_after(self, answers: int) -> None:
        """Let `answers` more chat answers through; hold every later request until release()."""
        with self._lock:
            self._admit = answers
            self._released.clear()

    def release(self) -> None:
        """Drop every request that arrived before now unanswered; let later ones through."""
        with self._lock:
            self._admit = None
            self._generation += 1
        self._released.set()

    @property
    def held(self) -> bool:
        """Whether requests are being held now (the allowance is spent)."""
        with self._lock:
            return self._admit == 0

    def _admitted(self, generation: int) -> bool:
        with self._lock:
            if generation != self._generation:
                return False  # arrived before a release: dropped
            if self._admit is None:
                return True
            if self._admit > 0:
                self._admit -= 1
                return True
        self._released.wait()
        return False

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids):06d}"

    def completion(self, payload: dict, prompt: str, images: list[str]) -> dict:
        """A chat completion for a request body, counted as answered."""
        messages = payload["messages"]
        fp = fingerprint(messages)
        with self._lock:
            call = self.counters.answered[fp]
        text = self.answer(prompt, call)
        usage = {"prompt_tokens": len(prompt.split()) + IMAGE_TOKENS * len(images),
                 "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._record_answer(fp, prompt, usage)
        return {"id": f"chatcmpl-{fp}-{call}", "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model or payload.get("model", "loopback"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage}

    def _run_batch(self, batch: dict) -> None:
        """Answer every line of a batch's input into its output and error files."""
        out, err = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            payload = item["body"]
            prompt, images = _prompt_and_images(payload["messages"])
            with self._lock:
                self.counters.batch_lines += 1
                self.counters.seen.append(_seen(payload, images))
            request_id = self._new_id("req")
            if any(s in prompt for s in self.fail_prompts):
                err.append({"id": self._new_id("batch_req"), "custom_id": item["custom_id"],
                            "response": {"status_code": 500, "request_id": request_id,
                                         "body": {"error": {"message": "internal error",
                                                            "type": "server"}}},
                            "error": None})
                continue
            out.append({"id": self._new_id("batch_req"), "custom_id": item["custom_id"],
                        "response": {"status_code": 200, "request_id": request_id,
                                     "body": self.completion(payload, prompt, images)},
                        "error": None})
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                file_id = self._new_id("file")
                self.files[file_id] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                batch[name] = file_id
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out),
                                   "failed": len(err)}

    def _poll(self, batch: dict) -> dict:
        """One status poll: the batch moves on one step, completing at the last."""
        with self._lock:
            self.counters.batch_polls += 1
            batch["_polls"] += 1
            polls, status = batch["_polls"], batch["status"]
        if status in ("validating", "in_progress", "finalizing"):
            if polls >= self.batch_polls:
                self._run_batch(batch)
                batch["status"], batch["completed_at"] = "completed", int(time.time())
            elif polls >= 1:
                batch["status"] = "in_progress" if polls < self.batch_polls - 1 else "finalizing"
        return _public(batch)

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
            self.counters.arrivals.append((time.monotonic(), fault, prompt))
            return fault

    def _entered(self) -> None:
        with self._lock:
            self.counters.in_flight += 1
            self.counters.max_in_flight = max(self.counters.max_in_flight,
                                              self.counters.in_flight)

    def _left(self) -> None:
        with self._lock:
            self.counters.in_flight -= 1

    def _refused_field(self, payload: dict) -> Optional[str]:
        """The token-limit field this server refuses that the request sends, if any."""
        if self.token_field is None:
            return None
        other = next(f for f in TOKEN_FIELDS if f != self.token_field)
        return other if other in payload else None

    def _record_answer(self, fp: str, prompt: str, usage: dict) -> int:
        """Count an answer about to be sent; returns how many this print had before."""
        with self._lock:
            before = self.counters.answered[fp]
            self.counters.answered[fp] += 1
            self.counters.answered_prompts[prompt] += 1
            self.counters.prompt_tokens += usage["prompt_tokens"]
            self.counters.completion_tokens += usage["completion_tokens"]
            return before


def _seen(payload: dict, images: list[str]) -> dict:
    fmt = payload.get("response_format")
    return ({k: payload.get(k) for k in ("model", "temperature", "max_tokens",
                                         "max_completion_tokens", "seed")}
            | {"images": images,
               "response_format": fmt and fmt.get("json_schema", {}).get("name", fmt["type"])})


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class _Server(ThreadingHTTPServer):
    # A backlog for every client connection at once (the default 5 drops connects, which the
    # client would see as timeouts that the server never counted).
    request_queue_size = 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body would wait for
    # the client's delayed ACK (~40 ms a response), a latency no real server adds.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass  # quiet: tests read counters, not logs

    def _authorized(self) -> bool:
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        if owner.api_key is not None and \
                self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            self._json(401, {"error": {"message": "invalid api key", "type": "auth"}})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        m = re.fullmatch(r"/v1/files/([\w-]+)/content", path)
        if m and m.group(1) in owner.files:
            return self._send(200, owner.files[m.group(1)],
                              {"Content-Type": "application/octet-stream"})
        m = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if m and m.group(1) in owner.batches:
            return self._json(200, owner._poll(owner.batches[m.group(1)]))
        if path == "/v1/batches":
            data = [_public(b) for b in reversed(list(owner.batches.values()))]
            return self._json(200, {"object": "list", "data": data, "has_more": False,
                                    "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None})
        return self._json(404, {"error": {"message": "not found", "type": "invalid_request"}})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        generation = owner._generation
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.rstrip("/")
        if path in ("/v1/files", "/v1/batches"):
            if not self._authorized():
                return
            return self._upload(body) if path == "/v1/files" else self._create_batch(body)
        if path not in ("/v1/chat/completions", "/chat/completions"):
            return self._json(404, {"error": {"message": "not found", "type": "invalid_request"}})
        if not self._authorized():
            return
        try:
            payload = json.loads(body)
            messages = payload["messages"]
        except (ValueError, KeyError):
            return self._json(400, {"error": {"message": "bad request body", "type": "invalid"}})
        owner._entered()
        try:
            self._chat(owner, payload, messages, generation)
        finally:
            owner._left()

    def _chat(self, owner: "LoopbackOpenAI", payload: dict, messages: list,
              generation: int) -> None:
        prompt, images = _prompt_and_images(messages)
        with owner._lock:
            owner.counters.seen.append(_seen(payload, images))
        refused = owner._refused_field(payload)
        if refused:
            return self._json(400, {"error": {
                "message": f"Unsupported parameter: '{refused}' is not supported with this "
                           f"model. Use '{owner.token_field}' instead.",
                "type": "invalid_request_error", "param": refused,
                "code": "unsupported_parameter"}})
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
        if not owner._admitted(generation):
            return self._drop()
        return self._json(200, owner.completion(payload, prompt, images))

    def _upload(self, body: bytes) -> None:
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        fields, content, filename = {}, None, "upload.jsonl"
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                content = part.get_payload(decode=True)
                filename = part.get_filename() or filename
            elif name:
                fields[name] = part.get_payload(decode=True).decode()
        if content is None or fields.get("purpose") != "batch":
            return self._json(400, {"error": {"message": "expected a file with purpose batch",
                                              "type": "invalid_request"}})
        file_id = owner._new_id("file")
        with owner._lock:
            owner.files[file_id] = content
            owner.counters.files_uploaded += 1
        return self._json(200, {"id": file_id, "object": "file", "bytes": len(content),
                                "created_at": int(time.time()), "filename": filename,
                                "purpose": "batch", "status": "processed"})

    def _create_batch(self, body: bytes) -> None:
        owner: LoopbackOpenAI = self.server.owner  # type: ignore[attr-defined]
        payload = json.loads(body)
        if payload.get("input_file_id") not in owner.files or \
                payload.get("endpoint") != "/v1/chat/completions" or \
                payload.get("completion_window") != "24h":
            return self._json(400, {"error": {"message": "bad batch", "type": "invalid_request"}})
        batch = {"id": owner._new_id("batch"), "object": "batch",
                 "endpoint": payload["endpoint"], "input_file_id": payload["input_file_id"],
                 "completion_window": "24h", "status": "validating",
                 "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
                 "metadata": payload.get("metadata"), "_polls": 0}
        with owner._lock:
            fault = owner.batch_create_faults.pop(0) if owner.batch_create_faults else None
            if fault:
                owner.counters.faults[f"batch_create_{fault}"] += 1
            if fault != "500":
                owner.batches[batch["id"]] = batch
                owner.counters.batches_created += 1
        if fault == "500":
            return self._json(500, {"error": {"message": "internal error", "type": "server"}})
        if fault == "drop_after":
            return self._drop()
        return self._json(200, _public(batch))

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
