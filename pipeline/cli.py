"""`geopixeld`: one subcommand per DVC stage, `build` for a whole split, `summary`.

Every subcommand calls the same stage function that `dvc repro` runs. A user mistake (bad image,
bad mask, bad parameter, unsafe name, ...) ends with one line on stderr naming the file and the
problem, exit code 2, and no half-written output.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer
from rich.console import Console
from rich.table import Table

from pipeline.core.errors import GeoPixelDError, printable
from pipeline.core.params import Params, load_params, override_params

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Build GeoPixelD-style grounded captions (<p> phrase </p> [SEG]) from aerial imagery.")



def _version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"geopixeld {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = None) -> None:
    pass


ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (missing = defaults).")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", envvar="DASK_SCHEDULER_ADDRESS",
    help="dask.distributed scheduler address (tcp://host:port); default: params "
    "runner.scheduler, else local worker processes. Workers must see the same file system.")]
PASS_OF_COMMAND = {"holistic": "holistic", "instances": "instance", "clusters": "cluster"}


# the command-line option behind each parameter a subcommand can override: a bad value given
# with it is blamed on the option, not on the params file
OPTION_OF = {"data.source": "--source", "data.root": "--root", "data.splits": "--split",
             "annotate.backend.name": "--backend", "annotate.backend.openai.mode": "--mode",
             "compose.composer": "--composer", "evaluate.split": "--split",
             "annotate.backend.model": "--model",
             "annotate.backend.openai.image_detail": "--detail"}


def _params(path: Path, **overrides: object) -> Params:
    """Load the params file, then apply CLI overrides given as dotted keys (section.key).
    A file named with --params must exist (the default params.yaml may be missing: defaults);
    a bad value names the file read, or the option that gave it."""
    params = load_params(path, required=_given("params"))
    return override_params(params, {key: (OPTION_OF.get(key, key), value)
                                    for key, value in overrides.items()})


def _given(name: str) -> bool:
    """Whether the running subcommand's option `name` was given (command line or environment),
    not left at its default. Typer 0.29 runs commands in its own copy of click's context."""
    try:
        from typer.main import get_current_context
    except ImportError:  # older typer: click's own context
        from click import get_current_context
    ctx = get_current_context(silent=True)
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


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
    from pipeline.stages.prepare import run_prepare

    p = _params(params, **{"data.source": source, "data.root": str(root) if root else None,
                           "data.splits": split or None})
    report = run_prepare(p, out, splits=split or None, scheduler=scheduler)
    _done("prepare", out, report)


