"""The records that flow between stages, and their Arrow schemas.

Every stage reads and writes these types and nothing else: one place defines every column.
Masks are COCO RLE (compressed `counts` string, `size` = [height, width]). Coordinates are
pixels in the tile's frame unless a field says otherwise.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.2"  # 1.1: TilePlan.measurements; 1.2: ObjectInstance.category_id

# The three annotation passes, in the order the paragraph is composed (one definition: every
# stage, the CLI and the prompts use it).
PASSES: tuple[str, ...] = ("holistic", "instance", "cluster")
# GeoPixelD's grounding markup: "<p> phrase </p> [SEG]", the i-th [SEG] being the i-th mask.
PHRASE_OPEN, PHRASE_CLOSE, SEG = "<p>", "</p>", "[SEG]"

RequestKind = Literal["holistic", "instance", "cluster", "instance_batch", "compose"]
PhraseKind = Literal["instance", "cluster"]
ResponseStatus = Literal["ok", "failed"]
ClaimType = Literal["position", "count", "category", "colour", "size"]
ClaimVerdict = Literal["agree", "disagree"]


class Record(BaseModel):
    """Base of every record: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class RLE(Record):
    """COCO run-length encoded mask, as pycocotools writes it (compressed counts)."""

    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    counts: str


class Window(Record):
    """A tile's window in its source image, half-open: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


class ObjectInstance(Record):
    """One ground-truth instance inside a tile."""

    object_id: int = Field(description="instance id in the source (iSAID: R + 256 G + 65536 B)")
    category: str = Field(description="source category name, e.g. 'Small_Vehicle'")
    category_id: Optional[int] = Field(
        default=None, description="the source's own id of the category (iSAID's label id, a "
        "COCO file's category id, a GeoJSON integer class); None where the source has none")
    bbox: list[float] = Field(min_length=4, max_length=4, description="COCO [x, y, w, h]")
    area: int = Field(ge=0, description="pixel count inside the tile")
    mask: RLE


class Tile(Record):
    """A patch the annotators see: image bytes, its window and its instances."""

    tile_id: str
    source: str = Field(description="adapter that produced it: isaid, coco, ...")
    split: str
    image_name: str = Field(description="source image stem, e.g. 'P0003'")
    window: Window
    height: int
    width: int
    image_png: bytes = Field(repr=False, description="the tile as an 8-bit RGB PNG")
    image_sha256: str = Field(description="sha256 of image_png")
    objects: list[ObjectInstance]
    crs: Optional[str] = Field(default=None, description="scene CRS (WKT or EPSG:n), if georeferenced")
    transform: Optional[list[float]] = Field(
        default=None, description="affine (a, b, c, d, e, f) from tile pixels to CRS coordinates")


class Mark(Record):
    """A set-of-marks label drawn on one instance: a numbered square centred at (x, y)."""

    object_id: int
    number: int = Field(ge=1)
    x: int
    y: int
    box: list[int] = Field(min_length=4, max_length=4, description="drawn square [x0, y0, x1, y1)")


class Cluster(Record):
    """A group of same-category instances in one grid region, grounded by one mask."""

    cluster_id: str
    category: str
    grid: str = Field(description="grid that produced the region, e.g. '3x3'")
    region: str = Field(description="positional name of the region, e.g. 'left side'")
    cluster_info: str = Field(description="count word, e.g. 'numerous'")
    object_ids: list[int]


class Request(Record):
    """One annotation call: the exact prompt and the hash of the exact image the model sees."""

    request_id: str
    tile_id: str
    kind: RequestKind
    prompt: str
    prompt_version: str
    image_sha256: str
    object_ids: list[int]
    category: Optional[str] = None
    position: Optional[str] = None
    mark_number: Optional[int] = None
    cluster_id: Optional[str] = None
    bundles: Optional[list[str]] = Field(
        default=None, description="instance_batch only: the ids of the per-mark instance "
        "requests it asks in one call (planned too; their answers are stored one per mark)")


class ObjectMeasurement(Record):
    """One instance measured on its tile's pixels (`pipeline.geometry.measure`): median colour, area and
    minimum-area rectangle, in tile pixels."""

    object_id: int
    category: str
    area: int = Field(ge=1, description="pixels under the mask")
    rgb: list[int] = Field(min_length=3, max_length=3, description="per-channel median colour")
    cx: float = Field(description="mean x of the mask's pixels")
    cy: float = Field(description="mean y of the mask's pixels")
    long: float = Field(description="long side of the minimum-area rectangle, pixels")
    short: float = Field(description="short side of the minimum-area rectangle, pixels")
    angle: float = Field(description="long-axis angle, degrees in [0, 180), 0 = horizontal")


class TileMeasurements(Record):
    """A tile measured once by `plan`: its objects, and per grid cell (row-major) the pixels
    under any object and the ground pixels of each cover class (counted on a regular sample of
    the pixels: `pipeline.geometry.measure.COVER_SAMPLE_STEP`)."""

    image_sha256: str = Field(description="the tile image measured")
    width: int
    height: int
    grid: int = Field(ge=1)
    objects: list[ObjectMeasurement] = Field(description="non-empty objects, in Tile order")
    object_pixels: list[int] = Field(description="pixels under any object, per cell")
    cover_classes: list[str]
    ground_cover: list[list[int]] = Field(description="[cell][class] ground pixels")
    ground_value_mean: float = Field(description="mean HSV value of the ground")
    ground_value_std: float = Field(description="standard deviation of that value")


class TilePlan(Record):
    """What `plan` decided for one tile: marks, clusters and the set-of-marks image."""

    tile_id: str
    split: str
    positions: list[str] = Field(description="3x3 cell name of each object, in Tile.objects order")
    marks: list[Mark]
    clusters: list[Cluster]
    unplanned_object_ids: list[int] = Field(description="objects neither marked nor clustered")
    som_png: Optional[bytes] = Field(default=None, repr=False, description="set-of-marks image")
    som_sha256: Optional[str] = None
    measurements: Optional[TileMeasurements] = Field(
        default=None, description="what the template backend states (None: measure the tile)")


class Usage(Record):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Response(Record):
    """A backend's answer to one Request (or the record of its failure)."""

    request_id: str
    tile_id: str
    kind: RequestKind
    status: ResponseStatus
    text: str = ""
    error: Optional[str] = None
    backend: str
    model: str
    prompt_version: str
    usage: Usage = Usage()
    cost_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = 0
    cached: bool = False
    batch_id: Optional[str] = Field(
        default=None, description="an instance answer of a batched-marks plan: the batch "
        "request's id (answered in one call: its usage, cost, latency and attempts are on the "
        "first mark's answer only)")


