"""Box-prompted SAM masks per second: one image encoding per tile versus one per box.

Side by side in one run, on the same random tiles and boxes, with a random-initialised model
(no checkpoint: speed does not depend on the weights):

  once/tile, batched   the pipeline's path (pipeline.sources.sam_masks.box_masks): set_image once per
                       tile, then predict_torch on `--batch` boxes at a time
  once/tile, 1 by 1    set_image once per tile, predict_torch one box at a time
  once/box             set_image for every box, then predict_torch on it (what a loop over
                       objects that calls SamPredictor.set_image + predict does)

    python bench/sam_box_prompts.py --device cuda --model vit_h     # GPU, ViT-H shape
    python bench/sam_box_prompts.py --device cpu --small            # CPU, tiny SAM (tests/)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(args) -> torch.nn.Module:
    if args.small:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_sam import build_tiny_sam

        return build_tiny_sam()
    from segment_anything import sam_model_registry

    return sam_model_registry[args.model](checkpoint=None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def workload(args) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    tiles, boxes = [], []
    for _ in range(args.tiles):
        tiles.append(rng.integers(0, 256, (args.tile_size, args.tile_size, 3), dtype=np.uint8))
        xy = rng.uniform(0, args.tile_size * 0.9, (args.boxes, 2))
        wh = rng.uniform(8, args.tile_size * 0.1, (args.boxes, 2))
        boxes.append(np.concatenate([xy, np.minimum(xy + wh, args.tile_size)], 1)
                     .astype(np.float32))
    return tiles, boxes


def once_per_tile_batched(sam, tiles, boxes, args) -> int:
    from pipeline.sources.sam_masks import box_masks

    made = 0
    for tile, b in zip(tiles, boxes):
        made += len(box_masks(sam, tile, b, args.batch))
    return made


def _predict_one(predictor, box: np.ndarray, shape) -> np.ndarray:
    prompt = predictor.transform.apply_boxes_torch(
        torch.as_tensor(box[None], device=predictor.device), shape)
    masks, _, _ = predictor.predict_torch(None, None, boxes=prompt, multimask_output=False)
    return masks[0, 0].cpu().numpy()


def once_per_tile_single(sam, tiles, boxes, args) -> int:
    from segment_anything import SamPredictor

    predictor, made = SamPredictor(sam.model), 0
    with torch.inference_mode():
        for tile, b in zip(tiles, boxes):
            predictor.set_image(tile)
            for box in b:
                _predict_one(predictor, box, tile.shape[:2])
                made += 1
    return made


def once_per_box(sam, tiles, boxes, args) -> int:
    from segment_anything import SamPredictor

    predictor, made = SamPredictor(sam.model), 0
    with torch.inference_mode():
        for tile, b in zip(tiles, boxes):
            for box in b:
                predictor.set_image(tile)
                _predict_one(predictor, box, tile.shape[:2])
                made += 1
    return made


def figure(out: dict, name: str, value, unit: str, **extra) -> None:
    """Record one measured figure in `out["figures"]` (what bench/gpu_suite.py writes)."""
    out.setdefault("figures", {})[name] = {"value": value, "unit": unit, **extra}


WAYS = (("once/tile, batched", "once_per_tile_batched", once_per_tile_batched),
        ("once/tile, 1 by 1", "once_per_tile_single", once_per_tile_single),
        ("once/box", "once_per_box", once_per_box))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="vit_h", choices=["vit_h", "vit_l", "vit_b"])
    ap.add_argument("--small", action="store_true", help="tiny SAM from tests/tiny_sam.py")
    ap.add_argument("--tiles", type=int, default=None)
    ap.add_argument("--boxes", type=int, default=None, help="boxes per tile")
    ap.add_argument("--tile-size", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64, help="boxes per predict_torch call")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return ap


def measure(args: argparse.Namespace, out: dict | None = None, say=print) -> dict:
    """Run the three ways on `args` (`build_parser()`'s options), print through `say`, and fill
    `out` as it goes: `out["context"]` and `out["figures"]` ({name: {"value", "unit", ...}})."""
    import threading

    from pipeline.sources.sam_masks import LoadedSam

    out = {} if out is None else out
    context = out.setdefault("context", {})
    args.tiles = args.tiles or (3 if args.small else 4)
    args.boxes = args.boxes or (16 if args.small else 32)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpu = args.device.startswith("cuda")

    start = time.perf_counter()
    model = build(args).to(args.device).eval()
    sync(args.device)
    built = time.perf_counter() - start
    sam = LoadedSam(model=model, device=args.device, lock=threading.Lock())
    tiles, boxes = workload(args)
    name = "tiny" if args.small else args.model
    context.update(shape=name, device=args.device,
                   dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                   image_size=model.image_encoder.img_size, tiles=args.tiles,
                   tile_px=args.tile_size, boxes_per_tile=args.boxes, batch=args.batch,
                   parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
    if gpu:
        context["device_name"] = torch.cuda.get_device_name()
    figure(out, "build_s", round(built, 3), "s")
    say(f"SAM {name} (random init) on {args.device}: {args.tiles} tiles of "
        f"{args.tile_size}x{args.tile_size}, {args.boxes} boxes each, batch {args.batch}")
    once_per_tile_batched(sam, tiles[:1], [boxes[0][:2]], args)  # warm-up (kernels, allocator)
    results = {}
    for label, key, run in WAYS:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        made = run(sam, tiles, boxes, args)
        sync(args.device)
        seconds = time.perf_counter() - start
        results[label] = made / seconds
        extra = ({"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
                 if gpu else {})
        figure(out, f"{key}_masks_per_s", round(made / seconds, 3), "masks/s", masks=made,
               seconds=round(seconds, 3), **extra)
        say(f"  {label:<20} {made:5d} masks in {seconds:8.3f} s = {made / seconds:9.2f} masks/s")
    base = results["once/box"]
    for label, key, _ in WAYS[:2]:
        figure(out, f"ratio_{key}_over_once_per_box", round(results[label] / base, 3), "x")
    say("  ratio vs once/box:  " + ", ".join(f"{k} x{v / base:.1f}" for k, v in results.items()))
    return out


def main(argv: list[str] | None = None) -> None:
    measure(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
