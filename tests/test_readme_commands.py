"""Every command the README shows works in the environment the README's setup creates: each
`geopixeld` subcommand and option it writes exists (`geopixeld SUB --help`, in-process), every
console tool it calls is installed by the core package or an extra the README names (and its
options exist where the tool is installed here), and its table of which install each command
needs is right."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent

# Console tools the README may call -> what installs them: a distribution (core or an extra),
# "project" (our own entry point), "system" (the OS, or Python itself). A tool not listed here
# fails the test: say how it is installed before the README calls it.
TOOLS = {"geopixeld": "project", "dvc": "dvc", "dask": "dask[distributed]", "pytest": "pytest",
         "jupyter": None, "make": "system", "python": "system", "python3": "system",
         "pip": "system", "bash": "system"}
# `jupyter SUB` is provided by the distribution of its subcommand
JUPYTER = {"lab": "jupyterlab", "notebook": "notebook", "nbconvert": "nbconvert",
           "execute": "nbclient"}
# modules a README snippet or a script it names imports -> their distribution
MODULES = {"datasets": "datasets", "torch": "torch", "transformers": "transformers",
           "segment_anything": "segment-anything", "peft": "peft", "rasterio": "rasterio",
           "tiktoken": "tiktoken", "pycocoevalcap": "pycocoevalcap"}


# ---- what the README and pyproject say --------------------------------------------------------

def _code_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^ *```(\w*)\n(.*?)^ *```", README, re.S | re.M)


def _prose() -> str:
    return re.sub(r"^ *```\w*\n.*?^ *```", "", README, flags=re.S | re.M)


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _commands(line: str) -> list[str]:
    """Shell commands of one line: comment, `&&`, `;`, a trailing `&` and leading VAR=value
    assignments taken off."""
    line = re.sub(r"(^|\s)#.*$", "", line)
    out = []
    for part in re.split(r"&&|;", line):
        part = re.sub(r"&\s*$", "", part).strip()
        part = re.sub(r"^(\w+=\S*\s+)+", "", part)
        if part:
            out.append(part)
    return out


def _tool(command: str) -> str:
    return Path(command.split()[0]).name


def _shell_commands() -> list[str]:
    """Commands of the README's bash code blocks, and inline code spans that start with a
    known console tool."""
    found = []
    for lang, body in _code_blocks():
        if lang in ("bash", "sh", "shell"):
            for line in body.splitlines():
                found += _commands(line)
    for span in _spans(_prose()):
        if span.split() and _tool(span) in TOOLS and " " in span:
            found += _commands(span)
    return found


def _requirement(spec: str) -> tuple[str, set[str]]:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
    return _norm(m.group(1)), {_norm(e) for e in (m.group(2) or "").split(",") if e.strip()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=1)
def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _provided(specs: list[str]) -> set[str]:
    """Distribution names (and name[extra]) that installing `specs` brings."""
    out = set()
    for spec in specs:
        name, extras = _requirement(spec)
        out.add(name)
        out.update(f"{name}[{e}]" for e in extras)
    return out


def _installs(extras: set[str]) -> set[str]:
    project = _project()
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return _provided(specs)


def _needs(command: str) -> str | None:
    """The distribution a command needs (None: nothing beyond Python and the OS, or ours)."""
    tool = _tool(command)
    assert tool in TOOLS, f"the README calls {tool!r} ({command!r}): add it to TOOLS"
    need = TOOLS[tool]
    if tool == "jupyter":
        words = command.split()
        sub = words[1] if len(words) > 1 else ""
        assert sub in JUPYTER, f"`jupyter {sub}`: which distribution gives it?"
        need = JUPYTER[sub]
    return None if need in ("project", "system") else _norm_req(need)


def _norm_req(need: str) -> str:
    name, extras = _requirement(need)
    return f"{name}[{next(iter(extras))}]" if extras else name


def _named_extras() -> set[str]:
    """Extras the README names: `[extra]` and the `.[a,b]` of install commands."""
    known = set(_project()["optional-dependencies"])
    named = set()
    for group in re.findall(r"\[([a-z0-9_,-]+)\]", README):
        named.update(e for e in group.split(",") if e in known)
    return named


def _install_table() -> list[tuple[list[str], set[str] | None]]:
    """Rows of the README's "command | install" table: the commands (code spans) of a row and
    the extras its install names (an empty set: core)."""
    m = re.search(r"^\| command \| install \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", README, re.M)
    assert m, "the README has no `| command | install |` table"
    rows = []
    known = set(_project()["optional-dependencies"])
    for line in m.group(1).splitlines():
        first, second = (c.strip() for c in line.strip().strip("|").split(" | ", 1))
        extras = {e for span in _spans(second) for e in span.strip("[]").split(",") if e in known}
        assert extras or second.startswith("core"), line
        rows.append((_spans(first), extras))
    return rows


# ---- geopixeld ----------------------------------------------------------------------------------

def _geopixeld_invocations() -> list[tuple[list[str], list[str]]]:
    """(subcommands, options) of every `geopixeld ...` the README shows; `a | b | c` lists
    alternative subcommands; [--opt VALUE] brackets are optional parts."""
    found = []
    texts = [c for c in _shell_commands() if _tool(c) == "geopixeld"]
    texts += [s for rows in _install_table() for s in rows[0] if s.startswith("geopixeld")]
    for text in texts:
        words = [w.strip("[]") for w in text.split()][1:]
        words = [w for w in words if w and w != "..."]
        subs, options = [], []
        if words and not words[0].startswith("-"):
            subs.append(words[0])
        for prev, word in zip(words, words[1:]):
            if prev == "|" and not word.startswith("-"):
                subs.append(word)
        options = [w.split("=")[0] for w in words if w.startswith("--")]
        found.append((subs or [""], options))
    return found


@lru_cache(maxsize=None)
def _help(sub: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*([sub] if sub else []), "--help"],
                                env={"COLUMNS": "240", "TERM": "dumb"})
    return result.exit_code, result.output


def test_readme_shows_geopixeld_commands():
    subs = {s for subs, _ in _geopixeld_invocations() for s in subs}
    assert {"", "build", "prepare", "plan", "annotate-holistic", "annotate-clusters", "compose",
            "export", "summary", "annotate", "estimate", "evaluate"} <= subs


def test_every_geopixeld_subcommand_and_option_the_readme_shows_exists():
    for subs, options in _geopixeld_invocations():
        for sub in subs:
            code, text = _help(sub)
            assert code == 0, f"`geopixeld {sub} --help` failed: {text[-300:]}"
            for option in options:
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                    f"`geopixeld {sub}` has no option {option} (README)")


# ---- console tools and extras -----------------------------------------------------------------

def test_every_extra_is_named_in_the_readme():
    assert set(_project()["optional-dependencies"]) <= _named_extras()


def test_every_tool_the_readme_calls_is_installed_by_core_or_a_named_extra():
    reachable = _installs(_named_extras())
    commands = _shell_commands()
    assert any(_tool(c) == "jupyter" for c in commands)  # the review notebook's command
    for command in commands:
        need = _needs(command)
        assert need is None or need in reachable, (
            f"{command!r} needs {need}, which neither the core install nor an extra the README "
            "names installs")


def test_make_demo_needs_only_the_core_install():
    core = _installs(set())
    make = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", make, re.M).group(1)
    for line in demo.splitlines():
        command = re.sub(r"^\s*(\w+=\S*\s+)*", "", line).replace("$(BIN)/", "")
        need = _needs(command)
        assert need is None or need in core, command
    assert re.search(r"^\$\(CORE\):.*\n\t.*pip install -q -e \.\n", make, re.M)


def test_install_table_names_an_install_that_provides_each_command():
    rows = _install_table()
    listed = set()
    for spans, extras in rows:
        reachable = _installs(extras)
        for span in spans:
            if span.endswith(".py") or span.split()[0].endswith(".py"):
                script = REPO / span.split()[0]
                assert script.is_file(), span
                for module in _third_party_imports(script):
                    need = MODULES.get(module)
                    assert need is None or _norm(need) in reachable, (span, module, extras)
                continue
            if span.startswith("from ") or span.startswith("import "):
                module = span.split()[1].split(".")[0]
                assert _norm(MODULES[module]) in reachable, (span, extras)
                continue
            tool = _tool(span)
            if tool not in TOOLS:
                continue  # words such as "the transformers backend"
            listed.add(tool)
            need = _needs(span)
            assert need is None or need in reachable, (span, need, extras)
    # every console tool the README calls has its row
    called = {_tool(c) for c in _shell_commands()} - {"python", "python3", "pip", "bash"}
    assert called <= listed | {"geopixeld"}, called - listed


def test_python_snippets_import_what_an_extra_installs():
    reachable = _installs(_named_extras())
    for lang, body in _code_blocks():
        if lang != "python":
            continue
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in ("pipeline", "annotators", "schemas", "prompts", "finetune"):
                        continue
                    assert _norm(MODULES[top]) in reachable, name


def _third_party_imports(script: Path) -> set[str]:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_files_the_readme_names_exist():
    for span in _spans(_prose()) + [w for c in _shell_commands() for w in c.split()]:
        path = span.split()[0] if span.split() else span
        if re.match(r"^(bench|tools|notebooks|\.ci)/[\w./-]+\.(py|sh|ipynb)$", path) or \
                path == ".ci/run":
            assert (REPO / path).is_file(), path


# ---- options of the other tools, where they are installed -------------------------------------

def _tool_options() -> dict[tuple[str, ...], set[str]]:
    """(tool, subcommand words...) -> options the README gives it, for tools other than
    geopixeld (and make)."""
    out: dict[tuple[str, ...], set[str]] = {}
    for command in _shell_commands():
        words = command.split()
        tool = _tool(command)
        if tool in ("geopixeld", "make", "python", "python3", "pip", "bash"):
            continue
        sub = tuple(w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w))
        if tool == "dvc" and sub[:1] not in (("metrics",), ("plots",)):
            sub = sub[:1]
        out.setdefault((tool, *sub), set()).update(
            w.split("=")[0] for w in words[1:] if w.startswith("--"))
    return out


@pytest.mark.parametrize("call", sorted(_tool_options()), ids=" ".join)
def test_other_tools_subcommands_and_options_exist(call, venv_env):
    exe = shutil.which(call[0], path=str(BIN))
    # `jupyter SUB` runs jupyter-SUB, from the distribution of that subcommand
    part = f"jupyter-{call[1]}" if call[0] == "jupyter" else call[0]
    if exe is None or shutil.which(part, path=str(BIN)) is None:
        pytest.skip(f"{part} is not installed here (its extra is not in make test's)")
    proc = subprocess.run([exe, *call[1:], "--help"], capture_output=True, text=True,
                          timeout=120, env=venv_env)
    assert proc.returncode == 0, proc.stderr[-500:]
    for option in _tool_options()[call]:
        assert option in proc.stdout, f"`{' '.join(call)}` has no option {option}"
