"""Record types shared by every stage (see `schemas.records`)."""

from schemas.records import (
    RLE,
    SCHEMA_VERSION,
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
    "RLE", "SCHEMA_VERSION", "Cluster", "DroppedRecord", "GroundedRecord", "Mark",
    "ObjectInstance", "ObjectMeasurement", "Phrase", "Provenance", "Record", "Request",
    "RequestKind", "Response", "ReviewDecision", "ReviewDecisionKind", "ReviewStatus",
    "Tile", "TileMeasurements", "TilePlan", "Usage", "Window", "arrow_schema",
]
