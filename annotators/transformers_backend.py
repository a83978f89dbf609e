"""The transformers backend: a multimodal model (Qwen2.5-VL-style first) on a local GPU.

`AutoProcessor` + `AutoModelForImageTextToText` from a local folder or a hub id, bfloat16 on a
GPU (float32 on the CPU), greedy decoding by default.

Why it is fast: most of a request's cost is its image (the vision tower, then the prefill of
hundreds of image tokens), and several prompts ask about the same image (every instance prompt
of a patch looks at its set-of-marks image; holistic and cluster prompts at the tile). So the
prompts are grouped by image, and each image's prefix (system turn, user header and image
tokens: everything before the prompt text) is run through the model ONCE; its KV cache is then
repeated along the batch dimension, one row per prompt on that image, and only the prompt texts
are prefilled on top of it. A forward batch holds the prompts of several patches (up to
`batch_size`), their texts left-padded in the middle ([prefix | pad | text]) so that every row
ends on a real token; rows that finish are dropped from the batch.

Qwen2.5-VL places tokens with 3D (temporal, height, width) rotary positions: the prefix gets the
model's own `get_rope_index` positions and the text after it continues at the prefix's largest
position + 1 on all three axes, exactly where plain `generate` puts it, so greedy outputs are the
tokens plain one-prompt-at-a-time `model.generate` gives (tests/test_transformers_backend.py).

Public transformers APIs relied on (tested with 5.25): `from_pretrained`, the processor's
chat template and call, the model's forward with `position_ids`, `attention_mask`, the KV cache
(`cache`; `past_key_values` before transformers renamed it, which the model's forward names:
`cache_keyword`), `use_cache` and `logits_to_keep`; `Cache.reorder_cache` (the beam-search
hook, an index_select along the batch); `model.base_model.get_rope_index(input_ids,
mm_token_type_ids, image_grid_thw)` for 3D positions (models without it get 1D positions);
`RepetitionPenaltyLogitsProcessor`.

This module is the backend's transport: a round of asks is one batched generation (per ask
number and token limit). The cache, cleaning and re-asks are `annotators.answering`'s, as for
every model backend, with the same per-kind token limits (`annotate.backend.max_tokens_by_kind`).
A refused greedy answer is asked again `clean_retries` times by sampling (temperature
`clean_retry_temperature`, seed + k), since greedy decoding would only repeat it. A request
without an image (the LLM composer's) is answered from its text. The stage gives this backend
batched-marks requests one mark at a time (it does not set `answers_instance_batch`): with the
set-of-marks image's prefix shared, a prompt per mark costs little more than one per patch.

A model is loaded once per process and shared by the shard tasks of its threads (one
generation at a time); with `runner.local_scheduler: processes` each worker loads its own copy.
Temperature > 0 samples from the full softmax (no top-k / top-p), seeded per call.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from annotators.answering import ERROR_CHARS, Answer, Ask, Deliver, ModelBackend, image_error
from annotators.base import AnnotationContext
from annotators.cache import ResponseCache, cache_key
from pipeline.core.errors import BadImageError, BadParamsError
from pipeline.core.params import BackendParams
from schemas import Request, Usage

NAME = "transformers"
KEY = "annotate.backend.transformers.model_path"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # 'Qwen/Qwen2.5-VL-7B-Instruct'
# Processor outputs that are token-level, not image inputs of the model.
TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass(frozen=True)
class Generation:
    """One prompt's answer: generated token ids (ending with the end token when the model
    stopped), their text, the prompt's length in tokens, and the seconds from the start of its
    forward batch until it was done."""

    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" or "length"
    latency_s: float


@dataclass
class LoadedModel:
    """A model and its processor, ready to generate; the lock keeps one generation at a time
    on it (dask threads share a loaded model).

    What differs between models and transformers versions is read here, once:
    `cache_keyword`, the name under which the model's forward takes the KV cache and its
    output holds it (`cache` where transformers has renamed it, in 5.x, where
    `past_key_values` warns of its removal in 5.40; else `past_key_values`); `rope_index`, the
    model's 3D rotary positions (`get_rope_index`: Qwen2-VL, Qwen2.5-VL; None: 1D positions),
    and whether it takes `mm_token_type_ids` (`rope_takes_token_types`)."""

    model: Any
    processor: Any
    source: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    cache_keyword: str = field(init=False)
    rope_index: Optional[Callable] = field(init=False)
    rope_takes_token_types: bool = field(init=False)

    def __post_init__(self) -> None:
        forward = inspect.signature(self.model.forward).parameters
        self.cache_keyword = "cache" if "cache" in forward else "past_key_values"
        self.rope_index = getattr(self.model.base_model, "get_rope_index", None)
        self.rope_takes_token_types = self.rope_index is not None and \
            "mm_token_type_ids" in inspect.signature(self.rope_index).parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# Loaded models of this process, by (source, device, dtype, attention, max_pixels): shard tasks
# in one process share one copy instead of loading it per shard.
_LOADED: dict[tuple, LoadedModel] = {}
_LOADING = threading.Lock()


def model_source(params: BackendParams) -> str:
    """Local folder or hub id of the model: `transformers.model_path`, else `model`."""
    return params.transformers.model_path or params.model


def model_name(source: str) -> str:
    """The name recorded in responses: the folder's (or hub id's) last part."""
    return Path(source.rstrip("/\\")).name or source


def check_model_source(source: str) -> None:
    """A local model folder must exist and hold config.json; only a name of the hub's form
    'org/name' that is no local path is left for `from_pretrained` to find in the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadParamsError(f"{KEY}: {path} has no config.json (not a model folder)")
    elif path.exists():
        raise BadParamsError(f"{KEY}: {path} is a file, not a model folder")
    elif not HUB_ID.fullmatch(source):
        raise BadParamsError(f"{KEY}: no model folder at {source}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadParamsError(f"annotate.backend.transformers.device: {name} asked for, but "
                             "torch sees no CUDA device here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_model(params: BackendParams) -> LoadedModel:
    """The model and processor `params` name, loaded once per process."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t = params.transformers
    source = model_source(params)
    check_model_source(source)
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    key = (source, str(device), str(dtype), t.attn_implementation, t.max_pixels)
    with _LOADING:
        if key not in _LOADED:
            extra = {"max_pixels": t.max_pixels} if t.max_pixels else {}
            try:
                processor = AutoProcessor.from_pretrained(source, **extra)
                model = AutoModelForImageTextToText.from_pretrained(
                    source, dtype=dtype, attn_implementation=t.attn_implementation,
                    device_map=str(device))
            except (OSError, ValueError, KeyError, ImportError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise BadParamsError(f"{KEY}: cannot load a model from {source} "
                                     f"({type(exc).__name__}: {first[:ERROR_CHARS]})") from None
            if not getattr(processor, "chat_template", None):
                raise BadParamsError(f"{KEY}: the processor of {source} has no chat template "
                                     "(an instruction-tuned model is needed)")
            _LOADED[key] = LoadedModel(model=model.eval(), processor=processor, source=source)
        return _LOADED[key]


def generation_params(params: BackendParams, dtype: str, max_tokens: int) -> dict:
    """Everything besides prompt and image that shapes an answer: part of the cache key."""
    t = params.transformers
    return {"temperature": params.temperature, "max_tokens": max_tokens,
            "seed": params.seed, "dtype": dtype, "max_pixels": t.max_pixels,
            "repetition_penalty": t.repetition_penalty, "min_new_tokens": t.min_new_tokens}


# --------------------------------------------------------------------------------------------
# Prompts: grouped by image prefix


@dataclass
class ImagePrefix:
    """The part of the prompt shared by every prompt on one image: token ids up to and
    including the image tokens, the image inputs of the model, and their positions."""

    input_ids: torch.Tensor  # (L,)
    image_inputs: dict[str, torch.Tensor]
    positions: torch.Tensor  # (3, L) for 3D rotary positions, (1, L) for 1D
    next_position: int  # position of the first token after the prefix


@dataclass
class PromptTokens:
    """One prompt: its image prefix and the token ids after it (prompt text, turn end,
    assistant header)."""

    index: int
    prefix: ImagePrefix
    suffix: list[int]

    @property
    def length(self) -> int:
        return len(self.prefix.input_ids) + len(self.suffix)


def chat_text(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The model's chat template around one user turn: the image, then the prompt."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)


def image_token_id(loaded: LoadedModel) -> int:
    found = getattr(loaded.processor, "image_token_id", None)
    return int(found if found is not None else loaded.model.config.image_token_id)


def decode_image(png: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for a bad file
        raise BadImageError(f"cannot decode the request's image ({type(exc).__name__})") from None


def _image_positions(loaded: LoadedModel, ids: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Rotary positions of a prefix, (3, L) from the model's `get_rope_index` for 3D-position
    models (Qwen2-VL, Qwen2.5-VL), else (1, L) = 0..L-1."""
    if loaded.rope_index is None:
        return torch.arange(len(ids))[None]
    kwargs = {"image_grid_thw": inputs.get("image_grid_thw")}
    if loaded.rope_takes_token_types:
        mm = inputs.get("mm_token_type_ids")
        kwargs["mm_token_type_ids"] = (mm[0] if mm is not None else
                                       (ids == image_token_id(loaded)).long())[None]
    positions, _ = loaded.rope_index(ids[None], **kwargs)
    return positions[:, 0, :].cpu()


def encode_prompts(loaded: LoadedModel, requests: Sequence[Request],
                   images: dict[str, Any]) -> list[PromptTokens]:
    """Token ids of every request, split into a shared image prefix and its own suffix. The
    processor (image resizing, placeholder expansion) runs once per image prefix. A request
    without an image shares only its first token."""
    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    image_id = image_token_id(loaded)
    prefixes: dict[tuple, ImagePrefix] = {}
    out: list[PromptTokens] = []
    for index, request in enumerate(requests):
        if not request.image_sha256:  # text only (the LLM composer): its first token is shared
            ids = list(tokenizer(chat_text(processor, request.prompt, False))["input_ids"])
            key = ("", ids[0])
            if key not in prefixes:
                dims = 3 if loaded.rope_index is not None else 1
                prefixes[key] = ImagePrefix(input_ids=torch.tensor(ids[:1]), image_inputs={},
                                            positions=torch.zeros((dims, 1), dtype=torch.long),
                                            next_position=1)
            out.append(PromptTokens(index=index, prefix=prefixes[key], suffix=ids[1:]))
            continue
        text = chat_text(processor, request.prompt)
        ids = list(tokenizer(text)["input_ids"])
        at = [i for i, t in enumerate(ids) if t == image_id]
        if not at:
            raise BadParamsError(f"{KEY}: the chat template of {loaded.source} puts no image "
                                 "token in a prompt with an image")
        head, tail = tuple(ids[:at[0]]), ids[at[-1] + 1:]
        key = (request.image_sha256, head)
        if key not in prefixes:
            inputs = processor(text=[text], images=[images[request.image_sha256]],
                               return_tensors="pt")
            full = inputs["input_ids"][0]
            last = int((full == image_id).nonzero().max())
            if full[last + 1:].tolist() != tail:
                raise BadParamsError(f"{KEY}: the processor of {loaded.source} and its "
                                     "tokenizer split a prompt differently")
            prefix_ids = full[:last + 1]
            positions = _image_positions(loaded, full, dict(inputs))[:, :last + 1]
            prefixes[key] = ImagePrefix(
                input_ids=prefix_ids,
                image_inputs={k: v for k, v in inputs.items() if k not in TOKEN_INPUTS},
                positions=positions, next_position=int(positions.max()) + 1)
        out.append(PromptTokens(index=index, prefix=prefixes[key], suffix=tail))
    return out


def _shape(prefix: ImagePrefix) -> tuple[int, tuple[str, ...]]:
    """Prefixes of one shape (length, image inputs) can be stacked into one batch."""
    return len(prefix.input_ids), tuple(sorted(prefix.image_inputs))


def forward_batches(prompts: Sequence[PromptTokens], batch_size: int) -> list[list[PromptTokens]]:
    """Prompts packed into forward batches of at most `batch_size`: the prompts of one image
    stay together (one prefix prefill), prefixes of one shape share a batch."""
    groups: dict[int, list[PromptTokens]] = {}
    for p in prompts:
        groups.setdefault(id(p.prefix), []).append(p)
    ordered = sorted(groups.values(), key=lambda g: _shape(g[0].prefix))
    batches: list[list[PromptTokens]] = []
    current: list[PromptTokens] = []
    for group in ordered:
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            if current and (len(current) + len(chunk) > batch_size or
                            _shape(current[0].prefix) != _shape(chunk[0].prefix)):
                batches.append(current)
                current = []
            current = current + chunk
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy at temperature 0, else sampled with a seeded generator."""

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0


def end_token_ids(loaded: LoadedModel) -> list[int]:
    """The ids that end an answer, as plain `generate` reads them (the generation config)."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.processor.tokenizer.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                   if e is not None})


def _positions_arg(positions: torch.Tensor) -> torch.Tensor:
    """(P, B, S) positions as the model takes them: 3D for P = 3, (B, S) for P = 1."""
    return positions if positions.shape[0] > 1 else positions[0]


def generate_batch(loaded: LoadedModel, batch: Sequence[PromptTokens],
                   sampling: Sampling) -> list[Generation]:
    """Answers to one forward batch: each distinct image prefix prefilled once, its KV cache
    repeated for every prompt on it, then the prompt texts and the decoding steps batched."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model, device = loaded.model, loaded.device
    started = time.monotonic()
    prefixes: list[ImagePrefix] = []
    rows: list[int] = []
    for p in batch:
        if not any(p.prefix is q for q in prefixes):
            prefixes.append(p.prefix)
        rows.append(next(i for i, q in enumerate(prefixes) if q is p.prefix))
    # 1. The image prefixes, once each.
    prefix_ids = torch.stack([q.input_ids for q in prefixes]).to(device)
    image_inputs = {k: torch.cat([q.image_inputs[k] for q in prefixes]).to(device)
                    for k in prefixes[0].image_inputs}
    if "pixel_values" in image_inputs:
        image_inputs["pixel_values"] = image_inputs["pixel_values"].to(loaded.dtype)
    positions = torch.stack([q.positions for q in prefixes], dim=1).to(device)
    out = model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                position_ids=_positions_arg(positions), use_cache=True, logits_to_keep=1,
                **image_inputs)
    keyword = loaded.cache_keyword
    cache = out[keyword]
    cache.reorder_cache(torch.tensor(rows, device=device))  # one cache row per prompt
    # 2. The prompt texts, left-padded between prefix and text.
    n, width = len(batch), max(len(p.suffix) for p in batch)
    pad = loaded.processor.tokenizer.pad_token_id
    pad = int(pad if pad is not None else end_token_ids(loaded)[0])
    text_ids = torch.full((n, width), pad, dtype=torch.long)
    text_mask = torch.zeros((n, width), dtype=torch.long)
    next_pos = torch.tensor([p.prefix.next_position for p in batch])
    text_pos = next_pos[:, None].repeat(1, width)
    for i, p in enumerate(batch):
        k = len(p.suffix)
        text_ids[i, width - k:] = torch.tensor(p.suffix)
        text_mask[i, width - k:] = 1
        text_pos[i, width - k:] = p.prefix.next_position + torch.arange(k)
    text_ids, text_pos = text_ids.to(device), text_pos.to(device)
    mask = torch.cat([torch.ones((n, prefix_ids.shape[1]), dtype=torch.long),
                      text_mask], dim=1).to(device)
    dims = positions.shape[0]
    out = model(input_ids=text_ids, attention_mask=mask,
                position_ids=_positions_arg(text_pos[None].expand(dims, -1, -1)),
                use_cache=True, logits_to_keep=1, **{keyword: cache})
    # 3. Decoding, one token per live row per step; finished rows leave the batch.
    last_pos = text_pos[:, -1]
    history = None
    if sampling.repetition_penalty != 1.0:
        # the ids plain `generate` would see; padding replaced by a token already there
        full = torch.cat([prefix_ids[rows], text_ids], dim=1)
        history = torch.where(mask.bool(), full, full[:, :1])
        penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
    ends = torch.tensor(end_token_ids(loaded), device=device)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    live = list(range(n))  # batch index of each live row
    tokens: list[list[int]] = [[] for _ in range(n)]
    done_at: list[float] = [0.0] * n
    stopped: list[bool] = [False] * n
    for step in range(sampling.max_new_tokens):
        logits = out.logits[:, -1, :].to(dtype=torch.float32)
        if history is not None:
            logits = penalty(history, logits)
        if step < sampling.min_new_tokens:
            logits[:, ends] = -float("inf")
        if generator is None:
            chosen = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / sampling.temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        finished = torch.isin(chosen, ends)
        now = time.monotonic()
        for b, token, end in zip(live, chosen.tolist(), finished.tolist()):
            tokens[b].append(token)
            if end or step == sampling.max_new_tokens - 1:
                stopped[b], done_at[b] = end, now - started
        if step == sampling.max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero()[:, 0]
            cache.reorder_cache(keep)
            live = [live[i] for i in keep.tolist()]
            chosen, mask, last_pos = chosen[keep], mask[keep], last_pos[keep]
            if history is not None:
                history = history[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        if history is not None:
            history = torch.cat([history, chosen[:, None]], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask,
                    position_ids=_positions_arg(last_pos[None, :, None].expand(dims, -1, -1)),
                    use_cache=True, **{keyword: cache})
    decode = loaded.processor.tokenizer.decode
    return [Generation(token_ids=tuple(tokens[i]),
                       text=decode(tokens[i], skip_special_tokens=True),
                       prompt_tokens=p.length, finish_reason="stop" if stopped[i] else "length",
                       latency_s=done_at[i]) for i, p in enumerate(batch)]


# --------------------------------------------------------------------------------------------
# The backend


class TransformersBackend(ModelBackend):
    """Answers requests with a local multimodal model, prefix-shared and batched."""

    name = NAME
    loads_model = True  # one model per process: stages run its shards in threads
    reported_stats = ("prompts", "image_prefixes", "forward_batches", "cache_hits", "answered",
                      "failed", "cleaning_refusals", "cleaning_fixes")

    def __init__(self, params: BackendParams, cache: Optional[ResponseCache] = None, *,
                 loaded: Optional[LoadedModel] = None):
        """`loaded` hands over a model already in memory (benchmarks); otherwise the model
        folder is checked here and loaded at the first `annotate`."""
        super().__init__(params, cache)
        self.source = loaded.source if loaded is not None else model_source(params)
        if loaded is None:
            check_model_source(self.source)
        self.model = model_name(self.source)
        self.dtype = str(loaded.dtype if loaded is not None else resolve_dtype(
            params.transformers.dtype, resolve_device(params.transformers.device)))
        self._loaded = loaded

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.params)
        return self._loaded

    def sampling(self, ask: int = 0, max_tokens: Optional[int] = None) -> Sampling:
        """Greedy (or the configured temperature) first; re-asks sample with seed + ask."""
        p, t = self.params, self.params.transformers
        limit = max_tokens or p.max_tokens
        penalty = t.repetition_penalty
        if penalty is None:
            penalty = self.loaded.model.generation_config.repetition_penalty
        temperature = p.temperature if not ask else max(p.temperature, p.clean_retry_temperature)
        return Sampling(max_new_tokens=limit, temperature=temperature, seed=p.seed + ask,
                        repetition_penalty=float(penalty or 1.0),
                        min_new_tokens=min(t.min_new_tokens, limit))

    def generate(self, requests: Sequence[Request], context: AnnotationContext,
                 sampling: Optional[Sampling] = None) -> list[Generation]:
        """The model's raw answer to every request, in request order (no cleaning), with
        `sampling` or, by default, greedy with each kind's token limit. Raises KeyError /
        BadImageError when a request's image is missing or unreadable."""
        images = {sha: decode_image(context.image(sha))
                  for sha in dict.fromkeys(r.image_sha256 for r in requests) if sha}
        return self._generate(requests, images, sampling)

    def _generate(self, requests: Sequence[Request], images: dict[str, Any],
                  sampling: Optional[Sampling], ask: int = 0) -> list[Generation]:
        limits: dict[int, list[int]] = {}  # token limit -> indices of its requests
        for i, r in enumerate(requests):
            limit = sampling.max_new_tokens if sampling else self.params.max_tokens_for(r.kind)
            limits.setdefault(limit, []).append(i)
        if not requests:
            return []
        answers: list[Optional[Generation]] = [None] * len(requests)
        loaded = self.loaded
        with loaded.lock, torch.inference_mode():
            for limit, indices in limits.items():
                how = sampling or self.sampling(ask, limit)
                prompts = encode_prompts(loaded, [requests[i] for i in indices], images)
                self.stats.image_prefixes += len({id(p.prefix) for p in prompts})
                for batch in forward_batches(prompts, self.params.transformers.batch_size):
                    self.stats.forward_batches += 1
                    for p, answer in zip(batch, generate_batch(loaded, batch, how)):
                        answers[indices[p.index]] = answer
        self.stats.prompts += len(requests)
        return answers  # type: ignore[return-value]

    def request_key(self, request: Request) -> str:
        return cache_key(backend=NAME, model=self.source, prompt_version=request.prompt_version,
                         prompt=request.prompt, image_sha256=request.image_sha256,
                         generation=generation_params(self.params, self.dtype,
                                                      self.params.max_tokens_for(request.kind)))

    def transport(self, context: AnnotationContext) -> ContextManager[LocalGeneration]:
        return contextlib.nullcontext(LocalGeneration(self, context))


class LocalGeneration:
    """The transport of one `annotate` call: each round's asks generated in batches (one
    sampling per ask number), images decoded once per call."""

    def __init__(self, backend: TransformersBackend, context: AnnotationContext):
        self.backend, self.context = backend, context
        self.images: dict[str, Any] = {}

    def ask(self, asks: Sequence[Ask], deliver: Deliver) -> None:
        by_number: dict[int, list[Ask]] = {}
        for ask in asks:
            sha = ask.request.image_sha256
            try:
                if sha and sha not in self.images:
                    self.images[sha] = decode_image(self.context.image(sha))
            except (KeyError, BadImageError) as exc:
                deliver(ask.key, Answer(ask.number, error=image_error(exc), attempts=0))
                continue
            by_number.setdefault(ask.number, []).append(ask)
        for number, group in by_number.items():
            generated = self.backend._generate([ask.request for ask in group], self.images,
                                               None, number)
            for ask, answer in zip(group, generated):
                deliver(ask.key, Answer(
                    number, text=answer.text, finish_reason=answer.finish_reason,
                    usage=Usage(prompt_tokens=answer.prompt_tokens,
                                completion_tokens=len(answer.token_ids)),
                    latency_s=answer.latency_s))
