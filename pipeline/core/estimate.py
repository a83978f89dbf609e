"""Know the bill before paying it: the calls, tokens and cost of annotating a plan, before any
paid call (`geopixeld estimate`, and the `estimate` block of the plan stage's report.json).

Pure functions, and one reader (`read_plan`):

- image tokens by the model's own rule (`image_rule`). OpenAI's documented rules (platform
  docs, "Images and vision", "Calculating costs"): GPT-4o-class models count detail "low" as
  85 tokens; "high" scales the image to fit 2048x2048, then its shortest side to 768 px, and
  counts 170 tokens per 512-px tile plus 85 (a 1024x1024 image: 765; 2048x4096: 1105).
  gpt-4o-mini bills the same tiles at 2833 + 5667 per tile. gpt-4.1-mini/-nano count 32-px
  patches (at most 1536) times 1.62 / 2.46. "auto" lets the model choose: counted as "high"
  (the upper bound). Qwen2.5-VL: `smart_resize` to multiples of 28 within min/max pixels,
  14-px patches merged 2x2, so one token per 28x28 area. Another model is counted with
  GPT-4o's rule and flagged as assumed.
- text tokens (`text_counter`): tiktoken (optional, `[tokens]` extra) for OpenAI models when
  it can load its encoding, else about 4 characters a token; the method is stated.
- one call (`call_tokens`): input = prompt + chat overhead + image; output at most
  max_tokens (`max_tokens_by_kind`), and an expected figure from the pass's typical answer
  length (`TYPICAL_ANSWER_TOKENS`), said so in the result.
- totals (`estimate`): calls per pass and per tile, tokens, and the cost in sync and in Batch
  mode, for the planned tiles or scaled to N tiles of a dataset that is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import prompts
from pipeline.core.params import BackendParams, Params
from pipeline.core.requests import questions
from schemas import Request

__all__ = ["Call", "ImageRule", "Planned", "Price", "TextCounter", "call_tokens", "estimate",
           "format_estimate", "image_rule", "openai_patch_tokens", "openai_tile_tokens",
           "qwen_image_tokens", "read_plan", "resolve_price", "smart_resize", "text_counter"]

# ---- prices -----------------------------------------------------------------------------------

# Published list prices (USD per million tokens, standard tier, openai.com/api/pricing), used
# only for a model that the params' annotate.backend.openai.prices does not list, and then
# named as such in the estimate. Check them: prices change.
LIST_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
LIST_PRICES_AS_OF = "2025-06"
# backends that answer a batched-marks request (every mark of a patch) in one call: mirrors
# `answers_instance_batch` of the annotators (a test checks they agree)
ANSWERS_INSTANCE_BATCH = {"openai": True, "transformers": False, "template": False}
# backends whose calls cost nothing per token
FREE_BACKENDS = {"template": "offline: no model calls",
                 "transformers": "local model: no per-token price (GPU time instead)"}


@dataclass(frozen=True)
class Price:
    """USD per million input / output tokens, and where the figure came from."""

    input_per_mtok: float
    output_per_mtok: float
    source: str

    def usd(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


def resolve_price(backend: BackendParams, given: Optional[tuple[float, float]] = None
                  ) -> Optional[Price]:
    """The price of a backend's model: `given` (the command line's --price-input/--price-output),
    else params annotate.backend.openai.prices, else a published list price (`LIST_PRICES`);
    0 for a free backend (template, a local model); None when nothing is known."""
    if given is not None:
        return Price(given[0], given[1], "--price-input/--price-output")
    if backend.name in FREE_BACKENDS:
        return Price(0.0, 0.0, f"{backend.name}: {FREE_BACKENDS[backend.name]}")
    listed = backend.openai.prices.get(backend.model)
    if listed is not None:
        return Price(listed.input_per_mtok, listed.output_per_mtok,
                     "params annotate.backend.openai.prices")
    if backend.model in LIST_PRICES:
        pin, pout = LIST_PRICES[backend.model]
        return Price(pin, pout, f"published list price as of {LIST_PRICES_AS_OF} (not in your "
                     "params: check openai.com/api/pricing)")
    return None


# ---- image tokens -----------------------------------------------------------------------------

def openai_tile_tokens(width: int, height: int, detail: str = "high", base: int = 85,
                       per_tile: int = 170) -> int:
    """OpenAI's tile rule (GPT-4o class): `base` for detail low; else scale to fit 2048x2048,
    then the shortest side to 768 (never up), and `base` + `per_tile` per 512-px tile."""
    if width <= 0 or height <= 0:
        return 0
    if detail == "low":
        return base
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return base + per_tile * _ceil(w / 512) * _ceil(h / 512)


def openai_patch_tokens(width: int, height: int, multiplier: float = 1.0, patch: int = 32,
                        cap: int = 1536) -> int:
    """OpenAI's patch rule (gpt-4.1-mini, gpt-4.1-nano): the 32-px patches that cover the
    image; above `cap` the image is scaled down to fit `cap` patches (whole patches across
    its width or height); tokens = patches x the model's multiplier."""
    if width <= 0 or height <= 0:
        return 0
    patches = _ceil(width / patch) * _ceil(height / patch)
    if patches > cap:
        r = math.sqrt(patch * patch * cap / (width * height))
        w, h = width * r, height * r
        r *= min(math.floor(w / patch) / (w / patch), math.floor(h / patch) / (h / patch))
        patches = min(cap, _ceil(width * r / patch) * _ceil(height * r / patch))
    return _ceil(patches * multiplier)


