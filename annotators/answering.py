"""The answer loop of every model backend, in one place: the response cache, output cleaning and
re-asks around a transport that only asks.

For the requests of one `annotate` call (a shard):

1. Each request's content key (`ModelBackend.request_key`); the same question asked twice is
   asked once, and its other askers get the answer as if from the cache (`answer_for`).
2. Cache hits: a stored answer's raw text is cleaned again (so a cleaning fix applies without
   paying again) and, if it still passes, is the response (cached=True, with the usage and cost
   of the original call). A hit that no longer passes is stale: asked again, then replaced.
3. Rounds: the transport asks every pending question (`Ask`: key, request, ask number) and
   delivers each raw `Answer` as it arrives, for instance a chat completion, a Batch API output
   line, or a generated text. The loop scrubs it of secrets (`redact`), drops a sentence cut
   by the token limit (`without_cut_sentence`), cleans it per request kind (`clean_answer`)
   and stores an accepted answer in the cache at once (a killed run loses no paid answer).
   A refused answer is asked again in the next round, at most `clean_retries` times (ask
   number k: seed + k and at least `clean_retry_temperature`, or the same answer would come
   back). A batched-marks answer that leaves some marks undescribed is kept if no fuller
   one comes. A failed ask (the transport's retries spent, a missing image, an empty Batch
   answer) ends the request as failed unless the transport marks it `reask`.
4. One response per request, in request order. Failures carry the reason (scrubbed, at most
   ERROR_CHARS characters) and whatever their asks cost.

`BackendStats` is the one report type of every model backend (the annotate stage writes its
`as_dict` under `backend_stats`).
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, Optional, Protocol, Sequence

from annotators.base import AnnotationContext, Backend
from annotators.cache import ResponseCache
from annotators.cleaning import Cleaned, CleaningLimits, clean_output, drop_unfinished_sentence
from pipeline.core.errors import BadImageError, scrub
from pipeline.core.params import BackendParams
from schemas import Request, Response, Usage

ERROR_CHARS = 200  # longest error text kept in a Response
# Kinds whose answer is judged whole, never cut to its last full sentence: the JSON list of a
# batched-marks answer, the LLM composer's paragraph.
WHOLE_ANSWERS = ("instance_batch", "compose")
# Fix code of a batched-marks answer that describes only some of the marks (re-asked while
# re-asks are left, then accepted as it is).
MARKS_MISSING = "marks_missing"
_FENCED = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.S)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


# ---------------------------------------------------------------------------------------------
# Cleaning an answer by request kind


def redact(text: str) -> str:
    """`text` without registered secrets (API keys, whole or by an 8+ character prefix) or any
    URL's credentials: what answers and error texts pass through before they are kept."""
    return scrub(_URL_USERINFO.sub("", text)) if text else text


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


def marks_count(cleaned: Cleaned) -> int:
    """Marks described by an accepted batched-marks answer."""
    return len(json.loads(cleaned.text)) if cleaned.text else 0


def without_cut_sentence(raw: str, request: Request, finish_reason: Optional[str]) -> str:
    """The model's text, less its last sentence when the token limit cut it off (prose kinds
    only; WHOLE_ANSWERS are judged whole). This is what is cleaned and cached."""
    if finish_reason == "length" and request.kind not in WHOLE_ANSWERS:
        return drop_unfinished_sentence(raw)
    return raw


def clean_answer(raw: str, request: Request, limits: CleaningLimits) -> Cleaned:
    """The one cleaning entry of every model backend, per request kind: the paper's passes
    through `annotators.cleaning`, a batched-marks answer as its JSON list, the LLM composer's
    paragraph as written (`pipeline.stages.compose.llm` validates it)."""
    if request.kind == "instance_batch":
        return clean_marks_answer(raw, request, limits)
    if request.kind == "compose":
        text = _unfenced(raw) if isinstance(raw, str) else ""
        return Cleaned(text, "ok") if text else Cleaned(None, "empty")
    return clean_output(raw, request, limits)


def answer_for(request: Request, answer: Response) -> Response:
    """`answer` as the response to `request`: the same question asked twice in one run is sent
    once, and its other askers get the answer as if from the cache."""
    if answer.request_id == request.request_id:
        return answer
    return answer.model_copy(update={
        "request_id": request.request_id, "tile_id": request.tile_id, "kind": request.kind,
        "prompt_version": request.prompt_version, "cached": answer.status == "ok"})


def image_error(exc: KeyError | BadImageError) -> str:
    """The failure of a request whose image is missing from the context or unreadable."""
    return f"image: {exc.message if isinstance(exc, BadImageError) else exc.args[0]}"


# ---------------------------------------------------------------------------------------------
# What a transport asks and answers


@dataclass(frozen=True)
class Ask:
    """One question for the transport: the request, its content key, and its ask number (0:
    the first; k > 0: the k-th re-ask after cleaning refused an answer)."""

    key: str
    request: Request
    number: int = 0


