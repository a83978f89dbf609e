"""Parameters: one pydantic model per `params.yaml` section, defaults equal to the file's.

Each stage reads only its own section (and DVC tracks exactly those keys). Values are strict
(`true` is not a number, "5" is not an integer; an integer is a float, a list a pair), checked
together where two keys must agree, and words that reach captions are checked like captions.
A bad value raises `BadParamsError` naming the key and where it came from: the params file
actually read, or the command-line option that set it (each section carries its `Origin`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
import unicodedata
from pathlib import Path
from typing import Annotated, Literal, Mapping, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

import prompts
from pipeline.core.errors import BadParamsError
from pipeline.core.user_files import read_user_text
from schemas import SEG

OnError = Literal["raise", "skip"]

DEFAULT_PARAMS = "params.yaml"
# a params file larger than this is refused before it is parsed (the generated one is ~20 KB)
MAX_PARAMS_BYTES = 1 << 20


class Origin:
    """Where a section's values came from: the params file read (`file`), the command-line
    options that replaced some keys (`options`: dotted key from the root -> option) and the
    section's own dotted key (`prefix`). Not a value: any two origins compare equal, so that
    equality, hashing, dumps and digests of parameters stay by value."""

    __slots__ = ("file", "options", "prefix")

    def __init__(self, file: str = DEFAULT_PARAMS, options: Optional[Mapping[str, str]] = None,
                 prefix: str = ""):
        self.file, self.options, self.prefix = str(file), dict(options or {}), prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origin)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"Origin({self.file!r}, {self.options!r}, {self.prefix!r})"

    def source(self, key: str = "") -> str:
        """The option that set `key` (dotted, relative to the section), else the file."""
        full = ".".join(p for p in (self.prefix, key) if p)
        for dotted, option in self.options.items():
            if full == dotted or full.startswith(dotted + "."):
                return option
        return self.file


class ParamsConflict(ValueError):
    """Two keys that make no sense together: raised by validators with the key to blame
    (dotted, relative to the validated section)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    _origin: Origin = PrivateAttr(default_factory=Origin)

    def where(self, key: str = "") -> str:
        """Where `key` of this section came from (a command-line option, or the params file):
        what a message about it names."""
        return self._origin.source(key)

    @classmethod
    def is_run_setting(cls, name: str) -> bool:
        """Whether field `name` is a run setting (see `run_setting`)."""
        extra = cls.model_fields[name].json_schema_extra
        return isinstance(extra, dict) and bool(extra.get(RUN_SETTING))

    def generation(self) -> dict:
        """The section's values that can change what a stage writes: run settings left out,
        nested sections likewise (JSON types)."""
        dumped = self.model_dump(mode="json")
        return {name: (value.generation() if isinstance(value, Section) else dumped[name])
                for name, value in self if not type(self).is_run_setting(name)}

    def digest(self) -> str:
        """Stable hash of the section's generation settings (`generation`)."""
        blob = json.dumps(self.generation(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


RUN_SETTING = "run_setting"


def run_setting(*args, **kwargs):
    """A field that changes only how fast, where, or at what cost a stage runs (concurrency,
    timeouts, retries, endpoints, prices, polling, cache), never what it writes. Run settings
    are left out of `params_hash` (so of every record's provenance) and of the stages' DVC
    params, so changing one re-runs nothing. Same arguments as pydantic's `Field`."""
    return Field(*args, json_schema_extra={RUN_SETTING: True}, **kwargs)


# -- value checks shared by several sections ---------------------------------------------------

# a name that becomes a file or folder name (a split, a layout folder): the rule of
# pipeline.core.shards.safe_name
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_CHARS = 100
# words that reach captions (plan.cluster_info): letters, single spaces or hyphens between
MAX_CAPTION_WORDS_CHARS = 40
# text that reaches every training sample (the GeoPixel question)
MAX_QUESTION_CHARS = 2000
# tag-like text (pipeline.core.validate's rule): "<p>", "</p>", "[SEG]", any "<" or ">"
_TAG_LIKE_RE = re.compile(r"[<>]|\[\s*/?\s*seg|seg\s*\]", re.IGNORECASE)


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _safe_name(value: str) -> str:
    if (len(value) > MAX_NAME_CHARS or not _SAFE_NAME_RE.match(value) or ".." in value):
        raise ValueError(f"{_shown(value)} is not a safe file name (letters, digits, '_', '.', "
                         f"'-', not starting with '.' or '-', no '..', at most {MAX_NAME_CHARS} "
                         "characters)")
    return value


def _caption_words(value: str) -> str:
    parts = re.split(r"[ -]", value)
    if not value or len(value) > MAX_CAPTION_WORDS_CHARS or not all(
            p and p.isalpha() for p in parts):
        raise ValueError(f"{_shown(value)} cannot go into a caption: letters with single spaces "
                         f"or hyphens between them, at most {MAX_CAPTION_WORDS_CHARS} characters "
                         "(no digits, tags like <p> or [SEG], or control characters)")
    return value


def _plain_text(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"is {len(value)} characters, more than {MAX_QUESTION_CHARS}")
    for ch in value:
        if unicodedata.category(ch)[0] == "C":
            raise ValueError(f"holds a control or invisible character (U+{ord(ch):04X})")
    if _TAG_LIKE_RE.search(value):
        raise ValueError("holds tag-like text ('<', '>', [SEG]): it would forge a grounding")
    return value


def _pair(value: object) -> object:
    """YAML has no tuples: a two-item list is a pair."""
    return tuple(value) if isinstance(value, list) else value


SafeName = Annotated[str, AfterValidator(_safe_name)]
CaptionWords = Annotated[str, AfterValidator(_caption_words)]
PlainText = Annotated[str, AfterValidator(_plain_text)]
ClusterWord = Annotated[tuple[Annotated[int, Field(ge=1)], CaptionWords], BeforeValidator(_pair)]


def _unique(values: list[str], what: str) -> list[str]:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} {v!r} given twice")
        seen.add(v)
    return values


def _prompt_version(value: str) -> str:
    if value not in prompts.versions():
        raise ValueError(f"{_shown(value)} is not a prompt version; available: "
                         f"{', '.join(prompts.versions())} (folders of prompts/)")
    return value


class DataParams(Section):
    """Where the source imagery is and which splits to build."""

    source: Literal["isaid", "coco"] = "isaid"
    root: str = "data/isaid"
    splits: list[SafeName] = Field(default_factory=lambda: ["train", "val", "test"],
                                   min_length=1)
    coco_json: Optional[str] = Field(
        default=None, description="annotation file for source=coco, relative to root; "
        "'{split}' is replaced by the split name")
    coco_images: str = Field(
        "{split}", description="image folder for source=coco, relative to root; "
        "'{split}' is replaced by the split name")
    unlabeled_splits: list[SafeName] = Field(
        default_factory=lambda: ["test"],
        description="iSAID splits that have images only (tiles without objects)")

    @field_validator("splits")
    @classmethod
    def _splits_once(cls, value: list[str]) -> list[str]:
        return _unique(value, "split")


class PrepareParams(Section):
    """Tiling and instance extraction. Defaults reproduce the iSAID devkit exactly."""

    tile_size: int = Field(800, ge=32, le=8192)
    stride: int = Field(600, ge=1, le=8192)
    skip_images: list[str] = Field(default_factory=lambda: ["P1527", "P1530"])
    min_instance_area: int = Field(10, ge=0, description="instances of <= this many px dropped")
    min_contour_points: int = Field(2, ge=0, description="any contour of <= this many points drops the instance")
    max_image_pixels: int = Field(250_000_000, ge=1, description="decompression-bomb limit")
    png_compression: int = Field(1, ge=0, le=9)
    tiles_per_shard: int = Field(32, ge=1, le=100_000, description="a shard is one task of "
                                 "every stage: small enough that the workers finish together")
    on_error: OnError = "raise"

    @model_validator(mode="after")
    def _stride_fits(self) -> "PrepareParams":
        if self.stride > self.tile_size:
            raise ValueError(f"stride ({self.stride}) larger than tile_size ({self.tile_size}) leaves gaps")
        return self


class MarkParams(Section):
    """Set-of-marks drawing: black square, yellow number."""

    font_scale: float = Field(0.5, gt=0, le=4)
    thickness: int = Field(1, ge=1, le=8)
    padding: int = Field(2, ge=0, le=16, description="px between the digits and the square's edge")
    candidates: int = Field(64, ge=1, le=4096, description="in-mask anchor points tried per mark")
    candidate_spacing: int = Field(
        4, ge=1, le=256, description="px grid for alternative anchors: one per cell, so that "
        "a colliding mark is retried somewhere else, not one pixel over")
    gap: int = Field(1, ge=1, le=64, description="fewest px of image between two marks' squares")
    png_compression: int = Field(0, ge=0, le=9, description="zlib level of the set-of-marks "
                                 "PNG: 0 stores it (fastest; about twice the bytes of 1)")
    ink_threshold: int = Field(64, ge=1, le=255, description="anti-aliased text coverage "
                               "(0-255) drawn as full yellow; below it the square stays black")


class PlanParams(Section):
    """Positional and category priors, instance vs cluster split, set-of-marks."""

    grid: int = Field(3, ge=1, le=9, description="positional prior grid (3 = the paper's 3x3)")
    max_marks_per_tile: int = Field(10, ge=0, le=99)
    min_mark_area: int = Field(25, ge=0, description="objects smaller than this are never marked alone")
    cluster_min_count: int = Field(6, ge=2, description="a category with at least this many objects in a tile is clustered")
    cluster_max_area: int = Field(4000, ge=0, description="objects larger than this (px) are marked, not clustered")
    cluster_min_members: int = Field(3, ge=2, description="fewest objects a grid region needs to form a cluster")
    cluster_region_share: float = Field(
        0.8, gt=0, le=1, description="share of a group one grid cell must hold to name it")
    cluster_grids: list[str] = Field(default_factory=lambda: ["3x3", "2x2", "1x2"], min_length=1)
    cluster_info: list[ClusterWord] = Field(
        default_factory=lambda: [(20, "numerous"), (10, "many"), (5, "several"), (2, "a few")],
        min_length=1, description="(at least this many members, word), first match wins")
    prompt_version: str = "v1"
    batched_marks: bool = Field(
        False, description="one instance_batch call per patch describes every marked object "
        "(a JSON list) instead of one instance call per mark")
    marks: MarkParams = Field(default_factory=MarkParams)

    @field_validator("cluster_info")
    @classmethod
    def _counts_descend(cls, value: list[tuple[int, str]]) -> list[tuple[int, str]]:
        # first match wins: an entry after a smaller count could never be chosen
        for (a, word_a), (b, word_b) in zip(value, value[1:]):
            if b >= a:
                raise ValueError(f"counts must go down, largest first (first match wins): "
                                 f"{b} ({word_b!r}) comes after {a} ({word_a!r})")
        return value

    @field_validator("prompt_version")
    @classmethod
    def _known_prompt_version(cls, value: str) -> str:
        return _prompt_version(value)


class ModelPrice(Section):
    """A model's price in USD per million tokens (check your provider's price list)."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class BatchParams(Section):
    """OpenAI Batch API mode: JSONL files under the API's limits, polled until done, half price.
    Limits from OpenAI's documentation: 50,000 requests and 200 MB per input file."""

    max_requests_per_file: int = Field(50_000, ge=1, le=50_000)
    max_bytes_per_file: int = Field(200_000_000, ge=1_000, le=200_000_000)
    poll_interval_s: float = Field(30.0, gt=0, le=3600, description="first wait between polls")
    poll_backoff: float = Field(1.5, ge=1, le=10, description="each wait is this times the last")
    poll_max_interval_s: float = Field(600.0, gt=0, le=86400)
    max_wait_s: float = Field(
        90_000.0, gt=0, description="give up polling after this long (the batch stays open in "
        "the cache db and the next run resumes it)")
    discount: float = Field(0.5, ge=0, le=1, description="batch price as a share of the "
                            "synchronous price")

    @model_validator(mode="after")
    def _intervals_fit(self) -> "BatchParams":
        if self.poll_interval_s > self.poll_max_interval_s:
            raise ParamsConflict("poll_interval_s", f"the first wait ({self.poll_interval_s:g} s) "
                                 f"is longer than poll_max_interval_s "
                                 f"({self.poll_max_interval_s:g} s)")
        return self


class OpenAIParams(Section):
    """The OpenAI-compatible backend: server, key variable, concurrency, retries, image
    encoding, prices and Batch API mode. The key itself never appears here."""

    base_url: str = run_setting(
        "", pattern=r"^(https?://.*)?$", description="any OpenAI-compatible server (vLLM, "
        "SGLang, Ollama, ...); empty = the environment variable OPENAI_BASE_URL, else "
        "https://api.openai.com/v1 (as the openai client itself)")
    api_key_env: str = run_setting("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="NAME of the environment variable holding the key")
    concurrency: int = run_setting(16, ge=1, le=1024, description="requests in flight at once")
    timeout_s: float = run_setting(60.0, gt=0, le=3600, description="per HTTP attempt")
    max_attempts: int = run_setting(6, ge=1, le=100, description="HTTP attempts per answer")
    backoff_base_s: float = run_setting(1.0, ge=0, le=600, description="full-jitter backoff base")
    backoff_max_s: float = run_setting(60.0, ge=0, le=3600)
    retry_after_max_s: float = run_setting(300.0, ge=0, le=86400,
                                     description="longest Retry-After honoured")
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(90, ge=1, le=100)
    image_detail: Literal["low", "high", "auto"] = "auto"
    prices: dict[str, ModelPrice] = run_setting(
        default_factory=lambda: {
            "gpt-4o-mini": ModelPrice(input_per_mtok=0.15, output_per_mtok=0.60),
            "gpt-4o": ModelPrice(input_per_mtok=2.50, output_per_mtok=10.00),
            "gpt-4.1-mini": ModelPrice(input_per_mtok=0.40, output_per_mtok=1.60),
        }, description="model -> price; a model not listed costs 0 and is flagged")
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = run_setting(
        "max_tokens", description="the request field that carries the token limit: "
        "max_tokens (most servers), or max_completion_tokens (newer OpenAI models, which "
        "refuse max_tokens with HTTP 400); the limit itself is annotate.backend.max_tokens")
    mode: Literal["sync", "batch"] = run_setting(
        "sync", description="sync: chat completions as they come; batch: the Batch API")
    http_client: Literal["auto", "aiohttp", "httpx"] = run_setting(
        "auto", description="transport of the async client: aiohttp costs about a third less "
        "CPU per call than httpx; auto = aiohttp when installed (openai[aiohttp])")
    batch: BatchParams = run_setting(default_factory=BatchParams)

    @model_validator(mode="after")
    def _base_url_parses(self) -> "OpenAIParams":
        if self.base_url:  # empty: OPENAI_BASE_URL or the default, checked when a run starts
            check_server_url(self.base_url, "base_url")
        return self


def check_server_url(url: str, what: str) -> None:
    """Refuse a server URL that is not http(s)://host[:port][/path], with a ValueError naming
    `what` but never repeating the URL (it may hold credentials, user:pass@)."""
    from urllib.parse import urlsplit

    if not re.match(r"^https?://", url):
        raise ValueError(f"{what} is not an http:// or https:// URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError:
        raise ValueError(f"{what} is not a valid URL") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise ValueError(f"{what} is not a valid URL (no host, or a space in it)")


class CacheParams(Section):
    """The response cache: outside build/ so that deleting build/ loses no paid answer."""

    enabled: bool = True
    path: str = ".cache/geopixeld/responses.sqlite"
    busy_timeout_s: float = Field(30.0, gt=0, le=3600,
                                  description="wait for another writer before giving up")


class TransformersParams(Section):
    """The transformers backend: a local multimodal model (Qwen2.5-VL-style) on a GPU, each
    image's prefix computed once for all prompts on it, several patches per forward batch.
    Output cleaning and its re-asks are annotate.backend's, as for every backend."""

    model_path: str = Field("", description="local model folder or hub id "
                            "(empty = annotate.backend.model)")
    device: str = run_setting("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto = cuda when available, else cpu")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto = bfloat16 on a GPU, float32 on the CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = run_setting("sdpa")
    batch_size: int = run_setting(64, ge=1, le=4096, description="prompts per forward batch (the "
                            "prompts of several patches; each image's prefix computed once)")
    max_pixels: Optional[int] = Field(
        None, ge=3136, description="largest image (pixels) the image processor keeps, larger "
        "ones are downscaled (null = the processor's own setting)")
    repetition_penalty: Optional[float] = Field(
        None, gt=0, le=10, description="null = the model's generation config (1.0 if unset)")
    min_new_tokens: int = Field(0, ge=0, le=8192, description="the end token is suppressed "
                                "until this many tokens (benchmarks only; 0 in use)")


class BackendParams(Section):
    """Which annotator answers requests, its generation parameters, and the output cleaning
    every model backend's answers pass (limits, re-asks)."""

    name: Literal["template", "openai", "transformers"] = "template"
    model: str = "template-v2"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: int = 0
    max_tokens_by_kind: dict[str, int] = Field(
        default_factory=lambda: {"instance_batch": 1024, "compose": 1024},
        description="max_tokens for these request kinds (answers longer than one pass's)")
    max_sentences: dict[str, int] = Field(
        default_factory=lambda: {"holistic": 4, "instance": 1, "cluster": 1},
        description="sentences kept per request kind (the paper's prompts ask 4, 1, 1)")
    max_chars: dict[str, int] = Field(
        default_factory=lambda: {"holistic": 1000, "instance": 300, "cluster": 300},
        description="longer cleaned answers are refused")
    min_words: int = Field(3, ge=1, le=100, description="shorter cleaned answers are refused")
    clean_retries: int = Field(2, ge=0, le=10,
                               description="re-asks of an answer that fails output cleaning")
    clean_retry_temperature: float = Field(
        0.7, gt=0, le=2, description="least temperature of a re-ask (its seed is seed + k), so "
        "that it does not repeat the refused answer (greedy decoding would)")
    openai: OpenAIParams = Field(default_factory=OpenAIParams)
    transformers: TransformersParams = Field(default_factory=TransformersParams)

    @model_validator(mode="after")
    def _answers_can_pass_cleaning(self) -> "BackendParams":
        # limits under which output cleaning would refuse every answer of a kind
        for kind, most in self.max_sentences.items():
            if most < 1:
                raise ValueError(f"max_sentences.{kind} ({most}) must be at least 1: cleaning "
                                 f"would refuse every {kind} answer")
        # the shortest answer of min_words words: one-letter words, spaces, a full stop
        shortest = 2 * self.min_words
        for kind, most in self.max_chars.items():
            if most < shortest:
                raise ValueError(f"max_chars.{kind} ({most}) is below what min_words "
                                 f"({self.min_words}) needs ({shortest} characters): cleaning "
                                 f"would refuse every {kind} answer")
        for kind, most in self.max_tokens_by_kind.items():
            if most < 1:
                raise ValueError(f"max_tokens_by_kind.{kind} ({most}) must be at least 1")
        return self

    @model_validator(mode="after")
    def _answers_fit_max_tokens(self) -> "BackendParams":
        # a model backend's prose answers need a token per word
        if self.name == "template":
            return self
        for kind in ("holistic", "instance", "cluster"):
            tokens = self.max_tokens_for(kind)
            if tokens < self.min_words:
                where = (f"max_tokens_by_kind.{kind}" if kind in self.max_tokens_by_kind
                         else "max_tokens")
                raise ValueError(f"{where} ({tokens}) is below min_words ({self.min_words}): "
                                 f"every {kind} answer would be cut short and refused")
        return self

    def max_tokens_for(self, kind: str) -> int:
        """The longest answer of a request kind: `max_tokens_by_kind`, else `max_tokens`."""
        return self.max_tokens_by_kind.get(kind, self.max_tokens)


class AnnotateParams(Section):
    backend: BackendParams = Field(default_factory=BackendParams)
    cache: CacheParams = run_setting(default_factory=CacheParams)
    max_failed_share: float = run_setting(
        0.0, ge=0, le=1, description="share of a pass's requests that may still fail after "
        "their retries before the stage fails (exit 3; answers already paid for stay in the "
        "cache and the next run asks only the failed ones): 0 = any failure fails the stage. "
        "The same rule for every backend")


class ComposeParams(Section):
    """Composition of the three passes into one paragraph, and record validation."""

    min_caption_chars: int = Field(40, ge=0)
    max_caption_chars: int = Field(2500, ge=1)
    max_phrases: int = Field(40, ge=1)
    require_phrases: bool = Field(True, description="drop tiles whose caption grounds nothing")
    group_instances: bool = Field(
        True, description="same-category instances at one position with the same description "
        "share one sentence: '<p> ship-2 </p> [SEG] , and <p> ship-3 </p> [SEG] ...'")
    seed: int = 0
    composer: Literal["deterministic", "llm"] = Field(
        "deterministic", description="llm: a language model writes the paragraph (as the paper "
        "did); any failure falls back to the deterministic composer, counted in the report")
    llm_backend: Optional[BackendParams] = Field(
        None, description="backend of the llm composer (null = annotate.backend)")
    llm_prompt_version: str = "v1"
    llm_with_image: bool = Field(False, description="send the tile's image with the compose "
                                 "prompt (false: text only, for a text-only LLM)")
    max_dropped_share: float = run_setting(
        0.75, ge=0, le=1, description="share of the tiles with objects that may end without a "
        "record (dropped: failed answers, validation) before the stage fails (exit 2) and keeps "
        "the previous records")

    @model_validator(mode="after")
    def _captions_can_pass(self) -> "ComposeParams":
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"min_caption_chars ({self.min_caption_chars}) is above "
                             f"max_caption_chars ({self.max_caption_chars}): every record "
                             "would be dropped")
        return self


class ReviewParams(Section):
    """Human review: where the decisions are, and whether records nobody reviewed go on."""

    decisions: str = Field("reviews/decisions.jsonl",
                           description="JSONL of review decisions (committed: decisions are data)")
    export_unreviewed: bool = Field(True, description="pass records nobody reviewed on to "
                                    "export; false = export only accepted and edited ones")


class ExportParams(Section):
    """Export: Parquet, COCO and the GeoPixel layout, and the instruction each record asks."""

    records_per_shard: int = Field(256, ge=1, le=100_000)
    instruction_list: str = Field(
        "v1", description="version of the grounded-description instructions, "
        "prompts/instructions/<version>.txt")
    instruction: Union[int, str] = Field(
        "", validation_alias=AliasChoices("instruction", "geopixel_question"),
        description="the human turn of every exported record: \"\" = one instruction per "
        "record from instruction_list, chosen by its record id (the same on every run); a "
        "number n = the list's n-th instruction for all records; any other text = that text "
        "for all (read from the former key geopixel_question too)")
    geopixel_prefix: str = "data/GeoPixelD"
    split_names: dict[SafeName, SafeName] = Field(
        default_factory=lambda: {"train": "train", "val": "test", "test": "unlabeled"},
        description="our split -> GeoPixel layout folder (GeoPixelD's test came from iSAID val)")
    geopixel_train_folder: SafeName = Field(
        "train", description="layout folder whose samples form GeoPixelD.json, the training list "
                             "named in data.txt; any other folder F gets GeoPixelD_F.json")
    row_group_size: int = Field(
        100, ge=1, le=100_000, description="Parquet rows per row group (~100 suits image rows)")

    @model_validator(mode="before")
    @classmethod
    def _one_instruction_key(cls, data: object) -> object:
        if isinstance(data, dict) and {"instruction", "geopixel_question"} <= data.keys():
            raise ParamsConflict("geopixel_question", "the former name of instruction: give "
                                 "one of the two")
        return data

    @field_validator("instruction", mode="plain")
    @classmethod
    def _instruction_choice(cls, value: object) -> int | str:
        # "", a number in the list (from 1), or a text checked like every text of a sample
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{_shown(value)} is neither \"\", an instruction number nor a "
                             "text")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"{value} is not an instruction number (they count from 1)")
            return value
        return value if value == "" else _plain_text(value)

    @field_validator("instruction_list")
    @classmethod
    def _known_list(cls, value: str) -> str:
        if value not in prompts.instruction_versions():
            raise ValueError(f"{_shown(value)} is not an instruction list; available: "
                             f"{', '.join(prompts.instruction_versions())} "
                             "(prompts/instructions/*.txt)")
        return value

    @model_validator(mode="after")
    def _instruction_in_list(self) -> "ExportParams":
        texts = prompts.instructions(self.instruction_list)
        for n, text in enumerate(texts, 1):
            try:
                _plain_text(text)
            except ValueError as exc:
                raise ParamsConflict("instruction_list", f"instruction {n} of list "
                                     f"{self.instruction_list} {exc}") from None
        count = len(texts)
        if isinstance(self.instruction, int) and self.instruction > count:
            raise ParamsConflict("instruction", f"instruction {self.instruction}: list "
                                 f"{self.instruction_list} has instructions 1 to {count}")
        return self

    def instruction_for(self, record_id: str) -> prompts.Instruction:
        """The instruction a record asks (`instruction`): its own pick from the list, the
        list's instruction n, or the one text given."""
        if self.instruction == "":
            return prompts.pick_instruction(record_id, self.instruction_list)
        if isinstance(self.instruction, int):
            return prompts.numbered_instruction(self.instruction, self.instruction_list)
        return prompts.Instruction("custom", self.instruction)