@app.command()
def plan(
    tiles: Annotated[Path, typer.Option(help="Tile shards from `prepare`.")] = Path("build/tiles"),
    out: Annotated[Path, typer.Option(help="Output folder: tile plans and requests.")] = Path("build/plan"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Priors, instance/cluster split, set-of-marks images and the annotation requests."""
    from pipeline.stages.plan import run_plan

    p = _params(params)
    _done("plan", out, run_plan(p, tiles, out, scheduler=scheduler))


def _annotate_command(cli_name: str, kind: str):
    def command(
        tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
        plan_dir: Annotated[Path, typer.Option("--plan", help="Output of `plan`.")] = Path("build/plan"),
        out: Annotated[Optional[Path], typer.Option(help="Response shards folder.")] = None,
        backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
        mode: Annotated[Optional[str], typer.Option(help="openai backend: sync, or batch (Batch API, half price).")] = None,
        params: ParamsOpt = Path("params.yaml"),
        scheduler: SchedulerOpt = None,
    ) -> None:
        from pipeline.stages.annotate import run_annotate

        p = _params(params, **{"annotate.backend.name": backend,
                               "annotate.backend.openai.mode": mode})
        target = out or Path("build/responses") / kind
        report = run_annotate(p, kind, tiles, plan_dir, target, scheduler=scheduler)
        _done(cli_name, target, report)

    command.__doc__ = f"Answer the {kind} requests with the configured backend -> Response shards."
    command.__name__ = cli_name.replace("-", "_")
    return command


for _cli_name, _kind in PASS_OF_COMMAND.items():
    app.command(name=f"annotate-{_cli_name}")(_annotate_command(f"annotate-{_cli_name}", _kind))


@app.command()
def compose(
    tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
    plan_dir: Annotated[Path, typer.Option("--plan", help="Output of `plan`.")] = Path("build/plan"),
    responses: Annotated[Path, typer.Option(help="Folder with holistic/, instance/, cluster/.")] = Path("build/responses"),
    out: Annotated[Path, typer.Option(help="GroundedRecord shards (+ dropped/).")] = Path("build/records"),
    composer: Annotated[Optional[str], typer.Option(help="deterministic, or llm (through the backend).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Merge the three passes into one tagged paragraph, align [SEG] to masks, validate."""
    from pipeline.stages.compose.stage import run_compose

    p = _params(params, **{"compose.composer": composer})
    _done("compose", out, run_compose(p, tiles, plan_dir, responses, out, scheduler=scheduler))


@app.command()
def review(
    records: Annotated[Path, typer.Option(help="GroundedRecord shards from `compose`.")] = Path("build/records"),
    decisions: Annotated[Optional[Path], typer.Option(help="Decisions JSONL (default: params review.decisions).")] = None,
    out: Annotated[Path, typer.Option(help="Reviewed GroundedRecord shards (+ dropped/).")] = Path("build/reviewed"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Apply people's accept / reject / edit decisions (from the review notebook)."""
    from pipeline.stages.review import run_review

    p = _params(params)
    _done("review", out, run_review(p, records, decisions or Path(p.review.decisions), out,
                                    scheduler=scheduler))


@app.command()
def export(
    tiles: Annotated[Path, typer.Option(help="Tile shards.")] = Path("build/tiles"),
    records: Annotated[Path, typer.Option(help="GroundedRecord shards from `review`.")] = Path("build/reviewed"),
    out: Annotated[Path, typer.Option(help="Export folder: parquet/, coco/, geopixel/.")] = Path("build/export"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Write Parquet shards, COCO json and the GeoPixel training layout."""
    from pipeline.stages.export import run_export

    p = _params(params)
    _done("export", out, run_export(p, tiles, records, out, scheduler=scheduler))


@app.command()
def qa(
    records: Annotated[Path, typer.Option(help="Records that get exported (output of `review`).")] = Path("build/reviewed"),
    compose_dir: Annotated[Optional[Path], typer.Option("--compose", help="Output of `compose` (its drops and report).")] = Path("build/records"),
    review_dir: Annotated[Optional[Path], typer.Option("--review", help="Output of `review` (reviewer statistics).")] = Path("build/reviewed"),
    tiles: Annotated[Optional[Path], typer.Option(help="Tile shards (images for the report).")] = Path("build/tiles"),
    plan: Annotated[Optional[Path], typer.Option(help="Output of `plan` (the tiles' measurements the claims are checked against).")] = Path("build/plan"),
    responses: Annotated[Optional[Path], typer.Option(help="Response shards (calls, tokens, cost).")] = Path("build/responses"),
    metrics: Annotated[Path, typer.Option(help="DVC metrics file to write.")] = Path("metrics/qa.json"),
    plots: Annotated[Path, typer.Option(help="Folder of DVC plot tables.")] = Path("metrics/plots"),
    report: Annotated[Path, typer.Option(help="HTML report folder (open index.html from disk).")] = Path("build/qa"),
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Metrics (DVC), plot tables and the HTML report of the records that get exported."""
    from pipeline.stages.qa import run_qa

    p = _params(params)
    _done("qa", report, run_qa(p, records, metrics, plots, report, tiles_dir=tiles,
                               responses_dir=responses, compose_dir=compose_dir,
                               review_dir=review_dir, plan_dir=plan, scheduler=scheduler))


@app.command()
def finetune(
    export_dir: Annotated[Path, typer.Option("--export", help="Export Parquet shards (or a GeoPixel .json list).")] = Path("build/export/parquet"),
    out: Annotated[Path, typer.Option(help="Fine-tuned checkpoint folder.")] = Path("build/finetune"),
    stop_after_steps: Annotated[Optional[int], typer.Option(help="Stop (resumably) after this many steps.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Fine-tune a GeoPixel-style model ([SEG] -> SAM decoder, LoRA); skipped without a base model."""
    from finetune.stage import run_finetune

    p = _params(params)
    _done("finetune", out, run_finetune(p, export_dir, out, stop_after=stop_after_steps,
                                        scheduler=scheduler))


@app.command()
def evaluate(
    records: Annotated[Path, typer.Option(help="Ground truth: export Parquet shards or record shards.")] = Path("build/export/parquet"),
    checkpoint: Annotated[Optional[Path], typer.Option(help="Fine-tuned checkpoint to predict with.")] = Path("build/finetune"),
    predictions: Annotated[Optional[Path], typer.Option(help="Any model's predictions JSON instead of a checkpoint.")] = None,
    out: Annotated[Path, typer.Option(help="Predictions and details folder.")] = Path("build/evaluate"),
    metrics: Annotated[Path, typer.Option(help="DVC metrics file to write.")] = Path("metrics/rs_gcg.json"),
    split: Annotated[Optional[str], typer.Option(help="Split to score (default: params evaluate.split).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """RS-GCG scores (AP50, mIoU, Recall, CIDEr, METEOR) of a checkpoint or a predictions file."""
    from finetune.evaluate import run_evaluate_stage

    p = _params(params, **{"evaluate.split": split})
    _done("evaluate", out, run_evaluate_stage(p, records, checkpoint, predictions, metrics, out,
                                              scheduler=scheduler))


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="Output root; stages write OUT/tiles, OUT/plan, ...")] = Path("build"),
    source: Annotated[Optional[str], typer.Option(help="Source adapter: isaid or coco.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Dataset root.")] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="Split(s) to build (default: params).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
    composer: Annotated[Optional[str], typer.Option(help="deterministic, or llm (through the backend).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Run every stage for the given split(s), through the same functions as `dvc repro`."""
    from annotators.base import get_backend
    from pipeline.core.output_folders import check_output_location, output_lock
    from pipeline.core.stage import resolve_scheduler

    p = _params(params, **{"data.source": source, "data.root": str(root) if root else None,
                           "data.splits": split or None, "annotate.backend.name": backend,
                           "compose.composer": composer})
    sched = resolve_scheduler(scheduler, p)  # once for every stage of the build
    check_output_location(out, [p.data.root, params])  # before any work
    # a backend set-up mistake stops the build before prepare
    get_backend(p.annotate.backend, cache=p.annotate.cache)
    with output_lock(out):  # one build per output root; each stage also locks its own folder
        _build_stages(p, out, split, sched)


def _build_stages(p: Params, out: Path, split: Optional[list[str]], sched: Optional[str]) -> None:
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.compose.stage import run_compose
    from pipeline.stages.export import run_export
    from pipeline.stages.plan import run_plan
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.qa import run_qa
    from pipeline.stages.review import run_review

    _done("prepare", out / "tiles", run_prepare(p, out / "tiles", splits=split or None, scheduler=sched))
    _done("plan", out / "plan", run_plan(p, out / "tiles", out / "plan", scheduler=sched))
    for cli_name, kind in PASS_OF_COMMAND.items():
        _done(f"annotate-{cli_name}", out / "responses" / kind,
              run_annotate(p, kind, out / "tiles", out / "plan", out / "responses" / kind,
                           scheduler=sched))
    _done("compose", out / "records", run_compose(p, out / "tiles", out / "plan",
                                                  out / "responses", out / "records",
                                                  scheduler=sched))
    _done("review", out / "reviewed", run_review(p, out / "records", Path(p.review.decisions),
                                                 out / "reviewed", scheduler=sched))
    _done("export", out / "export", run_export(p, out / "tiles", out / "reviewed", out / "export",
                                               scheduler=sched))
    _done("qa", out / "qa", run_qa(p, out / "reviewed", out / "metrics" / "qa.json",
                                   out / "metrics" / "plots", out / "qa", tiles_dir=out / "tiles",
                                   responses_dir=out / "responses", compose_dir=out / "records",
                                   review_dir=out / "reviewed", plan_dir=out / "plan",
                                   scheduler=sched))


@app.command()
def annotate(
    paths: Annotated[list[Path], typer.Argument(help="Images (PNG, JPEG, TIFF, GeoTIFF) or folders of them.")],
    out: Annotated[Path, typer.Option(help="Output root: OUT/tiles, plan, responses, records, export, summary.json.")],
    masks: Annotated[Optional[str], typer.Option(help="Where objects come from: sam | dota DIR | coco FILE | geojson FILE.")] = None,
    masks_path: Annotated[Optional[Path], typer.Option("--masks-path", hidden=True, help="The DIR/FILE after --masks dota|coco|geojson.")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    scheduler: SchedulerOpt = None,
) -> None:
    """Annotate new imagery of any size (GeoTIFF georeference kept), masks from SAM or labels."""
    from pipeline.core.stage import resolve_scheduler
    from pipeline.stages.new_imagery import run_annotate_imagery

    p = _params(params)

    def progress(event: str, report: dict) -> None:
        if event != "scene":
            _done(event, out, report)
            return
        what = report.get("skipped") or (
            f"{report['tiles']} tiles, {report['objects']} objects"
            + (f", {report['tiles_nodata']} nodata tiles skipped" if report["tiles_nodata"] else ""))
        crs = f", {report['crs']}" if report["crs"] else ""
        _say("scene", f" {report['scene']} ({report['width']}x{report['height']}{crs}): {what}")

    s = run_annotate_imagery(paths, out, p, masks, masks_path, backend,
                             scheduler=resolve_scheduler(scheduler, p), progress=progress)
    _say("annotate", f" -> {out}  scenes={s['scenes']} tiles={s['tiles']} "
         f"objects={s['objects']} records={s['records']} phrases={s['phrases']} "
         f"calls={s['calls']} (cached {s['cached_calls']}, failed {s['failed_calls']}) "
         f"cost=${s['cost_usd']:.4f} (spent ${s['spent_usd']:.4f})")


@app.command()
def estimate(
    plan_dir: Annotated[Optional[Path], typer.Option("--plan", help="Read this plan folder (output of `plan`); default: prepare and plan data.root's splits in memory (nothing written).")] = None,
    tiles: Annotated[Optional[int], typer.Option("--tiles", min=1, help="Estimate a dataset of N tiles that is not built: the planned tiles' per-tile request mix (tiles with objects), scaled to N.")] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", min=1, help="Tile side in pixels with --tiles (default: prepare.tile_size).")] = None,
    split: Annotated[Optional[list[str]], typer.Option(help="Split(s) to plan in memory (default: params data.splits).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Override annotate.backend.name.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Override annotate.backend.model.")] = None,
    detail: Annotated[Optional[str], typer.Option(help="Override annotate.backend.openai.image_detail: low, high or auto.")] = None,
    price_input: Annotated[Optional[float], typer.Option(min=0, help="USD per million input tokens (over params annotate.backend.openai.prices).")] = None,
    price_output: Annotated[Optional[float], typer.Option(min=0, help="USD per million output tokens.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Calls, tokens and cost (sync and Batch) of annotating with the configured backend and
    model, before any paid call."""
    from pipeline.core.errors import BadParamsError
    from pipeline.core.estimate import estimate as bill
    from pipeline.core.estimate import format_estimate, read_plan

    p = _params(params, **{"annotate.backend.name": backend, "annotate.backend.model": model,
                           "annotate.backend.openai.image_detail": detail})
    if (price_input is None) != (price_output is None):
        raise BadParamsError("--price-input and --price-output go together", "--price-input")
    if tile_size is not None and tiles is None:
        raise BadParamsError("needs --tiles N", "--tile-size")
    if plan_dir is not None:
        planned, source = read_plan(plan_dir, p.prepare.tile_size), f"read from {plan_dir}"
        if not planned.sizes:
            from pipeline.core.errors import EmptyInputError

            raise EmptyInputError("no tile plans (tiles/*.parquet) in this folder", plan_dir)
    else:
        from pipeline.stages.estimate import plan_in_memory

        splits = split or p.data.splits
        planned = plan_in_memory(p, splits)
        source = f"prepared and planned in memory from {p.data.root} ({', '.join(splits)})"
    price = (price_input, price_output) if price_input is not None else None
    block = bill(p, planned, scale_to=tiles,
                 tile_size=(tile_size or p.prepare.tile_size) if tiles else None, price=price,
                 source=source)
    typer.echo(json.dumps(block, indent=2) if as_json else format_estimate(block))


@app.command()
def summary(out: Annotated[Path, typer.Argument(help="Output root of a build.")] = Path("build")) -> None:
    """Print the counts from each stage's report.json."""
    from rich.text import Text

    # paths and report values are user text: Text (never rich markup), through `printable`
    table = Table(title=Text(printable(f"GeoPixelD build: {out}")))
    table.add_column("stage")
    table.add_column("report")
    for report in _reports(out):
        data = _read_report(report)
        flat = {k: v for k, v in data.items() if isinstance(v, (int, float, str))}
        table.add_row(Text(printable(str(report.parent.relative_to(out)))),
                      Text(printable(json.dumps(flat, sort_keys=True)[:300])))
    Console().print(table)


def _reports(out: Path) -> list[Path]:
    """The report.json files under a build folder (symbolic links to folders not followed);
    a folder that does not exist, or a file, is an EmptyInputError naming it."""
    from pipeline.core.errors import EmptyInputError

    if not out.exists():
        raise EmptyInputError("build folder not found", out)
    if not out.is_dir():
        raise EmptyInputError("not a folder (summary reads a build folder)", out)
    found = []
    for folder, dirs, files in os.walk(out, onerror=None):
        dirs.sort()
        if "report.json" in files:
            found.append(Path(folder) / "report.json")
    return sorted(found)


def _read_report(path: Path) -> dict:
    """A stage's report.json through the guarded readers: unreadable, not UTF-8, not JSON or
    not a JSON object is a BadReportError naming the file."""
    from pipeline.core.errors import BadReportError
    from pipeline.core.user_files import MAX_REPORT_BYTES, read_user_json

    data = read_user_json(path, "stage report", max_bytes=MAX_REPORT_BYTES, error=BadReportError)
    if not isinstance(data, dict):
        raise BadReportError(f"stage report is a JSON {type(data).__name__}, not an object", path)
    return data


def _done(stage: str, out: Path, report: dict) -> None:
    counts = {k: v for k, v in (report or {}).items() if isinstance(v, (int, float))}
    _say(stage, f" -> {out}  " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def _say(label: str, rest: str) -> None:
    """One line on stderr: `label` in bold, then `rest`. `rest` holds user text (paths, file
    names): it is printed as Text, never as rich markup, through `printable`."""
    from rich.text import Text

    line = Text.assemble((label, "bold"), printable(rest))
    Console(stderr=True).print(line, highlight=False, soft_wrap=True)


# --masks kinds followed by a path (pipeline.stages.new_imagery.NEEDS_FILE says what each needs)
MASK_SOURCES_WITH_PATH = ("dota", "coco", "geojson")


def masks_argv(args: Sequence[str]) -> list[str]:
    """Command-line arguments with `--masks KIND PATH` (and `--masks=KIND PATH`) rewritten as
    `--masks KIND --masks-path PATH`: click options take a fixed number of values, and the
    path after dota/coco/geojson would otherwise be read as one more image."""
    out, i, args = [], 0, list(args)
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + args[i:]
        kind = None
        if arg == "--masks" and i + 1 < len(args):
            kind, step = args[i + 1], 2
        elif arg.startswith("--masks="):
            kind, step = arg.split("=", 1)[1], 1
        if kind is None:
            out.append(arg)
            i += 1
            continue
        out += ["--masks", kind]
        i += step
        if kind.lower() in MASK_SOURCES_WITH_PATH and i < len(args) and not args[i].startswith("-"):
            out += ["--masks-path", args[i]]
            i += 1
    return out


def main() -> None:
    """Console entry point. Every failure ends as one line on stderr: a user mistake exits 2,
    a backend that kept failing exits 3 (`GeoPixelDError.exit_code`), an interrupt 130, and
    an unexpected error 1 (GEOPIXELD_DEBUG=1 shows its traceback)."""
    try:
        # `--masks dota DIR`: click options take a fixed number of values, so the path after
        # dota/coco/geojson is passed on as the hidden --masks-path
        app(args=masks_argv(sys.argv[1:]))
    except GeoPixelDError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: no output folder was replaced; answers already paid for are kept "
              "in the response cache", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the last guard: a bug, still one line (and no secret) for a user
        if os.environ.get("GEOPIXELD_DEBUG"):
            raise
        print(printable(f"internal error: {type(exc).__name__}: {exc} (set GEOPIXELD_DEBUG=1 "
                        "for the traceback and report it)"), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
