"""The skeleton every stage runs through: find its inputs, check them, stage its output folder,
map its per-shard task with the run's scheduler, sum what the shards report, write report.json.

    stage = Stage("plan", params, scheduler)           # the scheduler resolved once, here
    shards = stage.shards(tiles_dir, "no tile shards in this folder")
    stage.need(tiles_dir / name, "missing tile shard ...")   # before any work
    with stage.output(out_dir, inputs=[tiles_dir], count_key="tiles") as out:
        results = stage.map(partial(plan_shard, params=params.plan),
                            [(s, out.folder) for s in shards])
        out.report = {..., **stage.total(results)}     # written as out.folder/report.json
    return out.report

The scheduler of a run is, in this order: the `scheduler` given (the CLI's `--scheduler`), the
environment's DASK_SCHEDULER_ADDRESS, params `runner.scheduler`; none of them = local workers
(`runner.local_scheduler`, `runner.workers`). On a dask.distributed cluster the workers may
run in other working directories (or on other machines that mount the same file system):
every relative path in what is shipped to them (the task's arguments and the items, inside
tuples, lists, dicts, dataclasses and `functools.partial`) is made absolute first
(`absolute_paths`); locally nothing is rewritten, so errors name paths as they were given.
A stage that holds a model in memory (`holds_model=True`) asks the cluster for
`runner.model_resources` (e.g. {GPU: 1}: only workers started with `--resources GPU=1` run it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from pipeline.core.errors import EmptyInputError
from pipeline.core.output_folders import REPORT, staged_folder
from pipeline.core.runner import map_shards
from pipeline.core.shards import list_shards, write_json

T = TypeVar("T")
R = TypeVar("R")


def resolve_scheduler(explicit: Optional[str], params: Any) -> Optional[str]:
    """The dask.distributed scheduler address of a run: `explicit` (--scheduler), else
    DASK_SCHEDULER_ADDRESS, else params `runner.scheduler`; None = run locally."""
    return (explicit or os.environ.get("DASK_SCHEDULER_ADDRESS")
            or params.runner.scheduler or None)


def absolute_paths(value: T) -> T:
    """`value` with every relative `Path` in it made absolute (`Path.resolve()`, against this
    process's working directory), looking inside tuples (named ones too), lists, dict values,
    dataclasses and `functools.partial` objects; anything else (strings included) is kept.
    What holds no relative path is returned as is (the same object)."""
    if isinstance(value, PurePath):
        return value if value.is_absolute() else Path(value).resolve()
    if isinstance(value, functools.partial):
        args = absolute_paths(value.args)
        keywords = absolute_paths(value.keywords)
        if args is value.args and keywords is value.keywords:
            return value
        return functools.partial(value.func, *args, **keywords)
    if isinstance(value, tuple):
        items = [absolute_paths(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        items = [absolute_paths(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, dict):
        items = {k: absolute_paths(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in dataclasses.fields(value):
            if f.init:
                old = getattr(value, f.name)
                new = absolute_paths(old)
                if new is not old:
                    changed[f.name] = new
        return dataclasses.replace(value, **changed) if changed else value
    return value


@dataclasses.dataclass
class StagedOutput:
    """The staging folder of a stage's output, and the report to write into it
    (`report.json`) when the block ends without an error (None: no report file)."""

    folder: Path
    report: Optional[dict] = None


@dataclasses.dataclass
class Stage:
    """One run of one stage (see the module docstring).

    `name`: the stage's name, kept in its output folder's marker and used as the progress
    label. `scheduler`: the address given on the command line (or None). `local_scheduler`:
    the local dask scheduler, when the stage needs another than `runner.local_scheduler` (a
    backend holding a model: threads). `holds_model`: its tasks hold a model in memory (they
    ask a cluster for `runner.model_resources`).
    """

    name: str
    params: Any
    scheduler: Optional[str] = None
    local_scheduler: Optional[str] = None
    holds_model: bool = False
    address: Optional[str] = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.address = resolve_scheduler(self.scheduler, self.params)

    # ---- inputs --------------------------------------------------------------------------

    @staticmethod
    def shards(folder: Path, missing: str, split: Optional[str] = None) -> list[Path]:
        """The shards of `folder` (`list_shards`); none is an EmptyInputError(`missing`)."""
        found = list_shards(Path(folder), split) if split else list_shards(Path(folder))
        if not found:
            raise EmptyInputError(missing, folder)
        return found

    @staticmethod
    def need(path: Path, missing: str) -> Path:
        """`path`, which must be a file; else an EmptyInputError(`missing`) naming it."""
        if not Path(path).is_file():
            raise EmptyInputError(missing, path)
        return path

    # ---- the output ----------------------------------------------------------------------

    @contextmanager
    def output(self, out_dir: Path, inputs: Iterable[Any] = (), count_key: Optional[str] = None,
               name: Optional[str] = None) -> Iterator[StagedOutput]:
        """A staging folder that replaces `out_dir` whole if the block succeeds
        (`pipeline.core.output_folders.staged_folder`, marker stage `name` or the stage's);
        the block's `report` is written there as report.json before the swap."""
        with staged_folder(Path(out_dir), stage=name or self.name, inputs=list(inputs),
                           count_key=count_key) as staging:
            out = StagedOutput(staging)
            yield out
            if out.report is not None:
                write_json(staging / REPORT, out.report)

    # ---- the work ------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        return self.params.runner.workers

    def _resources(self) -> Optional[dict]:
        if not (self.holds_model and self.address):
            return None
        return dict(getattr(self.params.runner, "model_resources", None) or {}) or None

    def map(self, task: Callable[[T], R], items: Sequence[T], label: Optional[str] = None,
            ) -> list[R]:
        """`task(item)` for every item, in item order, with the run's scheduler
        (`pipeline.core.runner.map_shards`); on a cluster, paths are made absolute first."""
        if self.address:
            task, items = absolute_paths(task), absolute_paths(list(items))
        return map_shards(task, items, label=label or self.name, scheduler=self.address,
                          local_scheduler=self.local_scheduler
                          or self.params.runner.local_scheduler,
                          workers=self.workers, resources=self._resources())

    def call(self, fn: Callable[..., R], *args: Any, label: Optional[str] = None,
             **kwargs: Any) -> R:
        """`fn(*args, **kwargs)` as one task: on the run's cluster when there is one (a GPU
        worker, for a stage that `holds_model`), else here, in this process."""
        if not self.address:
            return fn(*args, **kwargs)
        task = functools.partial(fn, *args, **kwargs)
        return self.map(_call, [task], label=label)[0]

    # ---- the report ----------------------------------------------------------------------

    @staticmethod
    def total(reports: Iterable[dict], keys: Optional[Sequence[str]] = None) -> Counter:
        """The shard reports' numbers added up (all numeric keys, or `keys`)."""
        total: Counter = Counter()
        for r in reports:
            total.update({k: v for k, v in r.items()
                          if (keys is None or k in keys) and isinstance(v, (int, float))
                          and not isinstance(v, bool)})
        return total


def _call(task: Callable[[], R]) -> R:
    return task()