# Qwen2.5-VL's image processor (preprocessor_config.json of Qwen/Qwen2.5-VL-*-Instruct)
QWEN_FACTOR = 28  # 14-px patches merged 2x2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 12_845_056  # 16384 * 28 * 28


def smart_resize(height: int, width: int, factor: int = QWEN_FACTOR,
                 min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
                 ) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL's resize: both sides multiples of `factor`, the pixel count
    within [min_pixels, max_pixels], the aspect ratio kept as closely as possible (as
    transformers' Qwen2VLImageProcessor, which refuses an aspect ratio above 200)."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image_tokens(width: int, height: int, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS) -> int:
    """Qwen2.5-VL image tokens: one per 28x28 area of the smart-resized image (the
    <|vision_start|>/<|vision_end|> markers are counted with the chat overhead)."""
    if width <= 0 or height <= 0:
        return 0
    h, w = smart_resize(height, width, QWEN_FACTOR, min_pixels, max_pixels)
    return (h // QWEN_FACTOR) * (w // QWEN_FACTOR)


@dataclass(frozen=True)
class ImageRule:
    """How a model family counts an image: `tokens(width, height, detail)`."""

    family: str       # "openai" or "qwen" (chat overhead and text tokenizer follow it)
    description: str
    tokens: Callable[[int, int, str], int]
    assumed: bool = False  # the model's family is not known: a stand-in rule


def _tiles(base: int, per_tile: int) -> Callable[[int, int, str], int]:
    return lambda w, h, detail: openai_tile_tokens(w, h, detail, base, per_tile)


def image_rule(model: str, backend: str = "openai", max_pixels: Optional[int] = None
               ) -> ImageRule:
    """The image-token rule of a model, by its name (a hub id's last part counts)."""
    name = model.lower().rsplit("/", 1)[-1]
    auto = "detail auto counted as high"
    if "qwen" in name and "vl" in name or backend == "transformers":
        most = max_pixels or QWEN_MAX_PIXELS
        return ImageRule("qwen", f"Qwen2.5-VL: smart_resize to multiples of 28 within "
                         f"{QWEN_MIN_PIXELS}..{most} pixels, one token per 28x28 area",
                         lambda w, h, _d: qwen_image_tokens(w, h, QWEN_MIN_PIXELS, most),
                         assumed="qwen" not in name)
    if name.startswith("gpt-4o-mini"):
        return ImageRule("openai", "OpenAI tile rule, gpt-4o-mini figures: 2833 + 5667 per "
                         f"512-px tile, low 2833 ({auto})", _tiles(2833, 5667))
    for prefix, multiplier in (("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46)):
        if name.startswith(prefix):
            return ImageRule("openai", f"OpenAI patch rule: 32-px patches (at most 1536) x "
                             f"{multiplier}", lambda w, h, _d, m=multiplier:
                             openai_patch_tokens(w, h, m))
    rule = f"OpenAI tile rule (GPT-4o class): 85 + 170 per 512-px tile, low 85 ({auto})"
    if name.startswith(("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4-turbo", "gpt-4.5")):
        return ImageRule("openai", rule, _tiles(85, 170))
    return ImageRule("openai", f"unknown model family, counted with the {rule}",
                     _tiles(85, 170), assumed=True)


def _ceil(x: float) -> int:
    """ceil, forgiving float noise (33.0000000001 -> 33)."""
    return math.ceil(round(x, 6))


# ---- text tokens ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextCounter:
    method: str
    encode: Optional[Callable[[str], list]] = None

    def count(self, text: str) -> int:
        if self.encode is not None:
            return len(self.encode(text))
        return _ceil(len(text) / CHARS_PER_TOKEN)


CHARS_PER_TOKEN = 4


def text_counter(model: str, family: str) -> TextCounter:
    """tiktoken's encoding of an OpenAI model when tiktoken is installed and can load it,
    else about 4 characters a token (other families: their tokenizers are not tiktoken's)."""
    fallback = f"~{CHARS_PER_TOKEN} characters per token"
    if family != "openai":
        return TextCounter(f"{fallback} ({family} tokenizer not loaded)")
    try:
        import tiktoken
    except ImportError:
        return TextCounter(f"{fallback} (tiktoken not installed: the [tokens] extra)")
    try:
        try:
            enc = tiktoken.encoding_for_model(model)
        except KeyError:
            enc = tiktoken.get_encoding("o200k_base")
        enc.encode("warm")
    except Exception as exc:  # its encoding is downloaded once: offline, it cannot load
        return TextCounter(f"{fallback} (tiktoken could not load its encoding: "
                           f"{type(exc).__name__})")
    return TextCounter(f"tiktoken {enc.name}", enc.encode)


# Chat-format tokens around one user message and the answer's start: OpenAI, 3 per message
# + 3 priming the reply (OpenAI cookbook, "How to count tokens with tiktoken"); Qwen2.5-VL's
# template, its default system turn, user and assistant headers and the 2 vision markers.
CHAT_OVERHEAD = {"openai": 6, "qwen": 22}

# ---- answers ----------------------------------------------------------------------------------

# The expected answer length of each pass when nothing was measured: the prompts ask four
# short sentences (holistic) and one (instance, cluster); a short sentence of ~20 words is
# ~25-30 tokens. GeoPixelD's published captions average 740 characters (~185 tokens) for a
# holistic part and ~3.2 phrases. A batched-marks answer is a JSON list: per mark, the
# sentence and ~10 tokens of JSON, plus ~8 for the list.
TYPICAL_ANSWER_TOKENS = {"holistic": 100, "instance": 30, "cluster": 30}
BATCH_TOKENS_PER_MARK = 10
BATCH_TOKENS_BASE = 8
COMPOSE_TOKENS_PER_PHRASE_LINE = 10  # "[i] name (where): " around each answer in its prompt
EXPECTED_BASIS = ("typical answer length: holistic ~100 tokens (four short sentences), "
                  "instance and cluster ~30 (one short sentence), a batched-marks answer "
                  "~40 per mark; each at most its max_tokens")


# ---- calls ------------------------------------------------------------------------------------

def pass_of(kind: str) -> str:
    """The pass (requests/<pass>/ folder, report key) of a request kind."""
    return "instance" if kind == "instance_batch" else kind


@dataclass(frozen=True)
class Call:
    """One model call as planned: its pass and kind, prompt, image size ((0, 0) for text
    only) and the marks it asks (a batched-marks call; 1 otherwise). A compose call's prompt
    is its template: `marks` counts the phrases whose answers fill it."""

    pass_name: str
    kind: str
    prompt: str
    width: int = 0
    height: int = 0
    marks: int = 1


@dataclass(frozen=True)
class Planned:
    """What a plan asks: its requests, each tile's image size, the tiles with objects."""

    requests: list[Request]
    sizes: dict[str, tuple[int, int]]
    with_objects: frozenset[str] = frozenset()


def calls_of(requests: Sequence[Request], sizes: Mapping[str, tuple[int, int]],
             batches: bool) -> list[Call]:
    """The calls a backend makes for `requests`: with `batches` (it answers a batched-marks
    request), the batches instead of the per-mark requests they bundle; else every request
    but the batches (`pipeline.core.requests.questions`)."""
    calls = []
    for r in questions(list(requests), batches=batches):
        w, h = sizes.get(r.tile_id, (0, 0)) if r.image_sha256 else (0, 0)
        marks = len(r.bundles or r.object_ids) if r.kind == "instance_batch" else 1
        calls.append(Call(pass_of(r.kind), r.kind, r.prompt, w, h, max(marks, 1)))
    return calls


def compose_calls(requests: Sequence[Request], sizes: Mapping[str, tuple[int, int]],
                  template: str, with_image: bool) -> list[Call]:
    """The llm composer's calls: one per tile with phrases (instance marks and clusters)."""
    phrases: dict[str, int] = {}
    for r in requests:
        if r.kind in ("instance", "cluster"):
            phrases[r.tile_id] = phrases.get(r.tile_id, 0) + 1
    calls = []
    for tile_id, n in phrases.items():
        w, h = sizes.get(tile_id, (0, 0)) if with_image else (0, 0)
        calls.append(Call("compose", "compose", template, w, h, n))
    return calls


@dataclass(frozen=True)
class Setup:
    """What counting one backend's calls needs."""

    backend: BackendParams
    rule: ImageRule
    counter: TextCounter
    detail: str
    batches: bool
    price: Optional[Price]
    batch_discount: Optional[float]  # None: this backend has no Batch API

    @classmethod
    def of(cls, backend: BackendParams, given_price: Optional[tuple[float, float]] = None
           ) -> "Setup":
        model = backend.model
        if backend.name == "transformers" and backend.transformers.model_path:
            model = backend.transformers.model_path
        rule = image_rule(model, backend.name, backend.transformers.max_pixels)
        return cls(backend, rule, text_counter(backend.model, rule.family),
                   backend.openai.image_detail if backend.name == "openai" else "high",
                   ANSWERS_INSTANCE_BATCH.get(backend.name, False),
                   resolve_price(backend, given_price),
                   backend.openai.batch.discount if backend.name == "openai" else None)


@dataclass
class CallTokens:
    text: int = 0
    image: int = 0
    output_max: int = 0
    output_expected: int = 0


def expected_answer(kind: str, marks: int = 1) -> int:
    """Typical answer tokens of one call (before the max_tokens bound)."""
    if kind == "instance_batch":
        return BATCH_TOKENS_BASE + marks * (TYPICAL_ANSWER_TOKENS["instance"]
                                            + BATCH_TOKENS_PER_MARK)
    if kind == "compose":  # the paragraph restates the scene and every phrase's facts
        return TYPICAL_ANSWER_TOKENS["holistic"] + marks * TYPICAL_ANSWER_TOKENS["instance"]
    return TYPICAL_ANSWER_TOKENS.get(kind, TYPICAL_ANSWER_TOKENS["instance"])


def call_tokens(call: Call, setup: Setup) -> CallTokens:
    """Input (text with chat overhead, image) and output (max, expected) tokens of a call."""
    text = setup.counter.count(call.prompt) + CHAT_OVERHEAD.get(setup.rule.family, 6)
    if call.kind == "compose":  # its prompt holds the other passes' answers
        text += expected_answer("holistic") + call.marks * (
            expected_answer("instance") + COMPOSE_TOKENS_PER_PHRASE_LINE)
    image = setup.rule.tokens(call.width, call.height, setup.detail) if call.width else 0
    most = setup.backend.max_tokens_for(call.kind)
    return CallTokens(text, image, most, min(most, expected_answer(call.kind, call.marks)))


# ---- totals -----------------------------------------------------------------------------------

@dataclass
class _Sum:
    calls: int = 0
    text: int = 0
    image: int = 0
    output_max: int = 0
    output_expected: int = 0
    sizes: dict = field(default_factory=dict)

    def add(self, call: Call, t: CallTokens) -> None:
        self.calls += 1
        self.text += t.text
        self.image += t.image
        self.output_max += t.output_max
        self.output_expected += t.output_expected
        if call.width:
            self.sizes[f"{call.width}x{call.height}"] = t.image


def _cost(price: Optional[Price], inputs: float, out_expected: float, out_max: float,
          discount: Optional[float]) -> Optional[dict]:
    if price is None:
        return None
    sync = {"expected": round(price.usd(inputs, out_expected), 6),
            "max": round(price.usd(inputs, out_max), 6)}
    cost: dict = {"sync": sync}
    if discount is not None:
        cost["batch"] = {k: round(v * discount, 6) for k, v in sync.items()}
    return cost


def estimate(params: Params, planned: Planned, *, scale_to: Optional[int] = None,
             tile_size: Optional[int] = None, price: Optional[tuple[float, float]] = None,
             source: Optional[str] = None) -> dict:
    """The bill of annotating `planned` with `params`' backend and model (and the llm
    composer's calls when compose.composer is llm): calls and tokens per pass and in total,
    per tile, and the cost in sync and Batch mode.

    `scale_to`: for a dataset of that many tiles that is not built, the per-tile mix of the
    planned tiles with objects (all of them if none has one), each image `tile_size` square
    (default: as planned), scaled. `price`: (input, output) USD per million tokens of the
    annotate model, over the params' prices. `source`: where the plan came from (printed)."""
    backend = params.annotate.backend
    setup = Setup.of(backend, price)
    requests, sizes = planned.requests, dict(planned.sizes)
    if scale_to is not None:
        keep = (planned.with_objects & set(sizes)) or frozenset(sizes)
        requests = [r for r in requests if r.tile_id in keep]
        sizes = {t: (tile_size, tile_size) if tile_size else s
                 for t, s in sizes.items() if t in keep}
    measured = len(sizes)
    tiles = scale_to if scale_to is not None else measured
    factor = tiles / measured if measured else 0.0

    groups: dict[str, tuple[Setup, list[Call]]] = {p: (setup, []) for p in
                                                   ("holistic", "instance", "cluster")}
    for call in calls_of(requests, sizes, setup.batches):
        groups.setdefault(call.pass_name, (setup, []))[1].append(call)
    compose = params.compose
    if compose.composer == "llm":
        other = compose.llm_backend
        compose_setup = setup if other is None else Setup.of(
            other, price if other.model == backend.model else None)
        template = prompts.render("compose", compose.llm_prompt_version, scene="", phrases="")
        groups["compose"] = (compose_setup, compose_calls(requests, sizes, template,
                                                          compose.llm_with_image))

    planned_requests: dict[str, int] = {}
    for r in requests:
        if r.kind != "instance_batch":
            planned_requests[pass_of(r.kind)] = planned_requests.get(pass_of(r.kind), 0) + 1
    block: dict = {
        "backend": backend.name,
        "model": backend.model,
        "mode": backend.openai.mode if backend.name == "openai" else None,
        "tiles": tiles,
        "planned_tiles": len(planned.sizes),
        **({"planned_from": source} if source else {}),
        "scaled": None if scale_to is None else {
            "to_tiles": scale_to, "tile_size": tile_size, "from_tiles": measured,
            "basis": f"per-tile request mix measured on the {measured} planned tiles"
                     + (" with objects" if planned.with_objects & set(planned.sizes) else "")},
        "instance_calls": "batched_marks" if any(
            c.kind == "instance_batch" for c in groups["instance"][1]) else "per_mark",
        "requests": {p: round(n * factor) for p, n in
                     {**{p: 0 for p in ("holistic", "instance", "cluster")},
                      **planned_requests}.items()},
    }
    passes, total = {}, _Sum()
    costs: list[Optional[dict]] = []
    notes = [f"re-asks of answers refused by output cleaning (up to "
             f"{backend.clean_retries} per request) are not counted",
             "answers already in the response cache are not subtracted: this is the bill of "
             "a first run"]
    for name, (s, calls) in groups.items():
        row, summed = _pass(s, calls, factor, tiles)
        passes[name] = row
        costs.append(row.get("cost_usd"))
        for key in ("calls", "text", "image", "output_max", "output_expected"):
            setattr(total, key, getattr(total, key) + getattr(summed, key))
        total.sizes.update(summed.sizes)
    block["passes"] = passes
    counted = any(s.backend.name != "template" for s, _ in groups.values())
    block["total"] = {"calls": total.calls,
                      "calls_per_tile": round(total.calls / tiles, 4) if tiles else 0.0}
    if counted:
        block["total"]["input_tokens"] = {"text": total.text, "image": total.image,
                                          "total": total.text + total.image}
        block["total"]["output_tokens"] = {"max": total.output_max,
                                           "expected": total.output_expected}
    block["total"]["cost_usd"] = _sum_costs(costs)
    if backend.name != "template":
        block["image_tokens"] = {"rule": setup.rule.description,
                                 "detail": setup.detail if backend.name == "openai" else None,
                                 "per_image": dict(sorted(total.sizes.items()))}
        if setup.rule.assumed:
            notes.append(f"image tokens: no known rule for model {backend.model!r}: "
                         "assumed (see image_tokens.rule)")
        block["text_tokens"] = setup.counter.method
        block["output_expected_basis"] = EXPECTED_BASIS
    block["price"] = None if setup.price is None else {
        "input_per_mtok": setup.price.input_per_mtok,
        "output_per_mtok": setup.price.output_per_mtok, "source": setup.price.source}
    if block["total"]["cost_usd"] is None:
        notes.append(f"no price for model {backend.model!r}: give --price-input and "
                     "--price-output (USD per million tokens) or add it to "
                     "annotate.backend.openai.prices")
    if not counted:
        notes = ["the template backend is offline: no model calls, it costs $0"]
    elif block["instance_calls"] == "batched_marks":
        notes.append("the JSON schema of batched-marks calls (response_format) adds input "
                     "tokens the estimate does not count")
    if "compose" in groups:
        notes.append("compose (llm composer): approximate, its prompt holds the other "
                     "passes' answers (their expected lengths)")
    block["notes"] = notes
    return block


def _pass(setup: Setup, calls: list[Call], factor: float, tiles: int) -> tuple[dict, _Sum]:
    """One pass's row (scaled by `factor`) and its scaled sums."""
    raw = _Sum()
    free = setup.backend.name == "template"
    for call in calls:
        raw.add(call, CallTokens() if free else call_tokens(call, setup))
    s = _Sum(round(raw.calls * factor), round(raw.text * factor), round(raw.image * factor),
             round(raw.output_max * factor), round(raw.output_expected * factor), raw.sizes)
    row: dict = {"model": setup.backend.model, "calls": s.calls,
                 "calls_per_tile": round(s.calls / tiles, 4) if tiles else 0.0}
    if not free:
        row["input_tokens"] = {"text": s.text, "image": s.image, "total": s.text + s.image}
        row["output_tokens"] = {"max": s.output_max, "expected": s.output_expected}
    row["cost_usd"] = _cost(setup.price, s.text + s.image, s.output_expected, s.output_max,
                            setup.batch_discount)
    return row, s


def _sum_costs(costs: Iterable[Optional[dict]]) -> Optional[dict]:
    """The passes' costs summed (batch: a pass without Batch API counts its sync cost); None
    when one pass has no price."""
    costs = list(costs)
    if any(c is None for c in costs):
        return None
    out: dict = {"sync": {k: round(sum(c["sync"][k] for c in costs), 6)
                          for k in ("expected", "max")}}
    if any("batch" in c for c in costs):
        out["batch"] = {k: round(sum(c.get("batch", c["sync"])[k] for c in costs), 6)
                        for k in ("expected", "max")}
    return out


# ---- a plan folder ----------------------------------------------------------------------------

def read_plan(plan_dir: Path, default_size: int) -> Planned:
    """The requests of a plan folder (`plan`'s output: requests/<pass>/ shards) and its tiles'
    image sizes (TilePlan measurements; `default_size` square where a plan has none). Reads
    no image."""
    import pyarrow.parquet as pq

    from pipeline.core.shards import list_shards, read_records

    plan_dir = Path(plan_dir)
    sizes: dict[str, tuple[int, int]] = {}
    with_objects: set[str] = set()
    for shard in list_shards(plan_dir / "tiles"):
        rows = pq.read_table(shard, columns=["tile_id", "positions", "measurements"])
        for row in rows.to_pylist():
            m = row["measurements"] or {}
            sizes[row["tile_id"]] = (m.get("width") or default_size,
                                     m.get("height") or default_size)
            if row["positions"]:
                with_objects.add(row["tile_id"])
    requests: list[Request] = []
    for name in ("holistic", "instance", "cluster"):
        folder = plan_dir / "requests" / name
        if folder.is_dir():
            for shard in list_shards(folder):
                requests.extend(read_records(shard, Request))
    return Planned(requests, sizes, frozenset(with_objects))


def plan_estimate(params: Params, plan_dir: Path) -> dict:
    """The estimate of a plan folder just written (the plan stage's report.json)."""
    return estimate(params, read_plan(plan_dir, params.prepare.tile_size))


# ---- printing ---------------------------------------------------------------------------------

def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:,.4f}"


def format_estimate(block: dict) -> str:
    """The estimate as lines for a terminal."""
    lines = []
    model = f"{block['backend']} {block['model']}"
    if block.get("mode"):
        model += f" (configured mode: {block['mode']})"
    scaled = block.get("scaled")
    where = (f"{block['tiles']:,} tiles of {scaled['tile_size']}x{scaled['tile_size']}"
             if scaled and scaled.get("tile_size") else f"{block['tiles']:,} tiles")
    lines.append(f"estimate for {model}: {where}")
    if block.get("planned_from"):
        lines.append(f"  planned: {block['planned_tiles']:,} tiles, {block['planned_from']}")
    if scaled:
        times = scaled["to_tiles"] / max(scaled["from_tiles"], 1)
        lines.append(f"  scaled: {scaled['basis']}, x{times:,.1f}")
    lines.append("  requests per pass: " + ", ".join(f"{k} {v:,}" for k, v in
                                                     block["requests"].items()))
    lines.append(f"  instance pass: {block['instance_calls'].replace('_', ' ')}")
    head = (f"  {'pass':<9}{'calls':>10}{'per tile':>9}{'input tokens':>16}{'of them image':>16}"
            f"{'output max':>13}{'expected':>12}{'cost sync':>12}{'cost Batch':>12}")
    lines.append(head)
    rows = list(block["passes"].items()) + [("total", block["total"])]
    for name, row in rows:
        inp, out, cost = row.get("input_tokens"), row.get("output_tokens"), row.get("cost_usd")
        cells = [f"  {name:<9}", f"{row['calls']:>10,}", f"{row['calls_per_tile']:>9.2f}"]
        cells += ([f"{inp['total']:>16,}", f"{inp['image']:>16,}", f"{out['max']:>13,}",
                   f"{out['expected']:>12,}"] if inp else [f"{'-':>16}", f"{'-':>16}",
                                                         f"{'-':>13}", f"{'-':>12}"])
        if cost is None:
            cells += [f"{'no price':>12}", f"{'':>12}"]
        else:
            batch = cost.get("batch")
            cells += [f"{_usd(cost['sync']['expected']):>12}",
                      f"{_usd(batch['expected']) if batch else 'n/a':>12}"]
        lines.append("".join(cells))
    cost = block["total"]["cost_usd"]
    if cost is not None:
        lines.append(f"  cost, sync:  {_usd(cost['sync']['expected'])} expected, at most "
                     f"{_usd(cost['sync']['max'])} (every answer at max_tokens)")
        if "batch" in cost:
            lines.append(f"  cost, Batch: {_usd(cost['batch']['expected'])} expected, at most "
                         f"{_usd(cost['batch']['max'])}")
    if block.get("image_tokens"):
        img = block["image_tokens"]
        sizes = ", ".join(f"{k}: {v}" for k, v in img["per_image"].items())
        lines.append(f"  image tokens: {img['rule']}"
                     + (f"; detail {img['detail']}" if img["detail"] else "")
                     + (f"; per image {sizes}" if sizes else ""))
        lines.append(f"  text tokens: {block['text_tokens']}")
        lines.append(f"  expected output: {block['output_expected_basis']}")
    price = block.get("price")
    if price is not None:
        lines.append(f"  price: ${price['input_per_mtok']:.2f} input, "
                     f"${price['output_per_mtok']:.2f} output per million tokens "
                     f"({price['source']})")
    for note in block.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
