"""Honest identity: dvc.yaml is generated from the code (deps = each command's import closure,
params = generation settings key by key), every module a stage really loads is among its deps,
and run settings change neither params_hash nor a single exported byte."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hostile import cli_env, run_cli, tree_digest

from pipeline.core import dvc_graph
from pipeline.core.params import Params, load_params, params_hash

FIRST_PARTY_RE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S+)\s*$")

RUNTIME_STAGES = ["compose", "qa"]

# A change to each of these must leave the records (and their params_hash) as they were.
RUN_SETTINGS = {
    ("annotate", "backend", "openai", "concurrency"): 3,
    ("annotate", "backend", "openai", "timeout_s"): 7.5,
    ("annotate", "backend", "openai", "max_attempts"): 2,
    ("annotate", "backend", "openai", "backoff_max_s"): 3.0,
    ("annotate", "backend", "openai", "http_client"): "httpx",
    ("annotate", "backend", "openai", "mode"): "batch",
    ("annotate", "backend", "openai", "batch", "poll_interval_s"): 5.0,
    ("annotate", "backend", "transformers", "batch_size"): 8,
    ("annotate", "max_failed_share"): 0.5,
    ("compose", "max_dropped_share"): 0.9,
}


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def test_dvc_yaml_is_generated_from_the_code(repo_root):
    committed = (repo_root / "dvc.yaml").read_text()
    assert committed == dvc_graph.dvc_yaml(), (
        "dvc.yaml is stale: run `python -m pipeline.core.dvc_graph > dvc.yaml`")


def test_every_stage_lists_its_command_and_the_record_types(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [s.name for s in dvc_graph.STAGES]
    for name, stage in stages.items():
        deps = set(stage["deps"])
        assert {"pipeline/cli.py", "pipeline/core/params.py"} <= deps, name
        if name not in ("prepare",):
            assert "schemas/records.py" in deps, name
    assert "pipeline/core/imaging.py" in stages["plan"]["deps"]
    assert {"pipeline/stages/plan.py", "pipeline/stages/annotate.py"} <= set(
        stages["annotate-holistic"]["deps"]) | {"pipeline/stages/plan.py"}
    assert "annotators/template.py" in stages["annotate-holistic"]["deps"]
    assert "pipeline/stages/compose/llm.py" in stages["compose"]["deps"]
    assert "pipeline/formats/report_assets" in stages["qa"]["deps"]


def test_params_list_generation_settings_only(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    listed = {k for s in stages.values() for k in s["params"]}
    for path in RUN_SETTINGS:
        assert ".".join(path) not in listed
    assert not any(k.startswith("annotate.cache") for k in listed)
    assert {"annotate.backend.model", "annotate.backend.temperature",
            "annotate.backend.seed", "annotate.backend.openai.image_format",
            "plan.grid", "compose.max_caption_chars"} <= listed
    # compose records the hash of the sections before it
    assert "plan.max_marks_per_tile" in stages["compose"]["params"]


def test_closure_follows_function_level_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("import pipeline.stages\n\ndef go():\n"
                                "    from pipeline.stages.a import run\n")
    (pkg / "stages" / "a.py").write_text("def run():\n    import pipeline.stages.b\n")
    (pkg / "stages" / "b.py").write_text("import json\n")
    (pkg / "stages" / "c.py").write_text("")
    found = dvc_graph.closure(dvc_graph.command_modules("go", tmp_path), tmp_path)
    assert found == {"pipeline", "pipeline.cli", "pipeline.stages", "pipeline.stages.a",
                     "pipeline.stages.b"}
    with pytest.raises(KeyError):
        dvc_graph.command_modules("nothing", tmp_path)


def _loaded_first_party(stderr: str) -> set[str]:
    """First-party modules from `python -X importtime` output."""
    found = set()
    for line in stderr.splitlines():
        m = FIRST_PARTY_RE.match(line)
        if m and m.group(1).split(".")[0] in dvc_graph.FIRST_PARTY:
            found.add(m.group(1))
    return found


@pytest.mark.parametrize("stage_name", RUNTIME_STAGES)
def test_modules_a_stage_loads_are_its_deps(stage_name, workspace):
    """Run the stage's own dvc.yaml command under `python -X importtime`: every first-party
    module it loads must be a dep of that stage."""
    stage = next(s for s in dvc_graph.STAGES if s.name == stage_name)
    args = stage.cmd.split()[1:]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", *args],
                          cwd=workspace, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = _loaded_first_party(proc.stderr)
    assert f"pipeline.stages.{stage_name}" in loaded or stage_name == "compose"
    deps = dvc_graph.code_deps(stage)

    def listed(module: str) -> bool:
        path = dvc_graph.module_file(module).relative_to(dvc_graph.ROOT).as_posix()
        return any(path == d or path.startswith(d + "/") for d in deps)

    missing = sorted(m for m in loaded if not listed(m))
    assert not missing, f"{stage_name} loads modules dvc.yaml does not list: {missing}"


def test_run_settings_do_not_change_params_hash():
    base = Params()
    changed = base.model_dump()
    for path, value in RUN_SETTINGS.items():
        _set(changed, path, value)
    _set(changed, ("annotate", "cache", "path"), "/elsewhere/responses.sqlite")
    _set(changed, ("annotate", "backend", "openai", "prices"),
         {"gpt-4o": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})
    other = Params.model_validate(changed)
    assert other != base

    def record_hash(p: Params) -> str:
        return params_hash(p.prepare, p.plan, p.annotate, p.compose)

    assert record_hash(other) == record_hash(base)
    for path, value in [(("annotate", "backend", "temperature"), 0.3),
                        (("annotate", "backend", "openai", "image_format"), "jpeg"),
                        (("plan", "grid"), 4), (("compose", "max_phrases"), 7)]:
        dumped = base.model_dump()
        _set(dumped, path, value)
        assert record_hash(Params.model_validate(dumped)) != record_hash(base), path


def test_run_settings_leave_every_exported_byte(workspace, tmp_path):
    """The same build with every run setting changed: the exports are byte-identical."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    for path, value in RUN_SETTINGS.items():
        if path[-1] == "mode":  # the template backend has no Batch API to wait for
            continue
        _set(params, path, value)
    _set(params, ("annotate", "cache", "path"), str(tmp_path / "other-cache.sqlite"))
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(workspace / "params.yaml")  # the edited file is valid
    proc = run_cli(["build", "--split", "val", "--out", "build2"], workspace)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for folder in ("export", "records", "reviewed"):
        before, after = (_data_files(workspace / out / folder) for out in ("build", "build2"))
        assert before and before == after, folder


def _data_files(folder: Path) -> dict[str, str]:
    """Digests of a stage folder's data files (its report and marker name the run's paths)."""
    return {k: v for k, v in tree_digest(folder).items()
            if Path(k).name not in ("report.json", ".geopixeld-stage.json")}
