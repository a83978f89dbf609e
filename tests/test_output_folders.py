"""Issue 13, class A: output folders. A stage replaces only what it wrote, never an input, one
run at a time, and never an output that had records with an empty one.

CLI cases go through the hostile-input harness (exit code, one stderr line, nothing outside the
stage's own output changed); the rules themselves are also tested on `staged_folder`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hostile import assert_refused, cli_env, run_cli, tree_digest

from pipeline.core.errors import EmptyResultError, OutputFolderError
from pipeline.core.output_folders import MARKER, check_output_location, output_lock, staged_folder

# ---- CLI: folders a stage must not replace ----------------------------------------------------

def test_prepare_refuses_a_folder_of_the_users_own_files(workspace):
    own = workspace / "thesis"
    own.mkdir()
    (own / "chapter1.tex").write_text("years of work")
    line = assert_refused(["prepare", "--split", "val", "--out", "thesis"], workspace,
                          "thesis", "did not write")
    assert "output folder" in line
    assert (own / "chapter1.tex").read_text() == "years of work"


def test_prepare_refuses_its_own_source_as_output(workspace):
    assert_refused(["prepare", "--split", "val", "--root", "data/isaid", "--out", "data/isaid"],
                   workspace, "data/isaid", "input")


def test_prepare_refuses_an_output_inside_its_source(workspace):
    assert_refused(["prepare", "--split", "val", "--out", "data/isaid/val/tiles"], workspace,
                   "inside the input")


def test_prepare_refuses_an_output_holding_its_source(workspace):
    assert_refused(["prepare", "--split", "val", "--out", "data"], workspace, "holds the input")


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_the_working_folder_and_its_parents_are_refused(workspace, out):
    assert_refused(["prepare", "--split", "val", "--out", out], workspace, "working folder")
    assert not list(workspace.parent.glob(".*old-*"))


def test_an_existing_file_as_output_is_refused(workspace):
    (workspace / "notes.txt").write_text("keep me")
    assert_refused(["prepare", "--split", "val", "--out", "notes.txt"], workspace, "is a file")


def test_another_stages_output_is_refused(workspace):
    assert_refused(["plan", "--tiles", "build/tiles", "--out", "build/records"], workspace,
                   "output of the compose stage")


def test_plan_refuses_to_write_over_its_own_input(workspace):
    assert_refused(["plan", "--tiles", "build/tiles", "--out", "build/tiles"], workspace,
                   "also an input")


def test_review_refuses_the_folder_of_its_decisions(workspace):
    assert_refused(["review", "--records", "build/records", "--out", "reviews"], workspace,
                   "holds the input")


def test_qa_refuses_a_metrics_file_that_is_an_input(workspace):
    assert_refused(["qa", "--metrics", "build/reviewed/report.json"], workspace,
                   "would overwrite the input")


def test_annotate_refuses_an_output_inside_the_images_it_reads(workspace):
    assert_refused(["annotate", "data/isaid/val/images", "--out", "data/isaid/val/images/ann",
                    "--masks", "coco", "nothing.json"], workspace, "inside the input",
                   may_change=["data/isaid/val/images/ann"])


def test_rerunning_a_stage_replaces_its_own_output(workspace):
    before = tree_digest(workspace / "build" / "plan")
    proc = run_cli(["plan", "--tiles", "build/tiles", "--out", "build/plan"], workspace)
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(workspace / "build" / "plan") == before  # same input, same bytes
    assert json.loads((workspace / "build" / "plan" / MARKER).read_text())["stage"] == "plan"


def test_output_written_before_markers_existed_is_recognised_by_its_report(workspace):
    (workspace / "build" / "plan" / MARKER).unlink()  # as an older version left it
    proc = run_cli(["plan", "--tiles", "build/tiles", "--out", "build/plan"], workspace)
    assert proc.returncode == 0, proc.stderr


# ---- CLI: failure that would wipe a good output ------------------------------------------------

def test_an_empty_result_never_replaces_records(workspace):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["review"]["export_unreviewed"] = False  # nobody reviewed anything: 0 records out
    (workspace / "strict.yaml").write_text(yaml.safe_dump(params))
    assert_refused(["review", "--params", "strict.yaml"], workspace, "0 records_out",
                   "has 10")


# ---- CLI: one run per folder -----------------------------------------------------------------

HOLD = """
import sys, time
from pipeline.core.output_folders import staged_folder
with staged_folder(sys.argv[1], stage="prepare") as staging:
    (staging / "partial.parquet").write_bytes(b"half")
    print("holding", flush=True)
    time.sleep(60)
