"""Annotation requests and the calls that answer them, shared by the stages that make, ask and
count requests (plan, annotate, compose's LLM composer, qa) without importing one another.

A batched-marks request (kind instance_batch, `plan.batched_marks`) lists in `bundles` the
per-mark instance requests it asks in one call. The plan writes both; a backend is asked either
the batch or, when it answers one mark per call, the per-mark requests; the responses stored
are always one per per-mark request (`Response.batch_id` naming the batch), so that compose
reads one format. A "call" below is what was asked: a request, or a batch with its marks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Sequence

from schemas import Request, Response

__all__ = ["bundled_ids", "by_call", "questions", "request_id"]


def request_id(tile_id: str, kind: str, prompt_version: str, prompt: str, image_sha256: str,
               object_ids: list[int]) -> str:
    """Content id of a request: the same question about the same image gets the same id."""
    blob = json.dumps([tile_id, kind, prompt_version, prompt, image_sha256, list(object_ids)],
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def bundled_ids(requests: Iterable[Request]) -> set[str]:
    """Ids of the per-mark requests that the batched-marks requests among `requests` bundle."""
    return {i for r in requests if r.kind == "instance_batch" for i in r.bundles or ()}


def questions(requests: Sequence[Request], batches: bool = True) -> list[Request]:
    """The requests a backend is asked, in order: with `batches`, every request but the
    per-mark ones a batch bundles; without (a backend that answers one mark per call), every
    request but the batches."""
    if not batches:
        return [r for r in requests if r.kind != "instance_batch"]
    bundled = bundled_ids(requests)
    return [r for r in requests if r.request_id not in bundled]


def by_call(responses: Iterable[Response]) -> list[list[Response]]:
    """Responses grouped by the call they answer, in order of first appearance: the per-mark
    answers of one batched-marks request together (`batch_id`), any other response alone."""
    calls: dict[str, list[Response]] = {}
    for i, r in enumerate(responses):
        calls.setdefault(r.batch_id if r.batch_id is not None else f"\x00{i}", []).append(r)
    return list(calls.values())
