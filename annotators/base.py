"""The one backend interface every annotator implements, and the registry that picks one.

`annotate(requests, context)` answers every request with one `Response` (status "ok" with text,
or "failed" with the error): never raises for a single bad request, never drops one. Batching,
concurrency and retries live inside the backend.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

from pipeline.core.params import BackendParams, CacheParams
from schemas import Request, Response, Tile, TilePlan


@dataclass(frozen=True)
class AnnotationContext:
    """What a backend may look at besides the request: the tiles (pixels and masks), every
    image a request names, by sha256 (PNG bytes), and the tiles' plans (with the measurements
    the template backend states). A backend whose `needs_pixels` is False is handed no tiles
    when every plan holds its measurements."""

    tiles: Mapping[str, Tile]
    images: Mapping[str, bytes] = field(default_factory=dict)
    plans: Mapping[str, TilePlan] = field(default_factory=dict)

    def image(self, sha: str) -> bytes:
        if sha in self.images:
            return self.images[sha]
        for tile in self.tiles.values():
            if tile.image_sha256 == sha:
                return tile.image_png
        raise KeyError(f"no image with sha256 {sha}")


@runtime_checkable
class Backend(Protocol):
    name: str
    model: str

    def annotate(self, requests: Sequence[Request],
                 context: AnnotationContext) -> list[Response]: ...


# backend name -> "module:factory"; modules are imported only when chosen, so the template
# backend never imports torch or openai.
REGISTRY: dict[str, str] = {
    "template": "annotators.template:TemplateBackend",
    "openai": "annotators.openai_backend:OpenAIBackend",
    "transformers": "annotators.transformers_backend:TransformersBackend",
}


def get_backend(params: BackendParams, cache: CacheParams | None = None) -> Backend:
    """Build the backend `params.name` names. Backends that pay per call take a `cache`
    argument and get the response cache `cache` describes; free ones (template) get none."""
    try:
        target = REGISTRY[params.name]
    except KeyError:
        raise ValueError(f"unknown backend {params.name!r}; known: {sorted(REGISTRY)}") from None
    module, name = target.split(":")
    factory = getattr(importlib.import_module(module), name)
    if cache is not None and "cache" in inspect.signature(factory).parameters:
        from annotators.cache import ResponseCache

        return factory(params, cache=ResponseCache.from_params(cache))
    return factory(params)


def local_scheduler_for(backend: Backend, local_scheduler: str) -> str:
    """The local dask scheduler for shards a backend answers: threads for a backend that holds
    a model in memory (`loads_model`: loaded once per process, so worker processes would each
    load it), else `local_scheduler` (runner.local_scheduler)."""
    if getattr(backend, "loads_model", False) and local_scheduler == "processes":
        return "threads"
    return local_scheduler
