"""bench/gpu_suite.py: argument parsing, the part list, guarded parts and the time budget
(cheap, no model), the whole suite at tiny shapes on the CPU (slow), and at the real shapes
on a GPU (gpu)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "bench" / "gpu_suite.py"
PARTS = ["lmm", "sam", "finetune", "evaluate"]


def load_suite():
    """bench/gpu_suite.py as a module (it imports no torch at the top: cheap)."""
    name = "gpu_suite_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_cli(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc, json.loads(out.read_text())


def test_arguments_and_part_list():
    suite = load_suite()
    assert suite.PART_NAMES == PARTS
    args = suite.parse_args([])
    assert args.parts == PARTS and args.budget_s == 540 and not args.small
    assert args.out == REPO / "bench" / "results" / "gpu_suite.json"
    # parts come back in suite order (evaluate after finetune, which hands its model over)
    assert suite.parse_args(["--parts", "evaluate,lmm"]).parts == ["lmm", "evaluate"]
    assert suite.parse_args(["--parts", "none"]).parts == []
    assert suite.parse_args(["--parts", "all"]).parts == PARTS
    small = suite.parse_args(["--small", "--threads", "3", "--extra", "lmm=--patches 5"])
    assert small.out.name == "gpu_suite_small.json"
    assert small.extra["lmm"] == ["--threads", "3", "--patches", "5"]
    assert small.extra["sam"] == ["--threads", "3"]
    for bad in (["--parts", "lmm,gpt"], ["--extra", "nothing"], ["--extra", "gpt=--x 1"]):
        with pytest.raises(SystemExit):
            suite.parse_args(bad)
    for part in suite.PARTS:
        # the real shapes on the GPU, the tiny ones on the CPU
        assert part.full[part.full.index("--device") + 1] == "cuda"
        assert part.small[part.small.index("--device") + 1] == "cpu"
    assert sum(p.weight for p in suite.PARTS) == pytest.approx(1.0)


def test_parts_are_guarded_and_share_the_budget(tmp_path):
    suite = load_suite()

    def boom(ctx):
        ctx.out.setdefault("figures", {})["before"] = {"value": 1, "unit": "x"}
        raise ValueError("broken part")

    def slow(ctx):
        ctx.out["context"] = {"shape": "tiny", "device": "cpu", "dtype": "float32"}
        ctx.out.setdefault("figures", {})["first"] = {"value": 2.5, "unit": "calls/s"}
        time.sleep(30)  # stopped at its share of the budget

    def give(ctx):
        ctx.shared["model"] = "built"
        ctx.out["figures"] = {"speed": {"value": 3.0, "unit": "samples/s"}}
        ctx.out["context"] = {"shape": "tiny", "device": "cpu", "dtype": "float32"}

    def take(ctx):
        ctx.out["figures"] = {"handed": {"value": ctx.shared.get("model"), "unit": "-"}}

    def never(ctx):
        raise AssertionError("a part past the budget must not start")

    parts = [suite.Part("boom", boom, [], [], 1.0, (0, 0)),
             suite.Part("slow", slow, [], [], 1.0, (0, 0.5)),
             suite.Part("give", give, [], [], 0.1, (0, 0), hands_over=True),
             suite.Part("take", take, [], [], 0.1, (0, 0)),
             suite.Part("late", never, [], [], 1.0, (0, 100)),
             suite.Part("unselected", never, [], [], 1.0, (0, 0))]
    out = tmp_path / "suite.json"
    started = time.monotonic()
    result = suite.run_suite(parts, ["boom", "slow", "give", "take", "late"], small=True,
                             budget_s=4.0, out=out)
    assert time.monotonic() - started < 4.0
    got = result["parts"]
    assert got["boom"]["status"] == "error" and "ValueError: broken part" in got["boom"]["error"]
    assert got["boom"]["figures"]["before"]["value"] == 1  # what it measured is kept
    assert got["slow"]["status"] == "error" and got["slow"]["error"].startswith("timeout")
    assert got["slow"]["wall_s"] < 3 and got["slow"]["figures"]["first"]["value"] == 2.5
    assert got["give"]["status"] == "ok" and got["take"]["status"] == "ok"
    assert got["take"]["figures"]["handed"]["value"] == "built"
    assert got["late"]["status"] == "skipped" and "time budget" in got["late"]["reason"]
    assert got["unselected"]["status"] == "skipped"
    assert "not selected" in got["unselected"]["reason"]
    written = json.loads(out.read_text())
    assert written["parts"].keys() == got.keys() and written["wall_s"] > 0
    flat = {(f["part"], f["figure"]): f for f in written["figures"]}
    speed = flat[("give", "speed")]
    assert speed["unit"] == "samples/s" and speed["device"] == "cpu"
    assert speed["shape"] == "tiny" and speed["dtype"] == "float32"
    assert speed["torch"] and speed["transformers"]
    assert "wall_s" in written["parts"]["give"]


def test_cli_dry_run_none_and_no_budget(tmp_path):
    proc, plan = run_cli("--dry-run", "--out", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr
    assert list(plan["parts"]) == PARTS and plan["mode"] == "full"
    for part in plan["parts"].values():
        assert part["status"] == "skipped" and part["reason"].startswith("dry run")
        assert "cuda" in part["options"] and part["allowance_s"] > 0
    assert sum(p["allowance_s"] for p in plan["parts"].values()) == pytest.approx(540, abs=1)

    proc, none = run_cli("--parts", "none", "--out", str(tmp_path / "none.json"))
    assert proc.returncode == 0, proc.stderr
    assert all(p["reason"] == "not selected (--parts)" for p in none["parts"].values())

    # no time left: the part is skipped with the reason, no model is built, exit status 1
    proc, skipped = run_cli("--small", "--parts", "sam", "--budget-s", "0",
                            "--out", str(tmp_path / "skip.json"))
    assert proc.returncode == 1
    assert "time budget" in skipped["parts"]["sam"]["reason"]
    assert "torch_threads" not in skipped["environment"]  # torch was never imported


def check_figures(result: dict, device: str) -> None:
    assert list(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("reason"))
        assert "error" not in part and part["wall_s"] > 0
        assert part["context"]["device"].startswith(device)
        assert part["torch"] and part["transformers"]
        values = [f["value"] for f in part["figures"].values()]
        assert values and all(f["unit"] for f in part["figures"].values())
        assert all(v is not None for v in values), (name, part["figures"])
    figures = {(f["part"], f["figure"]): f for f in result["figures"]}
    for key in [("lmm", "one_at_a_time_calls_per_s"), ("lmm", "best_plain_batched_calls_per_s"),
                ("lmm", "best_backend_calls_per_s"), ("lmm", "ratio_backend_over_plain_batched"),
                ("sam", "once_per_tile_batched_masks_per_s"), ("sam", "once_per_box_masks_per_s"),
                ("sam", "ratio_once_per_tile_batched_over_once_per_box"),
                ("finetune", "train_samples_per_s"), ("finetune", "ratio_geopixel_over_lm_only"),
                ("evaluate", "predict_records_per_s"), ("evaluate", "evaluate_records_per_s")]:
        figure = figures[key]
        assert figure["value"] > 0 and figure["shape"] and figure["dtype"], figure


@pytest.mark.slow
def test_small_suite_on_cpu(tmp_path):
    out = tmp_path / "small.json"
    proc, result = run_cli("--small", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["mode"] == "small"
    check_figures(result, "cpu")
    assert {p["context"]["shape"] for p in result["parts"].values()} == {"tiny"}
    assert "backend/plain batched" in proc.stdout  # the ways side by side
    # the options of the GPU run are accepted by each benchmark's own parser
    suite = load_suite()
    for part in suite.PARTS:
        module = {"lmm": "local_lmm", "sam": "sam_box_prompts"}.get(part.name,
                                                                    "finetune_throughput")
        suite._bench_module(module).build_parser().parse_args(part.full)


@pytest.mark.gpu
def test_full_suite_on_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "gpu.json"
    proc, result = run_cli("--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_figures(result, "cuda")
    assert result["wall_s"] < 540
    assert result["parts"]["lmm"]["context"]["shape"] == "7b"
    assert result["parts"]["sam"]["context"]["shape"] == "vit_h"
    assert result["parts"]["finetune"]["figures"]["peak_gpu_memory_train"]["value"] > 0