class QAParams(Section):
    """Quality report: metrics/qa.json, DVC plots and the HTML report of tiles over masks."""

    tiles_per_page: int = Field(50, ge=1, le=1000, description="tiles on one HTML report page")
    max_tiles: Optional[int] = Field(
        None, ge=1, description="tiles shown in the HTML report, first in shard order, each "
        "shard's share going to its records with failed claims first (null = all); the metrics "
        "and the claims file always cover every record")
    thumbnail_size: int = Field(512, ge=64, le=4096,
                                description="longest side (px) of a tile image in the report")
    jpeg_quality: int = Field(75, ge=1, le=100, description="JPEG quality of report images")
    mask_alpha: float = Field(0.45, ge=0, le=1, description="opacity of a phrase's mask fill")
    contour_thickness: int = Field(1, ge=0, le=8, description="px of a mask's outline (0 = none)")
    caption_bin_chars: int = Field(100, ge=1, le=10_000,
                                   description="bin width of the caption length histogram")
    reference_splits: dict[SafeName, SafeName] = Field(
        default_factory=lambda: {"train": "train", "val": "test"},
        description="our split -> the GeoPixelD split its figures are compared with "
                    "(GeoPixelD's test came from iSAID val)")
    claim_colour_delta_e: float = Field(
        25.0, ge=0, le=200, description="a colour word fits an instance whose median colour "
        "the namer names so, or lies within this CIELAB distance (CIE76 delta E) of the word's "
        "reference colour (about the step between two neighbouring greys of the namer)")
    claim_size_tolerance: float = Field(
        1.25, ge=1, le=10, description="a size word fits when the instance's area ratio lies in "
        "the word's band widened by this factor on each side")
    claim_group_share: float = Field(
        0.5, gt=0, le=1, description="a group phrase's position, single colour or size word "
        "agrees when at least this share of its instances fit it")
    fivegram_top: int = Field(5, ge=0, le=100,
                              description="most repeated word five-grams listed per split")
    fivegram_share: float = Field(
        0.3, gt=0, le=1, description="a five-gram in more than this share of a split's "
        "captions counts as boilerplate (qa.json by_split.<split>.frequent_fivegrams)")


