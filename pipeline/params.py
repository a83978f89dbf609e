"""Parameters: one pydantic model per `params.yaml` section, defaults equal to the file's.

Each stage reads only its own section (and DVC tracks exactly those keys). Out-of-range values
raise `BadParamsError` naming `params.yaml` and the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import BadParamsError

OnError = Literal["raise", "skip"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Stable hash of the section's values."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DataParams(Section):
    """Where the source imagery is and which splits to build."""

    source: Literal["isaid", "coco"] = "isaid"
    root: str = "data/isaid"
    splits: list[str] = Field(default_factory=lambda: ["train", "val", "test"], min_length=1)
    coco_json: Optional[str] = Field(
        default=None, description="annotation file for source=coco, relative to root; "
        "'{split}' is replaced by the split name")
    coco_images: str = Field(
        "{split}", description="image folder for source=coco, relative to root; "
        "'{split}' is replaced by the split name")
    unlabeled_splits: list[str] = Field(
        default_factory=lambda: ["test"],
        description="iSAID splits that have images only (tiles without objects)")


class PrepareParams(Section):
    """Tiling and instance extraction. Defaults reproduce the iSAID devkit exactly."""

    tile_size: int = Field(800, ge=32, le=8192)
    stride: int = Field(600, ge=1, le=8192)
    skip_images: list[str] = Field(default_factory=lambda: ["P1527", "P1530"])
    min_instance_area: int = Field(10, ge=0, description="instances of <= this many px dropped")
    min_contour_points: int = Field(2, ge=0, description="any contour of <= this many points drops the instance")
    max_image_pixels: int = Field(250_000_000, ge=1, description="decompression-bomb limit")
    png_compression: int = Field(1, ge=0, le=9)
    tiles_per_shard: int = Field(64, ge=1, le=100_000)
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
    png_compression: int = Field(1, ge=0, le=9, description="zlib level of the set-of-marks PNG")
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
    cluster_info: list[tuple[int, str]] = Field(
        default_factory=lambda: [(20, "numerous"), (10, "many"), (5, "several"), (2, "a few")],
        description="(at least this many members, word), first match wins")
    prompt_version: str = "v1"
    marks: MarkParams = Field(default_factory=MarkParams)


class ModelPrice(Section):
    """A model's price in USD per million tokens (check your provider's price list)."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class OpenAIParams(Section):
    """The OpenAI-compatible backend: server, key variable, concurrency, retries, image
    encoding, prices and output cleaning limits. The key itself never appears here."""

    base_url: str = Field("https://api.openai.com/v1", pattern=r"^https?://",
                          description="any OpenAI-compatible server (vLLM, SGLang, Ollama, ...)")
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                             description="NAME of the environment variable holding the key")
    concurrency: int = Field(16, ge=1, le=1024, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per HTTP attempt")
    max_attempts: int = Field(6, ge=1, le=100, description="HTTP attempts per answer")
    backoff_base_s: float = Field(1.0, ge=0, le=600, description="full-jitter backoff base")
    backoff_max_s: float = Field(60.0, ge=0, le=3600)
    retry_after_max_s: float = Field(300.0, ge=0, le=86400,
                                     description="longest Retry-After honoured")
    clean_retries: int = Field(2, ge=0, le=10,
                               description="re-asks of an answer that fails output cleaning")
    clean_retry_temperature: float = Field(
        0.7, ge=0, le=2, description="least temperature of a re-ask (its seed is seed + k), so "
        "that it does not repeat the refused answer")
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(90, ge=1, le=100)
    image_detail: Literal["low", "high", "auto"] = "auto"
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: {
            "gpt-4o-mini": ModelPrice(input_per_mtok=0.15, output_per_mtok=0.60),
            "gpt-4o": ModelPrice(input_per_mtok=2.50, output_per_mtok=10.00),
            "gpt-4.1-mini": ModelPrice(input_per_mtok=0.40, output_per_mtok=1.60),
        }, description="model -> price; a model not listed costs 0 and is flagged")
    max_sentences: dict[str, int] = Field(
        default_factory=lambda: {"holistic": 4, "instance": 1, "cluster": 1},
        description="sentences kept per request kind (the paper's prompts ask 4, 1, 1)")
    max_chars: dict[str, int] = Field(
        default_factory=lambda: {"holistic": 1000, "instance": 300, "cluster": 300},
        description="longer cleaned answers are refused")
    min_words: int = Field(3, ge=1, le=100, description="shorter cleaned answers are refused")


class CacheParams(Section):
    """The response cache: outside build/ so that deleting build/ loses no paid answer."""

    enabled: bool = True
    path: str = ".cache/geopixeld/responses.sqlite"
    busy_timeout_s: float = Field(30.0, gt=0, le=3600,
                                  description="wait for another writer before giving up")


class BackendParams(Section):
    """Which annotator answers requests, and its generation parameters."""

    name: Literal["template", "openai", "transformers"] = "template"
    model: str = "template-v1"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: int = 0
    openai: OpenAIParams = Field(default_factory=OpenAIParams)


class AnnotateParams(Section):
    backend: BackendParams = Field(default_factory=BackendParams)
    cache: CacheParams = Field(default_factory=CacheParams)


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


class ExportParams(Section):
    records_per_shard: int = Field(256, ge=1, le=100_000)
    geopixel_question: str = (
        "Could you perform an in-depth analysis of this photo, including interleaved "
        "segmentation masks to map each part of your answer to specific image object?")
    geopixel_prefix: str = "data/GeoPixelD"
    split_names: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "val": "test", "test": "unlabeled"},
        description="our split -> GeoPixel layout folder (GeoPixelD's test came from iSAID val)")
    geopixel_train_folder: str = Field(
        "train", description="layout folder whose samples form GeoPixelD.json, the training list "
                             "named in data.txt; any other folder F gets GeoPixelD_F.json")
    row_group_size: int = Field(
        100, ge=1, le=100_000, description="Parquet rows per row group (~100 suits image rows)")


class RunnerParams(Section):
    scheduler: Optional[str] = Field(None, description="dask.distributed address; None = local")
    local_scheduler: Literal["threads", "processes", "synchronous"] = "threads"
    workers: int = Field(2, ge=1, le=256)


class Params(Section):
    data: DataParams = Field(default_factory=DataParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    plan: PlanParams = Field(default_factory=PlanParams)
    annotate: AnnotateParams = Field(default_factory=AnnotateParams)
    compose: ComposeParams = Field(default_factory=ComposeParams)
    export: ExportParams = Field(default_factory=ExportParams)
    runner: RunnerParams = Field(default_factory=RunnerParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`; a missing file gives the defaults."""
    path = Path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadParamsError(f"not valid YAML ({exc.__class__.__name__})", path) from None
    return parse_params(raw, path)


def parse_params(raw: dict, path: str | Path = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise BadParamsError(f"{key}: {err['msg']}", path) from None


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
        if field.description:
            lines.append(f"{pad}# {field.description}")
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


HEADER = ("# Parameters of every stage. Generated from the defaults in pipeline/params.py\n"
          "# (python -m pipeline.params > params.yaml); each stage reads only its own section.\n")

if __name__ == "__main__":
    print(HEADER + to_yaml(Params()), end="")
