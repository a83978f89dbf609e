"""`dvc.yaml`, generated: each stage's code deps are the import closure of its CLI command, and
its params are the generation settings of the sections it reads, key by key.

`python -m pipeline.core.dvc_graph > dvc.yaml` writes it; a test checks that the committed file
is what this module gives, and (by running stage commands under `python -X importtime`) that
every module a stage really loads is among its deps. So a new import can never leave a stage
stale: the deps are complete by construction, not by memory.

Code deps. A stage runs `geopixeld <command>`: `pipeline/cli.py`'s module-level imports plus
the imports inside that command's function (the CLI imports each stage lazily), then, from
those modules, every first-party import anywhere in their source (function-level imports
included: a backend is imported only when chosen, but choosing it is a parameter change), and
the `__init__.py` of every package on the way. Data files a module reads at run time are added
from `DATA_OF_MODULE`.

Params. A run setting (`pipeline.core.params.run_setting`: concurrency, timeouts, prices, the
cache, ...) never changes what a stage writes, so it is not listed and changing it re-runs no
stage. Every other key of a section the stage reads is listed on its own, as DVC's per-key
params; an optional section that is unset (`compose.llm_backend: null`) is listed whole.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import yaml

from pipeline.core.params import Params, Section

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("pipeline", "annotators", "schemas", "prompts", "finetune")
CLI = "pipeline.cli"
ENTRY_POINT_RE = re.compile(r"^((?:%s)(?:\.\w+)*):\w+$" % "|".join(FIRST_PARTY))
# Files a module reads at run time (not imports): its deps too.
DATA_OF_MODULE = {
    "prompts": ["prompts"],
    "pipeline.formats.html_report": ["pipeline/formats/report_assets"],
}


@dataclass(frozen=True)
class StageSpec:
    """One DVC stage: the CLI command it runs, the data it reads and writes, the params
    sections it reads (`records`: sections recorded in its records' params_hash)."""

    name: str
    command: str          # the pipeline.cli function behind the subcommand
    cmd: str
    data: tuple[str, ...]
    outs: tuple[str, ...]
    sections: tuple[str, ...]
    comment: str = ""
    extra: dict = field(default_factory=dict)  # metrics, plots: copied as given


def _annotate(kind: str, cli_name: str) -> StageSpec:
    return StageSpec(
        f"annotate-{cli_name}", "_annotate_command",
        f"geopixeld annotate-{cli_name} --tiles build/tiles --plan build/plan "
        f"--out build/responses/{kind}",
        ("build/tiles", "build/plan"), (f"build/responses/{kind}",), ("annotate",))


_PLOT = {"cache": False, "template": "bar_horizontal_sorted"}
STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", "prepare", "geopixeld prepare --out build/tiles",
              ("data/isaid",), ("build/tiles",), ("data", "prepare")),
    StageSpec("plan", "plan", "geopixeld plan --tiles build/tiles --out build/plan",
              ("build/tiles",), ("build/plan",), ("plan",)),
    _annotate("holistic", "holistic"),
    _annotate("instance", "instances"),
    _annotate("cluster", "clusters"),
    StageSpec("compose", "compose",
              "geopixeld compose --tiles build/tiles --plan build/plan "
              "--responses build/responses --out build/records",
              ("build/tiles", "build/plan", "build/responses/holistic",
               "build/responses/instance", "build/responses/cluster"),
              ("build/records",), ("compose", "prepare", "plan", "annotate"),
              comment="prepare, plan and annotate: recorded in every record's params_hash"),
    StageSpec("review", "review",
              "geopixeld review --records build/records --decisions reviews/decisions.jsonl "
              "--out build/reviewed",
              ("build/records", "reviews/decisions.jsonl"), ("build/reviewed",),
              ("review", "compose"), comment="edits are validated with the composer's limits"),
    StageSpec("export", "export",
              "geopixeld export --tiles build/tiles --records build/reviewed --out build/export",
              ("build/tiles", "build/reviewed"), ("build/export",), ("export",)),
    StageSpec("qa", "qa",
              "geopixeld qa --records build/reviewed --compose build/records "
              "--review build/reviewed --tiles build/tiles --plan build/plan "
              "--responses build/responses "
              "--metrics metrics/qa.json --plots metrics/plots --report build/qa",
              ("build/reviewed", "build/records", "build/tiles", "build/plan",
               "build/responses/holistic",
               "build/responses/instance", "build/responses/cluster"),
              ("build/qa",), ("qa",),
              extra={"metrics": [{"metrics/qa.json": {"cache": False}}],
                     "plots": [
                         {"metrics/plots/caption_length.csv": {
                             "cache": False, "x": "chars", "y": "records",
                             "template": "linear"}},
                         {"metrics/plots/phrases_per_category.csv": {
                             **_PLOT, "x": "phrases", "y": "category"}},
                         {"metrics/plots/drop_reasons.csv": {**_PLOT, "x": "tiles",
                                                             "y": "reason"}}]}),
    StageSpec("finetune", "finetune",
              "geopixeld finetune --export build/export/parquet --out build/finetune",
              ("build/export/parquet",), ("build/finetune",), ("finetune",),
              comment="skipped with one line (its outs still written) while "
                      "finetune.base_model_path is empty"),
    StageSpec("evaluate", "evaluate",
              "geopixeld evaluate --records build/export/parquet --checkpoint build/finetune "
              "--out build/evaluate --metrics metrics/rs_gcg.json",
              ("build/export/parquet", "build/finetune"), ("build/evaluate",), ("evaluate",),
              extra={"metrics": [{"metrics/rs_gcg.json": {"cache": False}}]}),
)