"""


def _holder(folder: Path, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_run_on_a_locked_folder_fails_fast_naming_the_holder(workspace):
    holder = _holder(workspace / "build" / "tiles", workspace)
    try:
        staging = list((workspace / "build").glob(".tiles.staging-*"))
        assert len(staging) == 1
        start = time.monotonic()
        line = assert_refused(["prepare", "--split", "val", "--out", "build/tiles"], workspace,
                              "another run is writing", f"pid {holder.pid}")
        assert time.monotonic() - start < 30
        assert "since" in line and str(workspace / "build" / "tiles") in line  # its command
        assert staging[0].is_dir()  # the live run's staging folder was not swept
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock went with it, the next run sweeps
    proc = run_cli(["prepare", "--split", "val", "--out", "build/tiles"], workspace)
    assert proc.returncode == 0, proc.stderr
    assert not list((workspace / "build").glob(".tiles.staging-*"))
    assert not (workspace / "build" / ".tiles.lock").exists()


def test_two_concurrent_builds_one_fails_fast_the_other_completes(workspace):
    env = cli_env()
    args = [sys.executable, "-m", "pipeline.cli", "build", "--split", "val", "--out", "fresh"]
    first = subprocess.Popen(args, cwd=workspace, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    second = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=120)
    first_err = first.communicate(timeout=300)[1]
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (first_err[-2000:], second.stderr[-2000:])
    loser_err = second.stderr if second.returncode == 2 else first_err
    lines = [ln for ln in loser_err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another run is writing" in lines[0], loser_err
    # the output is the winner's, whole: every stage folder there, the export readable
    from pycocotools.coco import COCO

    coco = COCO(str(workspace / "fresh" / "export" / "coco" / "val.json"))
    assert len(coco.getImgIds()) == 10
    assert not list((workspace / "fresh").glob(".*.staging-*"))
    assert json.loads((workspace / "fresh" / "export" / "report.json").read_text())["records"] == 10


# ---- the rules on staged_folder itself ---------------------------------------------------------

def test_staged_folder_refuses_foreign_folder_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="did not write"):
        with staged_folder(tmp_path / "out", stage="plan"):
            pass
    assert (tmp_path / "out" / "mine.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_folder_takes_an_empty_folder_and_marks_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with staged_folder(tmp_path / "out", stage="plan") as staging:
        (staging / "a").write_text("1")
    assert json.loads((tmp_path / "out" / MARKER).read_text()) == {"stage": "plan"}
    with staged_folder(tmp_path / "out", stage="plan") as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "b"]


def test_staged_folder_keeps_records_when_a_rerun_counts_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "records"
    with staged_folder(out, stage="compose", count_key="records") as staging:
        (staging / "report.json").write_text(json.dumps({"records": 3}))
    with pytest.raises(EmptyResultError, match="0 records"):
        with staged_folder(out, stage="compose", count_key="records") as staging:
            (staging / "report.json").write_text(json.dumps({"records": 0}))
    assert json.loads((out / "report.json").read_text()) == {"records": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records"]  # no lock, no staging


def test_output_location_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputFolderError, match="root or the home"):
        check_output_location("/")
    with pytest.raises(OutputFolderError, match="root or the home"):
        check_output_location(Path.home())
    with pytest.raises(OutputFolderError, match="working folder"):
        check_output_location(tmp_path)
    with pytest.raises(OutputFolderError, match="also an input"):
        check_output_location("in/", ["./in"])
    link = tmp_path / "alias"
    link.symlink_to(tmp_path / "in")
    with pytest.raises(OutputFolderError, match="also an input"):
        check_output_location(link, ["in"])  # the same folder by another name
    assert check_output_location("out", ["in"]) == (tmp_path / "out").resolve()


def test_root_lock_is_exclusive_and_released(tmp_path):
    with output_lock(tmp_path / "build"):
        code = ("import sys\nfrom pipeline.core.output_folders import output_lock\n"
                "from pipeline.core.errors import GeoPixelDError\n"
                "try:\n    output_lock(sys.argv[1]).__enter__()\n"
                "except GeoPixelDError as e:\n    print(e.one_line())\n")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "build")],
                             capture_output=True, text=True, env=cli_env(), timeout=60)
        assert f"pid {os.getpid()}" in out.stdout
    assert not (tmp_path / "build" / ".geopixeld.lock").exists()
    with output_lock(tmp_path / "build"):
        pass