@dataclass(frozen=True)
class Answer:
    """A transport's raw answer to one ask: the model's text (None when the ask failed, with
    `error`), why generation stopped, what it cost, how many calls it took and how long.
    `reask`: a failed ask worth asking again as a re-ask (a Batch API line without an
    answer)."""

    number: int
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    attempts: int = 1
    latency_s: float = 0.0
    served_model: str = ""
    error: Optional[str] = None
    reask: bool = False


Deliver = Callable[[str, Answer], None]


class Transport(Protocol):
    """How a backend asks its model: every ask of one round, each answer delivered (key,
    Answer) as soon as it is there. It may deliver answers to keys it was not asked this
    round (a Batch API job of an earlier run): those of pending requests count, others are
    stored in the cache as they are."""

    def ask(self, asks: Sequence[Ask], deliver: Deliver) -> None: ...


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class BackendStats:
    """What a model backend did, for the stage's report (`as_dict`, under backend_stats):
    answers from the cache, accepted and failed, cleaning outcomes, retries by cause, and the
    counters of its transport. `reported` names the report's keys, in order: each backend
    reports the counters its transport has (an API backend its HTTP attempts, Batch API calls
    and endpoint; a local model its prompts, image prefixes and forward batches)."""

    reported: tuple[str, ...]
    # API: HTTP attempts, Batch API input files, batches created, resumed and polled
    http_attempts: int = 0
    batch_files: int = 0
    batches_created: int = 0
    batches_resumed: int = 0
    batch_polls: int = 0
    # local model: prompts generated, image prefixes computed, forward batches run
    prompts: int = 0
    image_prefixes: int = 0
    forward_batches: int = 0
    # every backend
    cache_hits: int = 0
    answered: int = 0
    failed: int = 0
    retries: Counter = field(default_factory=Counter)
    cleaning_refusals: Counter = field(default_factory=Counter)
    cleaning_fixes: Counter = field(default_factory=Counter)
    unpriced_models: set = field(default_factory=set)
    # the server asked: {"url": scheme://host[:port]/path, "source": where it was set}
    endpoint: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out: dict = {}
        for key in self.reported:
            value = getattr(self, key)
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[key] = value
        return out


# ---------------------------------------------------------------------------------------------
# The backend and its loop


class ModelBackend(Backend):
    """A backend whose answers come from a model through a transport (see the module
    docstring): the cache, cleaning and re-asks are here; a subclass gives its `request_key`
    (the cache key: everything that shapes an answer) and its `transport`."""

    uses_cache = True
    # keys of BackendStats this backend reports
    reported_stats: ClassVar[tuple[str, ...]]

    def __init__(self, params: BackendParams, cache: Optional[ResponseCache] = None):
        self.params = params
        self.cache = cache
        self.limits = CleaningLimits.from_params(params)
        self.stats = BackendStats(self.reported_stats)

    @abstractmethod
    def request_key(self, request: Request) -> str: ...

    @abstractmethod
    def transport(self, context: AnnotationContext) -> ContextManager[Transport]:
        """The transport of one `annotate` call, open while the call lasts."""

    def annotate(self, requests: Sequence[Request], context: AnnotationContext) -> list[Response]:
        """One response per request, in request order."""
        if not requests:
            return []
        return _Answering(self, list(requests)).run(context)


@dataclass
class _Progress:
    """What one question has cost so far, and how it stands."""

    usage: Usage = Usage()
    cost: float = 0.0
    attempts: int = 0
    latency_s: float = 0.0
    error: Optional[str] = None
    refusals: list[str] = field(default_factory=list)
    partial: Optional[tuple[Cleaned, str, str]] = None  # fullest batched-marks answer so far