class ImageryParams(Section):
    """New imagery (`geopixeld annotate`): reading, 8-bit conversion, nodata, labels, polygons.
    Tiles are cut with prepare.tile_size, prepare.stride, prepare.tiles_per_shard and
    prepare.on_error; PNG and JPEG are decoded whole under prepare.max_image_pixels."""

    split: str = Field("train", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                       description="split the new tiles go to (a key of export.split_names)")
    bands: Optional[list[int]] = Field(
        None, min_length=1, max_length=3,
        description="1-based bands read as R, G, B (one band = grey); null: 1 band = grey, "
                    "3 or 4 bands = 1, 2, 3, any other count is refused")
    stretch: Literal["percentile", "none"] = Field(
        "percentile", description="how imagery that is not 8-bit becomes 8-bit: per-band "
        "percentile stretch over the scene, or scaling by the integer type's range")
    stretch_uint8: bool = Field(False, description="stretch 8-bit imagery too")
    percentile_low: float = Field(2.0, ge=0, lt=100)
    percentile_high: float = Field(98.0, gt=0, le=100)
    stretch_sample_pixels: int = Field(
        1_000_000, ge=1024, description="pixels of the decimated read the percentiles come from")
    nodata: Optional[float] = Field(None, description="nodata value for files that declare none")
    max_nodata_share: float = Field(0.5, ge=0, le=1,
                                    description="tiles with more nodata than this are skipped")
    max_scene_pixels: int = Field(
        10_000_000_000, ge=1, description="largest TIFF/GeoTIFF (read by windows, not whole)")
    gdal_cache_mb: int = Field(64, ge=1, le=65536,
                               description="GDAL block cache while reading TIFF (bounds memory)")
    min_label_area: float = Field(
        1.0, ge=0, description="label boxes/polygons of at most this many px² are degenerate: "
        "skipped and counted")
    keep_difficult: bool = Field(True, description="keep DOTA objects flagged difficult")
    category_property: str = Field(
        "category", description="GeoJSON feature property naming the category (absent: the "
        "object's category is unknown)")
    geojson_crs: Optional[str] = Field(
        None, description="CRS of GeoJSON labels without a 'crs' member (null: WGS 84, RFC 7946)")
    polygon_tolerance_px: float = Field(
        0.5, ge=0, description="simplification of the georeferenced phrase polygons, in pixels")
    output_crs: Literal["wgs84", "scene"] = Field(
        "wgs84", description="CRS of the georeferenced outputs (export/geojson, "
        "export/geoparquet, the parquet geometry column): wgs84 = WGS 84 lon/lat (EPSG:4326; "
        "GeoJSON as RFC 7946, no crs member); scene = the CRS of each split's first "
        "georeferenced tile (GeoJSON names it in the legacy crs member)")

    @model_validator(mode="after")
    def _check(self) -> "ImageryParams":
        if self.bands is not None:
            if len(self.bands) not in (1, 3) or min(self.bands) < 1:
                raise ValueError("bands: one band (grey) or three (R, G, B), numbered from 1")
        if self.percentile_low >= self.percentile_high:
            raise ValueError("percentile_low must be below percentile_high")
        return self


