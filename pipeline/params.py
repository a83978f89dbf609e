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
    coco_json: Optional[str] = Field(default=None, description="annotation file for source=coco")


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


class PlanParams(Section):
    """Positional and category priors, instance vs cluster split, set-of-marks."""

    grid: int = Field(3, ge=1, le=9, description="positional prior grid (3 = the paper's 3x3)")
    max_marks_per_tile: int = Field(10, ge=0, le=99)
    min_mark_area: int = Field(25, ge=0, description="objects smaller than this are never marked alone")
    cluster_min_count: int = Field(6, ge=2, description="a category with at least this many objects in a tile is clustered")
    cluster_max_area: int = Field(4000, ge=0, description="objects larger than this (px) are marked, not clustered")
    cluster_min_members: int = Field(3, ge=2, description="fewest objects a grid region needs to form a cluster")
    cluster_grids: list[str] = Field(default_factory=lambda: ["3x3", "2x2", "1x2"], min_length=1)
    cluster_info: list[tuple[int, str]] = Field(
        default_factory=lambda: [(20, "numerous"), (10, "many"), (5, "several"), (2, "a few")],
        description="(at least this many members, word), first match wins")
    prompt_version: str = "v1"
    marks: MarkParams = Field(default_factory=MarkParams)


class BackendParams(Section):
    """Which annotator answers requests, and its generation parameters."""

    name: Literal["template", "openai", "transformers"] = "template"
    model: str = "template-v1"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(128, ge=1, le=8192)
    seed: int = 0


class AnnotateParams(Section):
    backend: BackendParams = Field(default_factory=BackendParams)


class ComposeParams(Section):
    """Composition of the three passes into one paragraph, and record validation."""

    min_caption_chars: int = Field(40, ge=0)
    max_caption_chars: int = Field(2500, ge=1)
    max_phrases: int = Field(40, ge=1)
    require_phrases: bool = Field(True, description="drop tiles whose caption grounds nothing")
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
