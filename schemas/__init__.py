"""Record types shared by every stage (see `schemas.records`)."""

from schemas.records import (
    PASSES,
    PHRASE_CLOSE,
    PHRASE_OPEN,
    RLE,
    SCHEMA_VERSION,
    SEG,
    Cluster,
    DroppedRecord,
    GroundedRecord,
    Mark,
    ObjectInstance,
    ObjectMeasurement,
    Phrase,
    Provenance,
    Record,
    Request,
    RequestKind,
    Response,
    ReviewDecision,
    ReviewDecisionKind,
    ReviewStatus,
    Tile,
    TileMeasurements,
    TilePlan,
    Usage,
    Window,
    arrow_schema,
)

__all__ = [
    "PASSES", "PHRASE_CLOSE", "PHRASE_OPEN", "RLE", "SCHEMA_VERSION", "SEG", "Cluster", "DroppedRecord", "GroundedRecord", "Mark",
    "ObjectInstance", "ObjectMeasurement", "Phrase", "Provenance", "Record", "Request",
    "RequestKind", "Response", "ReviewDecision", "ReviewDecisionKind", "ReviewStatus",
    "Tile", "TileMeasurements", "TilePlan", "Usage", "Window", "arrow_schema",
]
