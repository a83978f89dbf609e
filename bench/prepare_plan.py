"""Benchmark: the pipeline on synthetic iSAID-format scenes against a decode+encode floor.

Scenes are made from the bundled real samples (flipped / rotated variants of P0003, P0004, P0005
with their id and colour masks). In one run, side by side, each in a fresh subprocess:
- floor: decode every source PNG (image, id mask, colour mask) and encode every tile PNG, nothing
  else, with the same dask runner and worker count as the pipeline (threads: its work is all in
  OpenCV, which releases the GIL, so threads are its fastest local scheduler);
- pipeline: prepare + plan (`--stages plan`), or the whole template pipeline prepare -> export
  (`--stages all`, the default);
- the pipeline again on twice the scenes, for peak memory (resident memory of the subprocess and
  its worker processes together, sampled every 50 ms).
The floor and the pipeline at N run `--repeat` times (2), alternated; each side's fastest run is
compared (these machines are noisy; the fastest run is the least disturbed one).
The pipeline runs with params.yaml's runner defaults (local scheduler `processes`) unless
`--scheduler` says otherwise.
Prints tiles/s, the pipeline/floor time ratio (target <= 3) and peak memory N vs 2N (target:
flat). Usage: python bench/prepare_plan.py [--scenes 100] [--stages all|plan] [--workers 2]
       [--scheduler processes|threads] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = [("val", "P0003"), ("val", "P0004"), ("train", "P0005")]
SUFFIXES = ["", "_instance_id_RGB", "_instance_color_RGB"]
VARIANTS = [None, 0, 1, -1]  # cv2.flip codes (None = unchanged), then 90-degree rotations


def make_scenes(root: Path, count: int) -> None:
    """Write `count` iSAID-format scenes under root/train/images (real pixels, varied)."""
    images = root / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        split, stem = SAMPLES[k % len(SAMPLES)]
        variant = (k // len(SAMPLES)) % (len(VARIANTS) + 2)
        for suffix in SUFFIXES:
            img = cv2.imread(str(REPO / "data" / "isaid" / split / "images" / f"{stem}{suffix}.png"))
            if variant < len(VARIANTS):
                if VARIANTS[variant] is not None:
                    img = cv2.flip(img, VARIANTS[variant])
            else:
                img = np.ascontiguousarray(np.rot90(img, 1 if variant == len(VARIANTS) else 3))
            cv2.imwrite(str(images / f"P{k + 10000:05d}{suffix}.png"), img,
                        [cv2.IMWRITE_PNG_COMPRESSION, 1])


def link_subset(src: Path, dst: Path, count: int) -> None:
    images = dst / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        for suffix in SUFFIXES:
            name = f"P{k + 10000:05d}{suffix}.png"
            (images / name).symlink_to(src / "train" / "images" / name)


# ---- children (each runs in a fresh process so its peak RSS is its own) ----------------------

def _tree_rss_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    total, todo, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            total += int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakMemory:
    """Peak resident memory of this process with its worker processes, sampled every 50 ms
    (the pipeline's local scheduler runs shards in worker processes, whose memory
    `ru_maxrss` of this process would not count)."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))


def _floor_task(scene, tile_size: int, stride: int, compression: int) -> int:
    from pipeline.core.imaging import encode_png, read_image

    image = read_image(scene, max_pixels=1 << 62)
    for suffix in SUFFIXES[1:]:
        read_image(scene.with_name(scene.stem + suffix + ".png"), max_pixels=1 << 62)
    h, w = image.shape[:2]
    windows = set()
    if h > tile_size and w > tile_size:
        for x in range(0, w, stride):
            for y in range(0, h, stride):
                x0, y0 = min(x, w - tile_size), min(y, h - tile_size)
                windows.add((y0, x0))
    else:
        windows.add((0, 0))
    for y0, x0 in sorted(windows):
        encode_png(image[y0:y0 + tile_size, x0:x0 + tile_size], compression)
    return len(windows)


def child_floor(root: Path, workers: int) -> dict:
    from functools import partial

    from pipeline.core.params import Params
    from pipeline.core.runner import map_shards

    p = Params()
    scenes = sorted(p for p in (root / "train" / "images").glob("*.png") if "_" not in p.stem)
    task = partial(_floor_task, tile_size=p.prepare.tile_size, stride=p.prepare.stride,
                   compression=p.prepare.png_compression)
    t0 = time.perf_counter()
    tiles = sum(map_shards(task, scenes, label="floor", workers=workers))
    return {"seconds": time.perf_counter() - t0, "tiles": tiles}