class SamParams(Section):
    """Segment-anything masks for new imagery (--masks sam, --masks dota DIR).
    sam: the automatic mask generator per tile; dota: box prompts, one encoding per tile."""

    checkpoint: Optional[str] = Field(None, description="SAM checkpoint (.pth); needed for "
                                      "--masks sam and --masks dota")
    model_type: str = Field("vit_h", description="vit_h, vit_l or vit_b (matching the checkpoint)")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    points_per_side: int = Field(32, ge=1, le=256)
    points_per_batch: int = Field(64, ge=1, le=4096)
    pred_iou_thresh: float = Field(0.88, ge=0, le=1)
    stability_score_thresh: float = Field(0.95, ge=0, le=1)
    box_nms_thresh: float = Field(0.7, ge=0, le=1)
    crop_n_layers: int = Field(0, ge=0, le=4)
    min_mask_region_area: int = Field(0, ge=0, description="SAM's hole/island clean-up (px)")
    min_area: int = Field(50, ge=0, description="automatic masks of fewer px are dropped")
    max_area_share: float = Field(
        0.25, gt=0, le=1, description="automatic masks covering more of the tile are dropped")
    max_overlap: float = Field(
        0.5, ge=0, le=1, description="an automatic mask with more than this share of its area "
        "under masks kept before it (best predicted IoU first) is dropped")
    max_objects_per_tile: int = Field(200, ge=1, le=10_000)
    box_batch: int = Field(64, ge=1, le=4096, description="box prompts per predict_torch call")
    clip_to_box: bool = Field(True, description="cut a box-prompted mask to its oriented box")
    empty_box_fallback: Literal["polygon", "drop"] = Field(
        "polygon", description="a box whose SAM mask is empty: keep its polygon, or drop it")


