"""`geopixeld`: one subcommand per DVC stage, `build` for a whole split, `summary`.

Every subcommand calls the same stage function that `dvc repro` runs. A user mistake (bad image,
bad mask, bad parameter, unsafe name, ...) ends with one line on stderr naming the file and the
problem, exit code 2, and no half-written output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import GeoPixelDError
from pipeline.params import Params, load_params, parse_params

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Build GeoPixelD-style grounded captions (<p> phrase </p> [SEG]) from aerial imagery.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (missing = defaults).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", envvar="DASK_SCHEDULER_ADDRESS",
    help="dask.distributed scheduler address (tcp://host:port); default: local threads.")]
KINDS = {"holistic": "holistic", "instances": "instance", "clusters": "cluster"}


def _params(path: Path, **overrides: object) -> Params:
    """Load params.yaml, then apply CLI overrides given as dotted keys (section.key)."""
    params = load_params(path)
    if not overrides:
        return params
    raw = params.model_dump(mode="json")
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        node = raw[section]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_params(raw, path)


@app.command()
def prepare(
    out: Annotated[Path, typer.Option(help="Output folder of Tile shards.")] = Path("build/tiles"),
    split: Annotated[Optional[list[str]], typer.Option(help="Split(s) to prepare (default: params data.splits).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Source adapter: isaid or coco.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root (iSAID: ROOT/SPLIT/images/).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Cut source images into tiles with their instances (iSAID devkit rules) -> Tile shards."""
    from pipeline.prepare import run_prepare

    p = _params(params, **{"data.source": source, "data.root": str(root) if root else None,
                           "data.splits": split or None})
    report = run_prepare(p, out, splits=split or None, scheduler=scheduler or p.runner.scheduler)
    _done("prepare", out, report)


@app.command()
def plan(
    tiles: Annotated[Path, typer.Option(help="Tile shards from `prepare`.")] = Path("build/tiles"),
    out: Annotated[Path, typer.Option(help="Output folder: tile plans and requests.")] = Path("build/plan"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Priors, instance/cluster split, set-of-marks images and the annotation requests."""
    from pipeline.plan import run_plan

    p = _params(params)
    _done("plan", out, run_plan(p, tiles, out, scheduler=scheduler or p.runner.scheduler))


def _annotate_command(cli_name: str, kind: str):
    def command(
        tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
        plan_dir: Annotated[Path, typer.Option("--plan", help="Output of `plan`.")] = Path("build/plan"),
        out: Annotated[Optional[Path], typer.Option(help="Response shards folder.")] = None,
        backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
        params: ParamsOpt = Path("params.yaml"),
        scheduler: SchedulerOpt = None,
    ) -> None:
        from pipeline.annotate import run_annotate

        p = _params(params, **{"annotate.backend.name": backend})
        target = out or Path("build/responses") / kind
        report = run_annotate(p, kind, tiles, plan_dir, target,
                              scheduler=scheduler or p.runner.scheduler)
        _done(cli_name, target, report)

    command.__doc__ = f"Answer the {kind} requests with the configured backend -> Response shards."
    command.__name__ = cli_name.replace("-", "_")
    return command


for _cli_name, _kind in KINDS.items():
    app.command(name=f"annotate-{_cli_name}")(_annotate_command(f"annotate-{_cli_name}", _kind))


@app.command()
def compose(
    tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
    plan_dir: Annotated[Path, typer.Option("--plan", help="Output of `plan`.")] = Path("build/plan"),
    responses: Annotated[Path, typer.Option(help="Folder with holistic/, instance/, cluster/.")] = Path("build/responses"),
    out: Annotated[Path, typer.Option(help="GroundedRecord shards (+ dropped/).")] = Path("build/records"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Merge the three passes into one tagged paragraph, align [SEG] to masks, validate."""
    from pipeline.compose import run_compose

    p = _params(params)
    _done("compose", out, run_compose(p, tiles, plan_dir, responses, out,
                                      scheduler=scheduler or p.runner.scheduler))


@app.command()
def export(
    tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
    records: Annotated[Path, typer.Option(help="GroundedRecord shards from `compose`.")] = Path("build/records"),
    out: Annotated[Path, typer.Option(help="Export folder: parquet/, coco/, geopixel/.")] = Path("build/export"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write Parquet shards, COCO json and the GeoPixel training layout."""
    from pipeline.export import run_export

    p = _params(params)
    _done("export", out, run_export(p, tiles, records, out))


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Output root; stages write OUT/tiles, OUT/plan, ...")] = Path("build"),
    source: Annotated[Optional[str], typer.Option(help="Source adapter: isaid or coco.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root.")] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="Split(s) to build (default: params).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Run every stage for the given split(s), through the same functions as `dvc repro`."""
    from annotators.base import get_backend
    from pipeline.annotate import run_annotate
    from pipeline.compose import run_compose
    from pipeline.export import run_export
    from pipeline.plan import run_plan
    from pipeline.prepare import run_prepare

    p = _params(params, **{"data.source": source, "data.root": str(root) if root else None,
                           "data.splits": split or None, "annotate.backend.name": backend})
    sched = scheduler or p.runner.scheduler
    get_backend(p.annotate.backend)  # a backend set-up mistake stops the build before prepare
    _done("prepare", out / "tiles", run_prepare(p, out / "tiles", splits=split or None, scheduler=sched))
    _done("plan", out / "plan", run_plan(p, out / "tiles", out / "plan", scheduler=sched))
    for cli_name, kind in KINDS.items():
        _done(f"annotate-{cli_name}", out / "responses" / kind,
              run_annotate(p, kind, out / "tiles", out / "plan", out / "responses" / kind,
                           scheduler=sched))
    _done("compose", out / "records", run_compose(p, out / "tiles", out / "plan",
                                                  out / "responses", out / "records",
                                                  scheduler=sched))
    _done("export", out / "export", run_export(p, out / "tiles", out / "records", out / "export"))


@app.command()
def summary(out: Annotated[Path, typer.Argument(help="Output root of a build.")] = Path("build")) -> None:
    """Print the counts from each stage's report.json."""
    table = Table(title=f"GeoPixelD build: {out}")
    table.add_column("stage")
    table.add_column("report")
    for report in sorted(out.rglob("report.json")):
        data = json.loads(report.read_text())
        flat = {k: v for k, v in data.items() if isinstance(v, (int, float, str))}
        table.add_row(str(report.parent.relative_to(out)), json.dumps(flat, sort_keys=True)[:300])
    Console().print(table)


def _done(stage: str, out: Path, report: dict) -> None:
    counts = {k: v for k, v in (report or {}).items() if isinstance(v, (int, float))}
    text = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    Console(stderr=True).print(f"[bold]{stage}[/bold] -> {out}  {text}", highlight=False)


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        app()
    except GeoPixelDError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