def child_pipeline(root: Path, out: Path, workers: int, stages: str,
                   scheduler: str | None) -> dict:
    from pipeline.core.params import DataParams, Params, RunnerParams

    runner = RunnerParams(workers=workers)
    if scheduler:
        runner = runner.model_copy(update={"local_scheduler": scheduler})
    p = Params(data=DataParams(root=str(root), splits=["train"]), runner=runner)
    from pipeline.stages.plan import run_plan
    from pipeline.stages.prepare import run_prepare

    t0 = time.perf_counter()
    timings = {}
    report = run_prepare(p, out / "tiles")
    timings["prepare"] = time.perf_counter() - t0
    run_plan(p, out / "tiles", out / "plan")
    timings["plan"] = time.perf_counter() - t0 - sum(timings.values())
    if stages == "all":
        from pipeline.stages.annotate import run_annotate
        from pipeline.stages.compose.stage import run_compose
        from pipeline.stages.export import run_export

        for kind in ("holistic", "instance", "cluster"):
            run_annotate(p, kind, out / "tiles", out / "plan", out / "responses" / kind)
        timings["annotate"] = time.perf_counter() - t0 - sum(timings.values())
        run_compose(p, out / "tiles", out / "plan", out / "responses", out / "records")
        timings["compose"] = time.perf_counter() - t0 - sum(timings.values())
        run_export(p, out / "tiles", out / "records", out / "export")
        timings["export"] = time.perf_counter() - t0 - sum(timings.values())
    tiles = sum(s.get("tiles", 0) for s in report.get("splits", {}).values()) or report.get("tiles", 0)
    return {"seconds": time.perf_counter() - t0, "tiles": tiles, "stages": timings}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", choices=["plan", "all"], default="all")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs of the floor and of the pipeline at N, alternated (fastest kept)")
    ap.add_argument("--scheduler", choices=["processes", "threads"],
                    help="the pipeline's local scheduler (default: params.yaml's runner)")
    ap.add_argument("--child", choices=["floor", "pipeline"])
    ap.add_argument("--root", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    if args.child:
        with PeakMemory() as memory:
            if args.child == "floor":
                result = child_floor(args.root, args.workers)
            else:
                result = child_pipeline(args.root, args.out, args.workers, args.stages,
                                        args.scheduler)
        result["max_rss_mib"] = max(memory.peak / 2 ** 20,
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="geopixeld-bench-"))
    try:
        t0 = time.perf_counter()
        make_scenes(work / "all", 2 * args.scenes)
        link_subset(work / "all", work / "n", args.scenes)
        print(f"made {2 * args.scenes} synthetic scenes in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        common = ["--workers", str(args.workers), "--stages", args.stages,
                  *(["--scheduler", args.scheduler] if args.scheduler else [])]
        # floor and pipeline alternate; each keeps its fastest run (the one the machine's
        # other load disturbed least), so both sides get the same chances
        floors, pipes = [], []
        for _ in range(args.repeat):
            floors.append(run_child(["--child", "floor", "--root", str(work / "n"), *common]))
            pipes.append(run_child(["--child", "pipeline", "--root", str(work / "n"), "--out",
                                    str(work / "out-n"), *common]))
            shutil.rmtree(work / "out-n")  # each run writes into an empty folder
        floor = min(floors, key=lambda r: r["seconds"])
        pipe = min(pipes, key=lambda r: r["seconds"])
        pipe2 = run_child(["--child", "pipeline", "--root", str(work / "all"), "--out",
                           str(work / "out-2n"), *common])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = pipe["seconds"] / floor["seconds"]
    mem_ratio = pipe2["max_rss_mib"] / pipe["max_rss_mib"]
    label = "prepare+plan" if args.stages == "plan" else "prepare->export (template)"
    print(f"scenes={args.scenes} workers={args.workers} stages={label} "
          f"scheduler={args.scheduler or 'params default'} repeat={args.repeat}")
    print("seconds of every run at N: floor", [round(r["seconds"], 2) for r in floors],
          "pipeline", [round(r["seconds"], 2) for r in pipes])
    print(f"{'run':<28}{'tiles':>7}{'seconds':>10}{'tiles/s':>10}{'peak MiB':>10}")
    for name, r in [("floor: decode+encode", floor), (f"pipeline N={args.scenes}", pipe),
                    (f"pipeline 2N={2 * args.scenes}", pipe2)]:
        print(f"{name:<28}{r['tiles']:>7}{r['seconds']:>10.2f}{r['tiles'] / r['seconds']:>10.2f}"
              f"{r['max_rss_mib']:>10.0f}")
    print("stage seconds (N):", json.dumps({k: round(v, 2) for k, v in pipe["stages"].items()}))
    print(f"ratio pipeline/floor = {ratio:.2f}  (target <= 3)")
    print(f"peak memory 2N/N     = {mem_ratio:.2f}  (target: flat, ~1)")


if __name__ == "__main__":
    main()
