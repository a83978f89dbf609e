"""Every GPU figure the benchmarks promise, measured in one run and written to one JSON.

Parts, in this order, each the existing benchmark's own code (its `measure` functions, with
its own options) on random-initialised models at the real shapes:

  lmm       bench/local_lmm.py at Qwen2.5-VL-7B's shape (bf16): plain one-at-a-time `generate`,
            plain batched `generate`, the transformers backend (prefix sharing); calls/s of
            each, the ratios (targets: backend >= 3x plain batched, >= 20 calls/s), peak GPU
            memory, answers token-identical to one-at-a-time `generate`
  sam       bench/sam_box_prompts.py with SAM ViT-H (float32, as the pipeline runs it): box-
            prompted masks/s with one image encoding per tile (batched, 1 by 1) vs one per box
  finetune  bench/finetune_throughput.py at the 7B + ViT-H shape (bf16, gradient
            checkpointing, LoRA r=8) on the bundled 800x800 GeoPixelD record: training
            samples/s, peak GPU memory, GeoPixel step vs LM-only step
  evaluate  the same model (handed over by `finetune` when it ran, else built): RS-GCG
            predictions (`finetune.predict.generate_predictions`) and scoring
            (`finetune.evaluate.evaluate_gcg`), records/s of each and of both, peak memory

Every part is guarded: one that fails records its error (and whatever it measured before)
and the suite goes on. A global time budget (`--budget-s`, default 540 s) is shared among the
parts still to run in proportion to their weights, each part is stopped when its share is
spent (SIGALRM), and a part that cannot get its minimum is skipped with the reason recorded.
The JSON is rewritten after every part, so a run cut short keeps what it measured.

    python bench/gpu_suite.py                        # one H100: all parts, 9 minutes at most
    python bench/gpu_suite.py --small                # any CPU: the same code at tiny shapes
    python bench/gpu_suite.py --parts sam,lmm --budget-s 300
    python bench/gpu_suite.py --dry-run              # the plan: parts, options, shares
    python bench/gpu_suite.py --extra "lmm=--patches 32"   # append options to one part

Output (`--out`, default bench/results/gpu_suite.json, or gpu_suite_small.json with --small):
`parts.<name>` = {status: ok|error|skipped, wall_s, allowance_s, error, reason, context
(shape, device, dtype, workload), torch, transformers, peak_gpu_gib, figures: {name: {value,
unit, ...}}}, and `figures`: every figure once more as a flat list, each with its part, unit,
shape, device, dtype and the torch/transformers versions. The exit status is 0 when every
selected part ran to the end, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_OUT = BENCH / "results" / "gpu_suite.json"
DEFAULT_OUT_SMALL = BENCH / "results" / "gpu_suite_small.json"
DEFAULT_BUDGET_S = 540.0


class PartTimeout(BaseException):
    """Raised in a part when its share of the budget is spent (a BaseException, so that no
    `except Exception` inside a library swallows it)."""


@dataclass
class Part:
    """One benchmark of the suite: `run(ctx)` measures into `ctx.out`; `full` and `small` are
    the options handed to the benchmark's own parser in each mode; `weight` is its share of
    the budget (against the other parts still to run), `min_s` the least time worth starting
    it with, per mode."""

    name: str
    run: Callable[["PartContext"], None]
    full: list[str]
    small: list[str]
    weight: float
    min_s: tuple[float, float]  # (full, small)
    hands_over: bool = False  # leaves ctx.shared for the next part
    about: str = ""


@dataclass
class PartContext:
    name: str
    options: list[str]
    small: bool
    out: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def say(self, line: str) -> None:
        print(f"[{self.name}] {line}", flush=True)


def _bench_module(name: str):
    """A bench/ module by name (imported here, so that an import error is the part's)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return __import__(name)


def _require_device(options: list[str]) -> None:
    import torch

    if "cuda" in options and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here (run the suite with --small on a CPU)")


def run_lmm(ctx: PartContext) -> None:
    _require_device(ctx.options)
    lmm = _bench_module("local_lmm")
    lmm.measure(lmm.build_parser().parse_args(ctx.options), ctx.out, ctx.say)


def run_sam(ctx: PartContext) -> None:
    _require_device(ctx.options)
    sam = _bench_module("sam_box_prompts")
    sam.measure(sam.build_parser().parse_args(ctx.options), ctx.out, ctx.say)


def run_finetune(ctx: PartContext) -> None:
    _require_device(ctx.options)
    ft = _bench_module("finetune_throughput")
    setup = ft.Setup(ft.build_parser().parse_args(ctx.options), ctx.say)
    ctx.shared["setup"], ctx.shared["options"] = setup, list(ctx.options)
    ft.measure_training(setup, ctx.out, ctx.say)


def run_evaluate(ctx: PartContext) -> None:
    _require_device(ctx.options)
    ft = _bench_module("finetune_throughput")
    setup = ctx.shared.get("setup") if ctx.shared.get("options") == ctx.options else None
    ctx.shared.clear()
    if setup is None:
        setup = ft.Setup(ft.build_parser().parse_args(ctx.options), ctx.say)
        how = "built for this part"
    else:
        how = "handed over by the finetune part (after its training steps)"
    ctx.out.setdefault("context", {})["model"] = how
    ft.measure_evaluation(setup, ctx.out, ctx.say)


_FT_FULL = ["--device", "cuda", "--shape", "7b", "--warmup-steps", "2", "--steps", "6",
            "--eval-records", "4", "--eval-batch-size", "2", "--max-new-tokens", "256"]
_FT_SMALL = ["--device", "cpu", "--shape", "tiny", "--warmup-steps", "1", "--steps", "2",
             "--eval-records", "2", "--eval-batch-size", "2", "--max-new-tokens", "16"]

PARTS = [
    Part("lmm", run_lmm,
         full=["--device", "cuda", "--shape", "7b", "--patches", "24", "--new-tokens", "64",
               "--plain-requests", "8", "--plain-batches", "20,40",
               "--backend-batches", "40,120", "--repeats", "1"],
         small=["--device", "cpu", "--shape", "tiny", "--patches", "2", "--new-tokens", "16",
                "--plain-requests", "3", "--plain-batches", "5,10", "--backend-batches", "5,10",
                "--repeats", "1"],
         weight=0.40, min_s=(90, 5),
         about="local LMM at the 7B shape: one at a time / plain batched / backend, calls/s"),
    Part("sam", run_sam,
         full=["--device", "cuda", "--model", "vit_h", "--tiles", "4", "--boxes", "32",
               "--batch", "64"],
         small=["--device", "cpu", "--small", "--tiles", "2", "--boxes", "8"],
         weight=0.12, min_s=(30, 5),
         about="SAM ViT-H box prompts: masks/s, one encoding per tile vs one per box"),
    Part("finetune", run_finetune, full=_FT_FULL, small=_FT_SMALL, weight=0.28,
         min_s=(60, 5), hands_over=True,
         about="fine-tuning at 800x800: samples/s, peak memory, GeoPixel vs LM-only step"),
    Part("evaluate", run_evaluate, full=_FT_FULL, small=_FT_SMALL, weight=0.20,
         min_s=(45, 5),
         about="evaluation: predictions and RS-GCG scoring, records/s, peak memory"),
]
PART_NAMES = [p.name for p in PARTS]


# --- time limits -------------------------------------------------------------------------

class _Alarm:
    """A one-shot SIGALRM that raises PartTimeout in the main thread while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.seconds = 0.0
        self.usable = hasattr(signal, "setitimer")

    def _fire(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise PartTimeout(f"stopped after its share of the budget, {self.seconds:.0f} s")

    @contextlib.contextmanager
    def limit(self, seconds: float):
        if not self.usable:
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._fire)
        self.seconds, self.armed = seconds, True
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
        try:
            yield
        finally:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# --- the run -----------------------------------------------------------------------------

def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "segment-anything", "peft", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state() -> dict | None:
    """The commit of the tree measured and whether it had changes (None without git)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "versions": versions()}
    if "torch" in sys.modules:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name()
            env["gpu_memory_gib"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def _module_versions(fallback: dict) -> dict:
    """torch and transformers as imported (with their local tags), else as installed."""
    found = {}
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        found[name] = getattr(module, "__version__", None) or fallback.get(name)
    return found


def _torch_threads(restore: int | None = None) -> int | None:
    """torch's CPU thread count (None before torch is imported), set to `restore` if given."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if restore is not None:
        torch.set_num_threads(restore)
    return torch.get_num_threads()


def _gpu_reset() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> float | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def flat_figures(result: dict) -> list[dict]:
    """Every figure of every part, each with its part, unit and the context it was measured
    in (shape, device, dtype, torch and transformers versions)."""
    rows = []
    for name, part in result["parts"].items():
        context = part.get("context", {})
        for figure, entry in part.get("figures", {}).items():
            rows.append({"part": name, "figure": figure, **entry,
                         "shape": context.get("shape"), "device": context.get("device"),
                         "device_name": context.get("device_name"),
                         "dtype": context.get("dtype"), "torch": part.get("torch"),
                         "transformers": part.get("transformers")})
    return rows


def write_result(result: dict, out: Path | None) -> None:
    if out is None:
        return
    result["figures"] = flat_figures(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def run_suite(parts: list[Part], selected: list[str], *, small: bool, budget_s: float,
              out: Path | None = None, dry_run: bool = False,
              extra: dict[str, list[str]] | None = None, preload: tuple[str, ...] = (),
              clock: Callable[[], float] = time.monotonic) -> dict:
    """Run the `selected` parts in suite order within `budget_s`; return (and write to `out`
    after every part) the result. Parts not selected are listed as skipped. The `preload`
    modules are imported first (their time is `import_s`, not the first part's)."""
    extra = extra or {}
    start = clock()
    result = {"suite": "bench/gpu_suite.py", "mode": "small" if small else "full",
              "dry_run": dry_run, "command": [sys.executable, *sys.argv],
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "budget_s": budget_s, "git": git_state(), "environment": environment(),
              "parts": {}}
    for part in parts:
        result["parts"][part.name] = {
            "status": "pending" if part.name in selected else "skipped", "about": part.about,
            "options": (part.small if small else part.full) + extra.get(part.name, [])}
        if part.name not in selected:
            result["parts"][part.name]["reason"] = "not selected (--parts)"
    versions_now = result["environment"]["versions"]
    shared: dict = {}
    alarm = _Alarm()
    todo = [p for p in parts if p.name in selected]
    if todo and preload and not dry_run and budget_s > 0:
        began = clock()
        try:
            for module in preload:
                importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - each part then records its own error
            result["import_error"] = _error_text(err)
        result["import_s"] = round(clock() - began, 3)
    try:
        for k, part in enumerate(todo):
            entry = result["parts"][part.name]
            entry.update(torch=versions_now.get("torch"),
                         transformers=versions_now.get("transformers"))
            remaining = budget_s - (clock() - start)
            # the parts still to run share what is left (a dry run plans on the whole budget)
            weights = sum(p.weight for p in (todo if dry_run else todo[k:]))
            allowance = remaining * part.weight / weights if weights else remaining
            least = part.min_s[1] if small else part.min_s[0]
            entry["allowance_s"] = round(max(allowance, 0.0), 1)
            if dry_run:
                entry.update(status="skipped", reason=f"dry run (up to {allowance:.0f} s, "
                             f"at least {least:.0f} s; options {shlex.join(entry['options'])})")
                continue
            if remaining < least or allowance <= 0:
                entry.update(status="skipped", reason=(
                    f"time budget: {max(remaining, 0):.0f} s of {budget_s:.0f} s left, this "
                    f"part needs at least {least:.0f} s"))
                print(f"[{part.name}] skipped: {entry['reason']}", flush=True)
                write_result(result, out)
                continue
            # a part given less than its minimum share still gets its minimum
            allowance = max(allowance, least)
            entry["allowance_s"] = round(allowance, 1)
            ctx = PartContext(part.name, list(entry["options"]), small, shared=shared)
            print(f"[{part.name}] {part.about}; up to {allowance:.0f} s; options "
                  f"{shlex.join(ctx.options)}", flush=True)
            _gpu_reset()
            threads = _torch_threads()
            began = clock()
            try:
                with alarm.limit(allowance):
                    part.run(ctx)
                entry["status"] = "ok"
            except PartTimeout as err:
                entry.update(status="error", error=f"timeout: {err}")
            except Exception as err:  # noqa: BLE001 - every failure is the part's record
                entry.update(status="error", error=_error_text(err),
                             traceback=traceback.format_exc(limit=-8))
            finally:
                entry["wall_s"] = round(clock() - began, 3)
                entry["context"] = ctx.out.get("context", {})
                entry["figures"] = ctx.out.get("figures", {})
                entry["peak_gpu_gib"] = _gpu_peak()
                entry.update(_module_versions(versions_now))
                if entry["status"] != "ok" or not part.hands_over:
                    shared.clear()
                del ctx
                _release_memory()
                _torch_threads(threads)  # a part's thread setting is its own
            if entry["status"] == "ok":
                print(f"[{part.name}] done in {entry['wall_s']:.1f} s", flush=True)
            else:
                print(f"[{part.name}] {entry['error']}", flush=True)
            result["environment"] = environment()
            write_result(result, out)
    finally:
        shared.clear()
        result["wall_s"] = round(clock() - start, 3)
        result["environment"] = environment()
        write_result(result, out)
    return result


# --- the side-by-side summary ------------------------------------------------------------

def _value(part: dict, name: str):
    return (part.get("figures", {}).get(name) or {}).get("value")


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value} {unit}".strip()


def summary_lines(result: dict) -> list[str]:
    """The figures of each part on one or two lines, ways and their ratios side by side."""
    lines = []
    for name, part in result["parts"].items():
        c = part.get("context", {})
        head = (f"{name:<9}{part['status']:<8}{_fmt(part.get('wall_s'), 's'):>9}  "
                f"[{c.get('shape', '-')}, {c.get('device', '-')}, {c.get('dtype', '-')}]")
        if part["status"] == "skipped":
            lines.append(f"{head} {part.get('reason', '')}")
            continue
        figures = part.get("figures", {})
        if name == "lmm":
            plain = figures.get("best_plain_batched_calls_per_s", {})
            back = figures.get("best_backend_calls_per_s", {})
            body = (f"calls/s: one at a time {_fmt(_value(part, 'one_at_a_time_calls_per_s'))}"
                    f" | plain batched {_fmt(plain.get('value'))} (b{plain.get('batch', '-')})"
                    f" | backend {_fmt(back.get('value'))} (b{back.get('batch', '-')}); "
                    f"backend/plain batched "
                    f"{_fmt(_value(part, 'ratio_backend_over_plain_batched'), 'x')} "
                    f"(target >= 3), backend/one at a time "
                    f"{_fmt(_value(part, 'ratio_backend_over_one_at_a_time'), 'x')}")
        elif name == "sam":
            body = (f"masks/s: once/tile batched "
                    f"{_fmt(_value(part, 'once_per_tile_batched_masks_per_s'))} | once/tile "
                    f"1 by 1 {_fmt(_value(part, 'once_per_tile_single_masks_per_s'))} | "
                    f"once/box {_fmt(_value(part, 'once_per_box_masks_per_s'))}; vs once/box "
                    f"{_fmt(_value(part, 'ratio_once_per_tile_batched_over_once_per_box'), 'x')}"
                    f", {_fmt(_value(part, 'ratio_once_per_tile_single_over_once_per_box'), 'x')}")
        elif name == "finetune":
            body = (f"train {_fmt(_value(part, 'train_samples_per_s'), 'samples/s')}, peak "
                    f"{_fmt(_value(part, 'peak_gpu_memory_train'), 'GiB')} | GeoPixel step "
                    f"{_fmt(_value(part, 'geopixel_micro_batch_s'), 's')} vs LM-only "
                    f"{_fmt(_value(part, 'lm_only_step_s'), 's')}: "
                    f"{_fmt(_value(part, 'ratio_geopixel_over_lm_only'), 'x')}")
        elif name == "evaluate":
            body = (f"records/s: predict {_fmt(_value(part, 'predict_records_per_s'))} | "
                    f"score {_fmt(_value(part, 'score_records_per_s'))} | both "
                    f"{_fmt(_value(part, 'evaluate_records_per_s'))}; answers "
                    f"{_fmt(_value(part, 'mean_answer_tokens'), 'tokens')}, "
                    f"{_fmt(_value(part, 'predict_answer_tokens_per_s'), 'tokens/s')}, peak "
                    f"{_fmt(_value(part, 'peak_gpu_memory_evaluate'), 'GiB')}")
        else:
            body = ", ".join(f"{k} {_fmt(v.get('value'), v.get('unit', ''))}"
                             for k, v in figures.items())
        lines.append(f"{head} {body}")
        if part.get("error"):
            lines.append(f"{'':<9}error: {part['error']}")
    return lines


# --- the command line --------------------------------------------------------------------

def parse_parts(text: str) -> list[str]:
    if text.strip() in ("", "none"):
        return []
    if text.strip() == "all":
        return list(PART_NAMES)
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PART_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}, all, none")
    return [p for p in PART_NAMES if p in chosen]  # suite order: evaluate after finetune


