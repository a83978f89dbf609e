"""Hostile inputs, issue 13 classes F and G: each ends in one line naming the file (or the
command-line option) and the problem, exit code 2, within a bounded wait, and changes nothing
outside the stage's own output.

F: unknown prompt version; a params file that is a folder, not UTF-8, not YAML or missing when
named; a response cache that is corrupt, truncated, a folder or cannot be written; a zero-byte
PNG (prepare and `annotate IMG`); shards of another record type, garbage named like a shard;
`summary` of a missing folder or a bad report.json; an unreachable dask scheduler.
G: strict types, keys that must agree, caption words checked like captions, unknown keys, and
messages that name the file actually read or the option that gave the value.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hostile import assert_refused, cli_env, run_cli
from loopback_openai import LoopbackOpenAI

from pipeline.core.errors import (
    BadCacheError,
    BadImageError,
    BadParamsError,
    BadShardError,
    SchedulerError,
)
from pipeline.core.params import (
    CacheParams,
    Params,
    PlanParams,
    load_params,
    params_hash,
    parse_params,
    to_yaml,
)

KEY_ENV = "GEOPIXELD_TEST_KEY"
KEY = "sk-test-HOSTILE-INPUTS-0123456789"
SHARD = "val-00000-of-00001.parquet"
PLAN = ["plan", "--tiles", "build/tiles", "--out", "build/plan2"]
PLAN_OUT = ["build/plan2"]
HOLISTIC = ["annotate-holistic", "--tiles", "build/tiles", "--plan", "build/plan",
            "--out", "build/r2"]


def edit_params(ws: Path, changes: dict, name: str = "params.yaml") -> Path:
    """Write `name` in the workspace: its params.yaml with `changes` ({dotted key: value})."""
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = ws / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def refuse_params(ws: Path, changes: dict, *needles: str, args=PLAN) -> str:
    edit_params(ws, changes)
    return assert_refused(args, ws, "bad parameters", "params.yaml", *needles,
                          may_change=PLAN_OUT)


# ---- F: params files ----------------------------------------------------------------------

def test_unknown_prompt_version(workspace):
    refuse_params(workspace, {"plan.prompt_version": "v9"}, "plan.prompt_version", "'v9'")


def test_prompt_version_that_is_a_path(workspace):
    refuse_params(workspace, {"plan.prompt_version": "../../etc"}, "plan.prompt_version")


def test_params_file_that_is_a_folder(workspace):
    (workspace / "other.yaml").mkdir()
    assert_refused([*PLAN, "--params", "other.yaml"], workspace, "other.yaml", "folder",
                   may_change=PLAN_OUT)


def test_params_file_not_utf8(workspace):
    (workspace / "other.yaml").write_bytes(b"plan:\n  prompt_version: v\xff\xfe1\n")
    assert_refused([*PLAN, "--params", "other.yaml"], workspace, "other.yaml", "not UTF-8",
                   may_change=PLAN_OUT)


def test_params_file_named_but_missing(workspace):
    assert_refused([*PLAN, "--params", "nowhere.yaml"], workspace, "nowhere.yaml", "not found",
                   may_change=PLAN_OUT)


def test_params_file_not_yaml(workspace):
    (workspace / "params.yaml").write_text("plan:\n  grid: [3\n")
    assert_refused(PLAN, workspace, "params.yaml", "not valid YAML", "line",
                   may_change=PLAN_OUT)


def test_params_key_given_twice(workspace):
    (workspace / "params.yaml").write_text("plan:\n  grid: 3\n  grid: 4\n")
    assert_refused(PLAN, workspace, "params.yaml", "'grid' given twice", may_change=PLAN_OUT)


def test_params_file_that_is_a_device(workspace):
    start = time.monotonic()  # /dev/zero says 0 bytes and never ends
    assert_refused([*PLAN, "--params", "/dev/zero"], workspace, "/dev/zero",
                   "not a regular file", may_change=PLAN_OUT, timeout=60)
    assert time.monotonic() - start < 15


def test_params_file_that_is_a_list(workspace):
    (workspace / "params.yaml").write_text("- plan\n- prepare\n")
    assert_refused(PLAN, workspace, "params.yaml", "not a mapping", may_change=PLAN_OUT)


# ---- F: the response cache ----------------------------------------------------------------

@pytest.fixture()
def openai_ws(workspace):
    """The workspace with the openai backend (a loopback server; a fake key in the
    environment) and its response cache at cache/responses.sqlite."""
    with LoopbackOpenAI(api_key=KEY) as server:
        edit_params(workspace, {
            "annotate.backend.name": "openai", "annotate.backend.model": "gpt-4o-mini",
            "annotate.backend.openai.base_url": server.base_url,
            "annotate.backend.openai.api_key_env": KEY_ENV,
            "annotate.cache.path": "cache/responses.sqlite"})
        (workspace / "cache").mkdir()
        yield workspace, server
        assert server.counters.requests == 0  # refused before any (paid) request


def refuse_cache(ws: Path, *needles: str) -> str:
    return assert_refused(HOLISTIC, ws, "response cache", *needles, may_change=["build/r2"],
                          env=cli_env(**{KEY_ENV: KEY}))


def _real_cache(path: Path, rows: int = 400) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, text TEXT)")
    conn.executemany("INSERT INTO responses VALUES (?, ?)",
                     [(f"k{i}", "x" * 300) for i in range(rows)])
    conn.commit()
    conn.close()


def test_cache_that_is_garbage(openai_ws):
    ws, _ = openai_ws
    (ws / "cache" / "responses.sqlite").write_text("not a database at all\n" * 50)
    refuse_cache(ws, "cache/responses.sqlite", "not an SQLite database")


def test_cache_that_is_truncated(openai_ws):
    ws, _ = openai_ws
    whole = ws / "whole.sqlite"
    _real_cache(whole)
    (ws / "cache" / "responses.sqlite").write_bytes(whole.read_bytes()[:5000])
    whole.unlink()
    refuse_cache(ws, "cache/responses.sqlite", "corrupt or truncated")


def test_cache_that_is_a_folder(openai_ws):
    ws, _ = openai_ws
    (ws / "cache" / "responses.sqlite").mkdir()
    refuse_cache(ws, "cache/responses.sqlite", "folder")


def test_cache_that_cannot_be_created(openai_ws):
    ws, _ = openai_ws  # its folder would have to be a file of the user's
    edit_params(ws, {"annotate.cache.path": "reviews/decisions.jsonl/responses.sqlite"})
    refuse_cache(ws, "reviews/decisions.jsonl", "is a file, not a folder")


def test_cache_of_another_program(openai_ws):
    ws, _ = openai_ws
    _real_cache(ws / "cache" / "responses.sqlite")  # a responses table, other columns
    refuse_cache(ws, "cache/responses.sqlite", "not a response cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_cache_that_is_read_only(openai_ws):
    ws, _ = openai_ws
    folder = ws / "cache"
    folder.chmod(0o555)
    try:
        refuse_cache(ws, "cache/responses.sqlite", "cannot be")
    finally:
        folder.chmod(0o755)


# ---- F: images and shards -----------------------------------------------------------------

def test_zero_byte_png_to_prepare(workspace):
    (workspace / "data/isaid/val/images/P0003.png").write_bytes(b"")
    assert_refused(["prepare", "--split", "val", "--out", "build/tiles2"], workspace,
                   "bad image", "P0003.png", "empty file", may_change=["build/tiles2"])


def test_zero_byte_png_to_annotate(workspace):
    edit_params(workspace, {"compose.require_phrases": False})
    (workspace / "new").mkdir()
    (workspace / "new" / "scene.png").write_bytes(b"")
    assert_refused(["annotate", "new", "--out", "out"], workspace, "bad image",
                   "new/scene.png", "empty file", may_change=["out"])


def test_shards_of_another_record_type_to_plan(workspace):
    assert_refused(["plan", "--tiles", "build/records", "--out", "build/plan2"], workspace,
                   "bad shard", f"build/records/{SHARD}", "GroundedRecord", "Tile",
                   may_change=PLAN_OUT)


def test_shards_of_another_record_type_to_export(workspace):
    assert_refused(["export", "--records", "build/tiles", "--out", "build/export2"],
                   workspace, "bad shard", f"build/tiles/{SHARD}", "holds Tile records",
                   "GroundedRecord", may_change=["build/export2"])


def test_garbage_named_like_a_shard(workspace):
    (workspace / "build/tiles" / SHARD).write_bytes(b"PAR1 this is not parquet\n" * 100)
    assert_refused(PLAN, workspace, "bad shard", f"build/tiles/{SHARD}", "not a Parquet file",
                   may_change=PLAN_OUT)


def test_parquet_without_the_record_columns(workspace):
    pq.write_table(pa.table({"a": [1, 2]}), workspace / "build/tiles" / SHARD)
    assert_refused(PLAN, workspace, "bad shard", f"build/tiles/{SHARD}", "no column",
                   "tile_id", may_change=PLAN_OUT)


# ---- F: summary and the scheduler ---------------------------------------------------------

def test_summary_of_a_missing_folder(workspace):
    assert_refused(["summary", "nowhere"], workspace, "nowhere", "not found")


def test_summary_with_a_bad_report(workspace):
    (workspace / "build/plan/report.json").write_text('{"stage": "plan", ')
    assert_refused(["summary", "build"], workspace, "build/plan/report.json", "not valid JSON",
                   may_change=["build/plan/report.json"])


def test_summary_with_a_report_that_is_not_an_object(workspace):
    (workspace / "build/plan/report.json").write_text("[1, 2]\n")
    assert_refused(["summary", "build"], workspace, "build/plan/report.json", "not an object",
                   may_change=["build/plan/report.json"])


def test_unreachable_scheduler_is_one_line_within_seconds(workspace):
    start = time.monotonic()
    assert_refused([*PLAN, "--scheduler", "tcp://127.0.0.1:1"], workspace, "scheduler",
                   "tcp://127.0.0.1:1", "cannot reach", may_change=PLAN_OUT, timeout=60)
    assert time.monotonic() - start < 15


def test_scheduler_that_never_answers_is_one_line_within_seconds(workspace):
    """A listener that accepts and never speaks (dask bounds the connect, not the handshake)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        start = time.monotonic()
        assert_refused([*PLAN, "--scheduler", address], workspace, "scheduler", address,
                       "cannot reach", may_change=PLAN_OUT, timeout=60)
        assert time.monotonic() - start < 15
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_scheduler_address_that_is_not_one(workspace):
    start = time.monotonic()
    assert_refused([*PLAN, "--scheduler", "garbage"], workspace, "scheduler", "'garbage'",
                   "not a dask scheduler address", may_change=PLAN_OUT, timeout=60)
    assert time.monotonic() - start < 15