class FinetuneParams(Section):
    """GeoPixel-style fine-tuning: a multimodal LM + [SEG] + SAM mask decoder, LoRA."""

    base_model_path: str = Field(
        "", description="AutoModelForImageTextToText folder (or hub id), e.g. a Qwen2.5-VL "
        "Instruct model; empty = the finetune stage is skipped")
    sam_checkpoint_path: str = Field("", description="segment-anything weights (.pth)")
    sam_model_type: Literal["vit_h", "vit_l", "vit_b", "custom"] = Field(
        "vit_h", description="SAM shape; custom = read sam_config.json beside the weights")
    splits: list[SafeName] = Field(default_factory=lambda: ["train"], min_length=1,
                                   description="export splits trained on")
    question: PlainText = Field(
        "Could you perform an in-depth analysis of this photo, including interleaved "
        "segmentation masks to map each part of your answer to specific image object?",
        description="the user turn of every sample (GeoPixelD's question); with "
        "record_instructions, only of samples that carry no instruction, and always the "
        "question asked when predicting for evaluation")
    record_instructions: bool = Field(
        True, description="train on each record's own instruction (the export's `instruction` "
        "column, varied per record as GeoPixelD and GLaMM's GCG data are); false = `question` "
        "for every sample")
    seg_token: str = SEG
    max_answer_tokens: int = Field(
        1536, ge=8, le=65536, description="longer captions are cut; [SEG]s cut off lose "
        "their masks")
    epochs: int = Field(3, ge=1, le=10_000)
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = as many as epochs give")
    lr: float = Field(3e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="after warm-up: decay to 0 at the last step, or constant")
    warmup_steps: int = Field(100, ge=0)
    batch_size: int = Field(2, ge=1, le=1024, description="samples per micro-batch")
    grad_accum: int = Field(10, ge=1, le=1024, description="micro-batches per optimizer step")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = none")
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="language-model attention projections given LoRA (never the vision tower)")
    ce_weight: float = Field(1.0, ge=0, description="loss = ce_weight*CE + bce_weight*BCE + "
                             "dice_weight*Dice (GeoPixel: 1.0, 2.0, 0.5)")
    bce_weight: float = Field(2.0, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto = cuda when available")
    bf16: bool = Field(True, description="bf16 weights + autocast on CUDA (float32 on CPU)")
    gradient_checkpointing: bool = Field(True, description="on CUDA only")
    num_workers: int = Field(2, ge=0, le=64, description="data loader processes")
    save_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    work_dir: str = Field(
        ".cache/geopixeld/finetune", description="resumable checkpoints, one folder per run "
        "(params + data); outside build/ so a killed run resumes")


class EvaluateParams(Section):
    """RS-GCG evaluation (GLaMM's GCG metrics) of a fine-tuned checkpoint or a predictions file."""

    split: SafeName = Field("val", description="export split scored (GeoPixelD's test = iSAID "
                            "val)")
    text_encoder: Literal["bert", "bag-of-words"] = Field(
        "bert", description="phrase similarity for Recall; bert = GLaMM's (needs the weights)")
    bert_model_path: str = "bert-base-uncased"
    text_threshold: float = Field(0.5, ge=0, le=1)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    captions: bool = Field(True, description="CIDEr and METEOR (pycocoevalcap, Java)")
    batch_size: int = Field(4, ge=1, le=1024, description="records per generate call")
    max_new_tokens: int = Field(1024, ge=1, le=65536)
    mask_threshold: float = Field(0.0, description="mask logit above which a pixel is in")
    max_records: int = Field(0, ge=0, description="score only the first N records; 0 = all")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    bf16: bool = Field(True, description="bf16 on CUDA (float32 on CPU)")


class RunnerParams(Section):
    scheduler: Optional[str] = Field(None, description="dask.distributed address; None = local")
    local_scheduler: Literal["threads", "processes", "synchronous"] = Field(
        "processes", description="local dask scheduler without a `scheduler` address: "
        "processes (default; pure-Python shard work runs side by side), threads, synchronous")
    workers: int = Field(2, ge=1, le=256)
    model_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="dask cluster only: the worker resources a task "
        "holding a model takes (a model backend's annotate and compose shards, finetune, "
        "evaluate's predictions), e.g. {GPU: 1} for workers started with --resources GPU=1; "
        "{} = any worker")


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    plan: PlanParams = Field(default_factory=PlanParams)
    annotate: AnnotateParams = Field(default_factory=AnnotateParams)
    compose: ComposeParams = Field(default_factory=ComposeParams)
    review: ReviewParams = Field(default_factory=ReviewParams)
    export: ExportParams = Field(default_factory=ExportParams)
    qa: QAParams = Field(default_factory=QAParams)
    runner: RunnerParams = Field(default_factory=RunnerParams)
    imagery: ImageryParams = Field(default_factory=ImageryParams)
    sam: SamParams = Field(default_factory=SamParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        # keys of sections that hold other sections (and the backend classes), checked here
        backends = [("annotate.backend", self.annotate.backend)]
        if self.compose.llm_backend is not None:
            backends.append(("compose.llm_backend", self.compose.llm_backend))
        for key, backend in backends:
            o = backend.openai
            if o.backoff_base_s > o.backoff_max_s:
                raise ParamsConflict(
                    f"{key}.openai.backoff_base_s", f"the backoff base ({o.backoff_base_s:g} s) "
                    f"is larger than backoff_max_s ({o.backoff_max_s:g} s)")
        try:
            _prompt_version(self.compose.llm_prompt_version)
        except ValueError as exc:
            raise ParamsConflict("compose.llm_prompt_version", str(exc)) from None
        return self


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last one
    silently: a value the user believes set would not be the one used)."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_shown(key)} given twice", key_node.start_mark)
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            pass
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def load_params(path: str | Path = DEFAULT_PARAMS, *, required: bool = False) -> Params:
    """Read and validate a params file. A missing file gives the defaults, unless `required`
    (a file the user named); a folder, an unreadable or oversized file, text that is not UTF-8
    or not YAML, and a bad value are each one `BadParamsError` naming the file."""
    path = Path(path)
    if not required and not path.exists() and not path.is_symlink():
        return parse_params({}, path)
    text = read_user_text(path, "params file", max_bytes=MAX_PARAMS_BYTES, error=BadParamsError)
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise BadParamsError(f"not valid YAML ({at}{problem})", path) from None
    except RecursionError:
        raise BadParamsError("not valid YAML (nested too deep)", path) from None
    return parse_params(raw, path)