class Phrase(Record):
    """A grounded phrase: its text between <p> and </p>, and the mask its [SEG] owns."""

    text: str
    kind: PhraseKind
    category: str
    object_ids: list[int]
    mask: RLE


class Provenance(Record):
    """How a record was made."""

    backend: str
    model: str
    prompt_versions: list[str]
    params_hash: str
    schema_version: str = SCHEMA_VERSION
    pipeline_version: str


ReviewStatus = Literal["unreviewed", "accepted", "edited"]
ReviewDecisionKind = Literal["accept", "reject", "edit"]


class GroundedRecord(Record):
    """A finished GeoPixelD record: caption whose i-th [SEG] owns phrases[i].mask."""

    record_id: str
    tile_id: str
    split: str
    caption: str
    phrases: list[Phrase]
    provenance: Provenance
    review: ReviewStatus = "unreviewed"


class ReviewDecision(Record):
    """A person's decision on one record, tied to the exact content they reviewed."""

    record_id: str
    content_sha256: str = Field(description="hash of the caption and phrases as reviewed")
    decision: ReviewDecisionKind
    caption: Optional[str] = Field(default=None, description="the edited caption (edit only)")
    reviewer: str = ""
    note: str = ""


class DroppedRecord(Record):
    """A tile that did not become a record, and why (counted in stage reports)."""

    tile_id: str
    split: str
    stage: str
    reason: str
    detail: str = ""


class CheckedClaim(Record):
    """One statement of a record's caption about one of its grounded phrases, checked against
    the phrase's masks and the tile's measurements (`pipeline.geometry.claims`; the qa stage
    stores them in `claims.parquet`, the review notebook reads them)."""

    record_id: str
    tile_id: str
    split: str
    phrase: int = Field(ge=0, description="the phrase's index ([SEG] order)")
    phrase_text: str
    type: ClaimType
    words: str = Field(description="the caption's words that make the claim")
    expected: str = Field(description="what the masks and measurements say")
    verdict: ClaimVerdict


# ---------------------------------------------------------------------------------------------
# Arrow schemas, derived from the models above so that the two can never drift apart.

_SCALARS: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bytes: pa.binary(),
    bool: pa.bool_(),
}


def _arrow_type(annotation: object) -> tuple[pa.DataType, bool]:
    """Arrow type of a field annotation, and whether it is nullable."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _arrow_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _arrow_type(args[0])[0], True
    if origin is Literal:
        return pa.string(), False
    if origin is list:
        (item,) = get_args(annotation)
        return pa.list_(_arrow_type(item)[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation))), False
    if annotation in _SCALARS:
        return _SCALARS[annotation], False  # type: ignore[index]
    raise TypeError(f"no Arrow type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a record type (field order = model order)."""
    hints = typing.get_type_hints(model, include_extras=True)
    fields = []
    for name in model.model_fields:
        dtype, nullable = _arrow_type(hints[name])
        fields.append(pa.field(name, dtype, nullable=nullable))
    return pa.schema(fields, metadata={"geopixeld.record": model.__name__,
                                       "geopixeld.schema_version": SCHEMA_VERSION})