# ---- G: types -----------------------------------------------------------------------------

def test_true_is_not_a_number(workspace):
    refuse_params(workspace, {"plan.grid": True}, "plan.grid", "valid integer", "True")


def test_true_is_not_a_float(workspace):
    refuse_params(workspace, {"plan.cluster_region_share": True},
                  "plan.cluster_region_share", "valid number")


def test_string_is_not_an_int(workspace):
    refuse_params(workspace, {"prepare.tile_size": "5"}, "prepare.tile_size", "valid integer",
                  "'5'")


def test_list_is_not_a_string(workspace):
    refuse_params(workspace, {"data.root": ["data", "isaid"]}, "data.root", "valid string")


def test_unknown_key_with_a_suggestion(workspace):
    refuse_params(workspace, {"prepare.tile_sise": 800}, "prepare.tile_sise", "unknown key",
                  "tile_size")


# ---- G: keys that must agree --------------------------------------------------------------

def test_backoff_base_above_its_maximum(workspace):
    refuse_params(workspace, {"annotate.backend.openai.backoff_base_s": 120.0,
                              "annotate.backend.openai.backoff_max_s": 60.0},
                  "annotate.backend.openai.backoff_base_s", "backoff_max_s")


def test_poll_interval_above_its_maximum(workspace):
    refuse_params(workspace, {"annotate.backend.openai.batch.poll_interval_s": 900.0},
                  "annotate.backend.openai.batch.poll_interval_s", "poll_max_interval_s")