class _Answering:
    """One `annotate` call of a ModelBackend (see the module docstring)."""

    def __init__(self, backend: ModelBackend, requests: list[Request]):
        self.backend, self.requests = backend, requests
        self.stats: BackendStats = backend.stats  # type: ignore[assignment]
        self.cache = backend.cache
        self.keys = [backend.request_key(r) for r in requests]
        self.asked: dict[str, Request] = {}  # key -> the first request asking it
        for key, request in zip(self.keys, requests):
            self.asked.setdefault(key, request)
        self.done: dict[str, Response] = {}
        self.stale: set[str] = set()
        self.progress: dict[str, _Progress] = {}
        self.next: dict[str, int] = {}  # key -> ask number in the next round
        self.delivered: set[str] = set()

    def run(self, context: AnnotationContext) -> list[Response]:
        self._from_cache()
        asks = [Ask(key, request) for key, request in self.asked.items() if key not in self.done]
        if asks:
            self.progress = {ask.key: _Progress() for ask in asks}
            with self.backend.transport(context) as transport:
                while asks:
                    self.next, self.delivered = {}, set()
                    transport.ask(asks, self.deliver)
                    for ask in asks:
                        if ask.key not in self.delivered and ask.key not in self.done:
                            self._finish(ask.key, "the backend returned no answer")
                    asks = [Ask(key, self.asked[key], number)
                            for key, number in self.next.items() if key not in self.done]
        return [answer_for(request, self.done[key])
                for request, key in zip(self.requests, self.keys)]

    def _response(self, request: Request, **fields: object) -> Response:
        return Response(request_id=request.request_id, tile_id=request.tile_id,
                        kind=request.kind, backend=self.backend.name, model=self.backend.model,
                        prompt_version=request.prompt_version, **fields)

    def _from_cache(self) -> None:
        """Answers already stored (one lookup for the shard), cleaned again."""
        if self.cache is None:
            return
        hits = self.cache.get_many(list(self.asked))
        for key, request in self.asked.items():
            hit = hits.get(key)
            if hit is None:
                continue
            cleaned = clean_answer(redact(hit.raw_text), request, self.backend.limits)
            if cleaned.ok:
                self.stats.cache_hits += 1
                self.done[key] = self._response(
                    request, status="ok", text=cleaned.text, usage=hit.usage,
                    cost_usd=hit.cost_usd, latency_s=hit.latency_s, attempts=hit.attempts,
                    cached=True)
            else:
                self.stale.add(key)  # stored before a cleaning rule that now refuses it

    def deliver(self, key: str, answer: Answer) -> None:
        """Take one answer of the transport (see the module docstring)."""
        self.delivered.add(key)
        p = self.progress.get(key)
        if p is None or key in self.done:
            self._keep_unasked(key, answer)
            return
        request = self.asked[key]
        p.usage = Usage(prompt_tokens=p.usage.prompt_tokens + answer.usage.prompt_tokens,
                        completion_tokens=p.usage.completion_tokens
                        + answer.usage.completion_tokens)
        p.cost += answer.cost_usd
        p.attempts += answer.attempts
        p.latency_s += answer.latency_s
        last = answer.number >= self.backend.params.clean_retries
        if answer.text is None:  # the ask failed
            p.error = answer.error or "no answer"
            if answer.reask and not last:
                self.next[key] = answer.number + 1
            else:
                self._finish(key)
            return
        # scrubbed first: a key in an answer is never cleaned, cached or recorded
        raw = redact(without_cut_sentence(answer.text, request, answer.finish_reason))
        cleaned = clean_answer(raw, request, self.backend.limits)
        self.stats.cleaning_fixes.update(cleaned.fixes)
        p.error = None
        if cleaned.ok and MARKS_MISSING not in cleaned.fixes:
            self._accept(key, cleaned, raw, answer.served_model)
            return
        if cleaned.ok:  # some marks undescribed: keep the fullest answer, ask again if allowed
            if p.partial is None or marks_count(cleaned) > marks_count(p.partial[0]):
                p.partial = (cleaned, raw, answer.served_model)
            reason = MARKS_MISSING
        else:
            reason = cleaned.reason
        self.stats.cleaning_refusals[reason] += 1
        p.refusals.append(reason)
        if last:
            self._finish(key)
        else:
            self.next[key] = answer.number + 1

    def _accept(self, key: str, cleaned: Cleaned, raw: str, served_model: str) -> None:
        """The ok response of a question, stored in the cache at once."""
        p = self.progress[key]
        response = self._response(self.asked[key], status="ok", text=cleaned.text,
                                  usage=p.usage, cost_usd=p.cost, latency_s=p.latency_s,
                                  attempts=p.attempts)
        if self.cache is not None:
            self.cache.put(key, response, raw_text=raw, served_model=served_model,
                           replace=key in self.stale)
        self.stats.answered += 1
        self.done[key] = response

    def _finish(self, key: str, error: Optional[str] = None) -> None:
        """No more asks: the fullest batched-marks answer if there is one, else failed."""
        p = self.progress[key]
        if p.partial is not None:
            self._accept(key, *p.partial)
            return
        reason = error or p.error or (f"output cleaning refused {len(p.refusals)} answers: "
                                      f"{', '.join(p.refusals)}")
        self.stats.failed += 1
        self.done[key] = self._response(
            self.asked[key], status="failed", error=redact(reason)[:ERROR_CHARS],
            usage=p.usage, cost_usd=p.cost, latency_s=p.latency_s, attempts=p.attempts)

    def _keep_unasked(self, key: str, answer: Answer) -> None:
        """An answer to a question no request of this call asks (a Batch API job of an
        earlier run answers it): stored raw, cleaned when a run asks it."""
        if self.cache is None or not isinstance(answer.text, str) or not answer.text.strip():
            return
        raw = redact(answer.text)
        self.cache.put(key, Response(
            request_id=key, tile_id="", kind="holistic", status="ok", text=raw,
            backend=self.backend.name, model=self.backend.model, prompt_version="",
            usage=answer.usage, cost_usd=answer.cost_usd, latency_s=answer.latency_s,
            attempts=answer.attempts), raw_text=raw, served_model=answer.served_model)