def parse_params(raw: object, path: str | Path = DEFAULT_PARAMS,
                 options: Optional[Mapping[str, str]] = None) -> Params:
    """Validate parsed params (a mapping of sections). `path` is the file they came from and
    `options` the keys command-line options set ({dotted key: option}): a bad value is a
    `BadParamsError` naming the option that set it, else the file; the sections carry both."""
    source, options = str(path), dict(options or {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadParamsError(f"not a mapping of sections (it holds a {type(raw).__name__})",
                             source)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        key, message = _described(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BadParamsError(f"{key}: {message}{more}" if key else message + more,
                             _blamed(key, source, options)) from None
    _stamp(params, Origin(source, options))
    return params


def override_params(params: Params, overrides: Mapping[str, tuple[str, object]]) -> Params:
    """`params` with keys replaced by command-line options, {dotted key: (option, value)}
    (None values are left out). A bad value is blamed on its option, not on the file."""
    given = {k: ov for k, ov in overrides.items() if ov[1] is not None}
    if not given:
        return params
    raw = params.model_dump(mode="json")
    for dotted, (_, value) in given.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    origin = params._origin
    return parse_params(raw, origin.file,
                        {**origin.options, **{k: option for k, (option, _) in given.items()}})


def _described(err: Mapping) -> tuple[str, str]:
    """(dotted key, message) of one pydantic error: a validator's own words, the value given
    for a type error, "unknown key" for a key no section has."""
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamsConflict):
        return ".".join(loc + [cause.key]), cause.message
    if isinstance(cause, ValueError):
        return ".".join(loc), str(cause)
    if err["type"] == "extra_forbidden":
        known = _field_names(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1) if loc else []
        hint = f"; did you mean {close[0]}?" if close else ""
        return ".".join(loc), f"unknown key (no such parameter here{hint})"
    message = err["msg"]
    value = err.get("input")
    if err["type"] != "missing":
        shown = f"a {type(value).__name__}" if isinstance(value, (dict, list, tuple)) else (
            f"{_shown(value)}, {type(value).__name__}")
        message += f" (got {shown})"
    return ".".join(loc), message


def _field_names(loc: list[str]) -> list[str]:
    """The parameter names of the section at `loc` (empty where `loc` is not a section)."""
    model: object = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        args = [a for a in typing.get_args(model) if isinstance(a, type)]
        if not (isinstance(model, type) and issubclass(model, Section)):
            model = next((a for a in args if issubclass(a, Section)), None)
    return list(getattr(model, "model_fields", {}))


def _blamed(key: str, file: str, options: Mapping[str, str]) -> str:
    """What a message about `key` names: the option that set it (or a key inside it), the
    option together with the file when a check over a whole section failed after the option
    changed part of it, else the file."""
    for dotted, option in options.items():
        if key == dotted or key.startswith(dotted + "."):
            return option
    inside = [option for dotted, option in options.items()
              if not key or dotted.startswith(key + ".")]
    if inside:
        return f"{', '.join(sorted(set(inside)))} (with {file})"
    return file


def _stamp(section: Section, origin: Origin, prefix: str = "") -> None:
    """Give `section` and every section inside it the origin of the values they were read
    from, with their own dotted key."""
    section._origin = Origin(origin.file, origin.options, prefix)
    for name in type(section).model_fields:
        value = getattr(section, name)
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Section):
            _stamp(value, origin, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, Section):
                    _stamp(v, origin, f"{key}.{k}")


def params_hash(*sections: Section) -> str:
    """Hash of the parameter sections that shaped a record (goes into its provenance)."""
    h = hashlib.sha256()
    for s in sections:
        h.update(type(s).__name__.encode())
        h.update(s.digest().encode())
    return h.hexdigest()[:16]


def to_yaml(params: Section, indent: int = 0) -> str:
    """`params.yaml` text for `params`, each key commented with its field description."""
    pad = " " * indent
    lines: list[str] = []
    for name, field in type(params).model_fields.items():
        value = getattr(params, name)
        note = "[run setting] " if type(params).is_run_setting(name) else ""
        if field.description or note:
            lines.append(f"{pad}# {note}{field.description or ''}".rstrip())
        if isinstance(value, Section):
            if value.__doc__ and indent == 0:
                lines.append(f"{pad}# {value.__doc__.strip().splitlines()[0]}")
            lines.append(f"{pad}{name}:")
            lines.append(to_yaml(value, indent + 2).rstrip("\n"))
        else:
            dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=1 << 16,
                                    sort_keys=False).strip()
            if dumped.endswith("\n..."):
                dumped = dumped[: -len("\n...")]
            dumped = dumped.removesuffix("...").strip()
            lines.append(f"{pad}{name}: {dumped}")
    return "\n".join(lines) + "\n"


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


HEADER = ("# Parameters of every stage. Generated from the defaults in pipeline/core/params.py\n"
          "# (python -m pipeline.core.params > params.yaml); each stage reads only its own section.\n"
          "# A [run setting] changes only speed, cost or where a stage runs, never what it writes:\n"
          "# it is left out of every record's params_hash and of the stages' DVC params, so\n"
          "# changing it re-runs nothing.\n")

if __name__ == "__main__":
    print(HEADER + to_yaml(Params()), end="")