def test_cluster_info_not_largest_first(workspace):
    refuse_params(workspace, {"plan.cluster_info": [[2, "a few"], [20, "numerous"]]},
                  "plan.cluster_info", "largest first")


def test_cluster_info_count_not_positive(workspace):
    refuse_params(workspace, {"plan.cluster_info": [[5, "several"], [0, "no"]]},
                  "plan.cluster_info.1.0", "greater than or equal to 1")


def test_split_name_unsafe_as_a_file_name(workspace):
    refuse_params(workspace, {"data.splits": ["val", "../outside"]}, "data.splits.1",
                  "not a safe file name")


def test_export_folder_name_unsafe(workspace):
    refuse_params(workspace, {"export.split_names": {"val": "a/b"}}, "export.split_names.val",
                  "not a safe file name")


# ---- G: words that reach captions ---------------------------------------------------------

@pytest.mark.parametrize("word,shown", [
    ("a <p> few", "<p>"),
    ("few [SEG]", "[SEG]"),
    ("a\nfew", "\\n"),
    ("\x1b[31mred", "\\x1b"),
])
def test_cluster_word_checked_like_a_caption(workspace, word, shown):
    line = refuse_params(workspace, {"plan.cluster_info": [[5, "several"], [2, word]]},
                         "plan.cluster_info.1.1", "cannot go into a caption", shown)
    assert "\x1b" not in line