# ---------------------------------------------------------------------------------------------
# Import closure


def module_file(module: str, root: Path = ROOT) -> Optional[Path]:
    """The source file of a first-party module (a package's `__init__.py`), or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(node: ast.AST) -> Iterable[str]:
    """Module names an import statement may load (a `from m import x` loads m, and m.x when
    x is a submodule). A string "package.module:attribute" (an entry point, as in a backend
    registry imported by name) loads that module too."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        m = ENTRY_POINT_RE.match(node.value)
        if m:
            yield m.group(1)
    elif isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        yield node.module
        for alias in node.names:
            yield f"{node.module}.{alias.name}"


def _first_party(name: str, root: Path) -> list[str]:
    """`name` and its parent packages, those that are first-party source files."""
    parts = name.split(".")
    if parts[0] not in FIRST_PARTY:
        return []
    found = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in found if module_file(m, root) is not None]


@lru_cache(maxsize=None)
def _imports_of(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """Every first-party module imported anywhere in `module`'s source."""
    tree = ast.parse(module_file(module, root).read_text(encoding="utf-8"))
    return tuple(sorted({m for node in ast.walk(tree) for name in _imported(node)
                         for m in _first_party(name, root)}))


def closure(modules: Iterable[str], root: Path = ROOT) -> set[str]:
    """`modules` and every first-party module they import, transitively. The CLI module is
    not followed: a command runs only its own imports (`command_modules`)."""
    seen: set[str] = set()
    todo = [m for name in modules for m in _first_party(name, root)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module != CLI:
            todo.extend(_imports_of(module, root))
    return seen


def command_modules(command: str, root: Path = ROOT) -> set[str]:
    """What `geopixeld <command>` loads first: the CLI's module-level imports and the imports
    inside the command's function."""
    tree = ast.parse(module_file(CLI, root).read_text(encoding="utf-8"))
    found, seen_command = {CLI}, False
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(m for name in _imported(node) for m in _first_party(name, root))
        elif isinstance(node, ast.FunctionDef) and node.name == command:
            seen_command = True
            found.update(m for sub in ast.walk(node) for name in _imported(sub)
                         for m in _first_party(name, root))
    if not seen_command:
        raise KeyError(f"{CLI} has no function {command!r}")
    return found


def code_deps(stage: StageSpec, root: Path = ROOT) -> list[str]:
    """The files (and data folders) a stage's command runs: its import closure."""
    modules = closure(command_modules(stage.command, root), root)
    files = {module_file(m, root).relative_to(root).as_posix() for m in modules}
    folders = {d for module in modules for d in DATA_OF_MODULE.get(module, ())}
    files = {f for f in files if not any(f.startswith(d + "/") for d in folders)}
    return sorted(files | folders)


# ---------------------------------------------------------------------------------------------
# Params


def generation_keys(section: Section, prefix: str) -> list[str]:
    """Dotted keys of a section's generation settings (run settings left out), leaves only;
    an unset optional section is one key."""
    keys: list[str] = []
    for name, value in section:
        if type(section).is_run_setting(name):
            continue
        key = f"{prefix}.{name}"
        keys.extend(generation_keys(value, key) if isinstance(value, Section) else [key])
    return keys


def stage_params(stage: StageSpec, params: Params) -> list[str]:
    return [k for s in stage.sections for k in generation_keys(getattr(params, s), s)]


# ---------------------------------------------------------------------------------------------
# dvc.yaml


HEADER = """\
# Generated by `python -m pipeline.core.dvc_graph > dvc.yaml` (a test checks it is current).
# Each stage runs the CLI subcommand of the same name. deps: its data and the import closure of
# its command (every first-party file it can run); params: every key of the sections it reads
# except run settings (see params.yaml), so changing a run setting re-runs nothing.
# `make demo` runs `dvc repro` with .venv/bin first on PATH.
"""


def dvc_yaml(root: Path = ROOT, params: Optional[Params] = None) -> str:
    params = params or Params()
    chunks = [HEADER, "stages:\n"]
    for stage in STAGES:
        body = {"cmd": stage.cmd,
                "deps": list(stage.data) + code_deps(stage, root),
                "params": stage_params(stage, params),
                **stage.extra,
                "outs": list(stage.outs)}
        text = yaml.safe_dump({stage.name: body}, sort_keys=False, width=100)
        if stage.comment:
            text = f"# {stage.comment}\n" + text
        chunks.append("".join(f"  {line}\n" for line in text.splitlines()))
    return "".join(chunks)


if __name__ == "__main__":
    sys.stdout.write(dvc_yaml())
