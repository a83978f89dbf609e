"""The one backend interface every annotator implements, and the registry that picks one.

`annotate(requests, context)` answers every request with one `Response` (status "ok" with text,
or "failed" with the error): never raises for a single bad request, never drops one. Batching,
concurrency and retries live inside the backend.

What a backend can do is declared on its class (`Backend`'s capability attributes), so that
stages and the registry read it instead of probing: `needs_pixels`, `answers_instance_batch`,
`loads_model`, `shares_request_limit`, `uses_cache`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Mapping, Optional, Sequence

from pipeline.core.params import BackendParams, CacheParams
from schemas import Request, Response, Tile, TilePlan

if TYPE_CHECKING:
    from annotators.answering import BackendStats


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


class Backend(ABC):
    """An annotator: its name and model (recorded in every response), what it can do, and
    `annotate`.

    Capabilities (class attributes, read by the stages and the registry):
      needs_pixels            it looks at the tiles' pixels (False: it states what plan
                              measured, and the stage may skip reading the tiles)
      answers_instance_batch  it answers a batched-marks request (every mark of a patch) in
                              one call; else the stage asks it one mark at a time
      loads_model             it holds a model in memory, loaded once per process: its local
                              shards run in threads of one process
      shares_request_limit    its requests share one run-wide limit (concurrency, a server's
                              rate-limit pause): its local shards run in threads of one process,
                              where one limiter holds for all of them
      uses_cache              it pays for its answers (money or GPU time) and keeps them in the
                              response cache it is built with
    """

    name: ClassVar[str]
    needs_pixels: ClassVar[bool] = True
    answers_instance_batch: ClassVar[bool] = False
    loads_model: ClassVar[bool] = False
    shares_request_limit: ClassVar[bool] = False
    uses_cache: ClassVar[bool] = False

    model: str
    # what the backend did, for the stage's report (None: nothing to report)
    stats: Optional["BackendStats"] = None

    @abstractmethod
    def annotate(self, requests: Sequence[Request],
                 context: AnnotationContext) -> list[Response]: ...


# backend name -> "module:class"; modules are imported only when chosen, so the template
# backend never imports torch or openai.
REGISTRY: dict[str, str] = {
    "template": "annotators.template:TemplateBackend",
    "openai": "annotators.openai_backend:OpenAIBackend",
    "transformers": "annotators.transformers_backend:TransformersBackend",
}


def get_backend(params: BackendParams, cache: CacheParams | None = None) -> Backend:
    """Build the backend `params.name` names. A backend that `uses_cache` gets the response
    cache `cache` describes; free ones (template) get none."""
    try:
        target = REGISTRY[params.name]
    except KeyError:
        raise ValueError(f"unknown backend {params.name!r}; known: {sorted(REGISTRY)}") from None
    module, name = target.split(":")
    backend_class: type[Backend] = getattr(importlib.import_module(module), name)
    if backend_class.uses_cache:
        from annotators.cache import ResponseCache

        made = ResponseCache.from_params(cache) if cache is not None else None
        return backend_class(params, cache=made)  # type: ignore[call-arg]
    return backend_class(params)  # type: ignore[call-arg]


def local_scheduler_for(backend: Backend, local_scheduler: str) -> str:
    """The local dask scheduler for shards a backend answers: threads for a backend that holds
    a model in memory (`loads_model`: loaded once per process, so worker processes would each
    load it) or whose requests share one run-wide limit (`shares_request_limit`: worker
    processes would each have their own), else `local_scheduler` (runner.local_scheduler)."""
    if (backend.loads_model or backend.shares_request_limit) and local_scheduler == "processes":
        return "threads"
    return local_scheduler