def test_question_with_a_grounding_tag(workspace):
    refuse_params(workspace, {"export.instruction": "Describe <p> it </p> [SEG]"},
                  "export.instruction", "tag-like")


# ---- G: the message names the file read, or the option ------------------------------------

def test_other_params_file_is_named(workspace):
    edit_params(workspace, {"plan.grid": "3"}, name="other.yaml")
    line = assert_refused([*PLAN, "--params", "other.yaml"], workspace, "other.yaml",
                          "plan.grid", may_change=PLAN_OUT)
    assert "params.yaml" not in line


def test_bad_backend_option_names_the_option(workspace):
    line = assert_refused([*HOLISTIC, "--backend", "nosuch"], workspace, "--backend",
                          "annotate.backend.name", "'nosuch'", may_change=["build/r2"])
    assert "params.yaml" not in line


def test_bad_split_option_names_the_option(workspace):
    line = assert_refused(["prepare", "--split", "../etc", "--out", "build/tiles2"],
                          workspace, "--split", "data.splits", may_change=["build/tiles2"])
    assert "params.yaml" not in line


def test_bad_backend_option_to_annotate_imagery(workspace):
    (workspace / "new").mkdir()
    line = assert_refused(["annotate", "new", "--out", "out", "--backend", "nosuch"],
                          workspace, "--backend", "'nosuch'", may_change=["out"])
    assert "params.yaml" not in line


def test_named_params_file_and_summary_still_work(workspace):
    proc = run_cli([*PLAN, "--params", "params.yaml"], workspace)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["summary", "build"], workspace)
    assert proc.returncode == 0 and "plan" in proc.stdout, proc.stderr[-2000:]


# ---- unit: the params models --------------------------------------------------------------

def test_yaml_natural_values_still_accepted(tmp_path):
    """An int where a float is expected, lists for the (count, word) pairs, and the generated
    file itself: all read as before, to the same values and hashes."""
    raw = Params().model_dump(mode="json")
    raw["plan"]["cluster_region_share"] = 1
    raw["annotate"]["backend"]["temperature"] = 0
    params = parse_params(raw)
    assert params.plan.cluster_region_share == 1.0
    assert params.plan.cluster_info == PlanParams().cluster_info
    assert parse_params(Params().model_dump(mode="json")) == Params()
    path = tmp_path / "p.yaml"
    path.write_text(to_yaml(Params()))
    assert load_params(path) == Params()