def parse_extra(values: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for value in values:
        name, sep, options = value.partition("=")
        if not sep or name.strip() not in PART_NAMES:
            raise argparse.ArgumentTypeError(
                f"--extra wants PART=OPTIONS with PART one of {', '.join(PART_NAMES)}: {value!r}")
        extra.setdefault(name.strip(), []).extend(shlex.split(options))
    return extra


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="parts: " + "; ".join(f"{p.name}: {p.about}"
                                                              for p in PARTS))
    ap.add_argument("--small", action="store_true",
                    help="the same code on the CPU at tiny shapes (minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON of figures (default {DEFAULT_OUT.relative_to(REPO)}, "
                         f"{DEFAULT_OUT_SMALL.name} with --small)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="time for the whole run; parts that no longer fit are skipped")
    ap.add_argument("--parts", type=parse_parts, default=list(PART_NAMES),
                    help=f"comma-separated parts, all or none (default all: "
                         f"{','.join(PART_NAMES)})")
    ap.add_argument("--extra", action="append", default=[], metavar="PART=OPTIONS",
                    help="options appended to one part's benchmark options (repeatable)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads with --small (default: up to 2)")
    ap.add_argument("--dry-run", action="store_true",
                    help="write the plan (parts, options, shares of the budget), run nothing")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.extra = parse_extra(args.extra)
    except argparse.ArgumentTypeError as err:
        ap.error(str(err))
    if args.out is None:
        args.out = DEFAULT_OUT_SMALL if args.small else DEFAULT_OUT
    if args.small:
        threads = args.threads or max(1, min(2, os.cpu_count() or 1))
        for part in PARTS:
            args.extra.setdefault(part.name, [])[:0] = ["--threads", str(threads)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"gpu suite ({'small, cpu' if args.small else 'full, cuda'}): parts "
          f"{', '.join(args.parts) or 'none'}; budget {args.budget_s:.0f} s; out {args.out}",
          flush=True)
    result = run_suite(PARTS, args.parts, small=args.small, budget_s=args.budget_s,
                       out=args.out, dry_run=args.dry_run, extra=args.extra,
                       preload=("torch", "transformers"))
    print(f"--- figures ({result['mode']}, {result['wall_s']:.1f} s of {args.budget_s:.0f} s; "
          f"{args.out}) ---")
    for line in summary_lines(result):
        print(line)
    failed = [n for n in args.parts if result["parts"][n]["status"] != "ok"]
    return 0 if args.dry_run or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