def test_source_is_carried_but_not_hashed(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("plan:\n  grid: 2\n")
    b.write_text("plan:\n  grid: 2\n")
    pa_, pb = load_params(a), load_params(b)
    assert pa_ == pb and params_hash(pa_.plan) == params_hash(pb.plan)
    assert pa_.plan.digest() == PlanParams(grid=2).digest()
    assert pa_.plan.where("grid") == str(a) and pb.annotate.backend.where("name") == str(b)
    assert pa_.plan.model_dump() == PlanParams(grid=2).model_dump()


def test_missing_default_file_gives_defaults_but_named_one_is_refused(tmp_path):
    assert load_params(tmp_path / "params.yaml") == Params()
    with pytest.raises(BadParamsError, match="not found"):
        load_params(tmp_path / "params.yaml", required=True)


@pytest.mark.parametrize("section,value", [
    ({"plan": {"max_marks_per_tile": 2.0}}, "valid integer"),
    ({"plan": {"batched_marks": "yes"}}, "valid boolean"),
    ({"prepare": {"tile_size": True}}, "valid integer"),
    ({"data": {"splits": ["val", "val"]}}, "given twice"),
    ({"evaluate": {"split": "a b"}}, "not a safe file name"),
    ({"finetune": {"question": "Describe\u202e this"}}, "invisible"),
    ({"compose": {"llm_prompt_version": "v0"}}, "not a prompt version"),
    ({"plan": {"cluster_info": [[5, "x" * 41]]}}, "at most 40"),
    ({"plan": {"cluster_info": [[5, "two  spaces"]]}}, "cannot go into a caption"),
])
def test_strict_and_caption_checks(section, value):
    with pytest.raises(BadParamsError, match=value):
        parse_params(section, "x.yaml")


def test_override_blames_its_option():
    from pipeline.core.params import override_params

    base = parse_params({}, "p.yaml")
    with pytest.raises(BadParamsError) as err:
        override_params(base, {"annotate.backend.name": ("--backend", "nosuch")})
    assert err.value.path == "--backend"
    made = override_params(base, {"annotate.backend.name": ("--backend", "openai"),
                                  "compose.composer": ("--composer", None)})
    assert made.annotate.backend.where("name") == "--backend"
    assert made.annotate.backend.where("model") == "p.yaml"
    assert made.compose.where("composer") == "p.yaml"


# ---- unit: readers --------------------------------------------------------------------------

def test_prompt_versions_are_folder_names_only():
    import prompts

    with pytest.raises(KeyError):
        prompts.template("holistic", "../prompts/v1")
    with pytest.raises(BadParamsError):
        prompts.template("holistic", "v9")
    assert prompts.template("holistic", "v1")


def test_cache_check_names_the_file(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(BadCacheError) as err:
        from annotators.cache import ResponseCache
        ResponseCache.from_params(CacheParams(path=str(bad)))
    assert str(bad) in err.value.one_line()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")  # a zero-byte file is an empty database: fine
    from annotators.cache import ResponseCache
    assert len(ResponseCache.from_params(CacheParams(path=str(empty)))) == 0


def test_read_records_refuses_other_types_and_rows(tmp_path):
    from pipeline.core.shards import read_records, write_records
    from schemas import Tile, Window

    path = tmp_path / SHARD
    pq.write_table(pa.table({"tile_id": ["t"]}), path)
    with pytest.raises(BadShardError, match="no column"):
        read_records(path, Tile)
    tile = Tile(tile_id="t", source="isaid", split="val", image_name="P1",
                window=Window(y0=0, y1=1, x0=0, x1=1), height=1, width=1, image_png=b"",
                image_sha256="0", objects=[])
    write_records(path, [tile], Tile)
    assert read_records(path, Tile) == [tile]
    from schemas import GroundedRecord
    with pytest.raises(BadShardError, match="holds Tile records"):
        read_records(path, GroundedRecord)


def test_empty_image_bytes_are_a_bad_image():
    from pipeline.core.imaging import decode_image, decode_png

    with pytest.raises(BadImageError, match="empty file"):
        decode_image(b"", "x.png", 1000)
    with pytest.raises(BadImageError):
        decode_png(b"")


def test_scheduler_address_checked_before_connecting():
    from pipeline.core.runner import check_address

    check_address("tcp://127.0.0.1:8786")
    check_address("127.0.0.1:8786")
    for bad in ("garbage", "foo://127.0.0.1:1", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:x"):
        with pytest.raises(SchedulerError):
            check_address(bad)
