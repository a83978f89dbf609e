"""Benchmark: the transformers backend against plain `generate`, on a random-weight Qwen2.5-VL.

The model is built from a config with random weights (no download): `--shape 7b` is
Qwen2.5-VL-7B's shape (bf16, for one GPU), `--shape tiny` the test model's (float32, for a
CPU), `--shape small` one in between where, as at 7b, the image prefix is most of a request's
work (a CPU figure closer to the GPU's). Requests are the pipeline's per-patch mix, on real
iSAID pixels (windows of the bundled scenes): 1 holistic + 3 instance + 1 cluster prompt per
patch, holistic and cluster on the tile, the instance prompts on its set-of-marks image
(`--images-per-patch 1` puts all five on the tile). Every answer is `--new-tokens` long (the
end token suppressed), so that each way does the same work. Three ways, side by side in one
run, on the same requests:
- plain `generate`, one prompt at a time (on the first `--plain-requests` requests);
- plain batched `generate` (left padding) at each of `--plain-batches`, best one kept;
- this backend (image prefix once per image, KV cache shared) at each of `--backend-batches`.
Prints calls/s of each, the ratios (target on one H100 at the 7b shape: backend >= 3x plain
batched and >= 20 calls/s), peak GPU memory, and how many backend answers are
token-identical to one-at-a-time `generate`.

  python bench/local_lmm.py --device cuda --shape 7b     # one H100 (about 6 minutes)
  python bench/local_lmm.py --device cpu --shape tiny    # any CPU (under a minute)
  python bench/local_lmm.py --device cpu --shape small   # any CPU (a few minutes)
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny_vlm import (  # noqa: E402
    TINY_MAX_PIXELS,
    prompt_texts,
    qwen25_vl_config,
    qwen25_vl_processor,
    random_qwen25_vl,
    train_tokenizer,
)

import prompts  # noqa: E402
from annotators.base import AnnotationContext  # noqa: E402
from annotators.transformers_backend import LoadedModel, Sampling, TransformersBackend, chat_text  # noqa: E402
from pipeline.core.imaging import encode_png, sha256  # noqa: E402
from pipeline.core.params import BackendParams  # noqa: E402
from pipeline.geometry.categories import ISAID_PALETTE, plural, readable  # noqa: E402
from schemas import Request  # noqa: E402

# Qwen2.5-VL-7B-Instruct's config.json (text and vision towers).
SHAPE_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
              rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2, hidden_act="silu"),
    vocab_size=152064, max_pixels=12845056)
# A CPU-sized model where, as at 7b, the image prefix is most of the work (256 image tokens
# per 448 px patch).
SHAPE_SMALL = dict(
    text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
              rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
    vision=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4,
                out_hidden_size=256, fullatt_block_indexes=[1, 3], window_size=112,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    vocab_size=None, max_pixels=448 * 448)
SHAPES = {"7b": SHAPE_7B, "small": SHAPE_SMALL,
          "tiny": dict(text=None, vision=None, vocab_size=None, max_pixels=TINY_MAX_PIXELS)}
PATCH_SIZES = {"7b": 800, "small": 448, "tiny": 224}
SCENES = [("val", "P0003"), ("val", "P0004"), ("train", "P0005")]
MARKS = 3  # instance prompts per patch


def patches(count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` windows of `size` px of the bundled iSAID scenes (RGB), at seeded offsets."""
    rng = random.Random(seed)
    scenes = [cv2.cvtColor(cv2.imread(str(REPO / "data" / "isaid" / split / "images" /
                                          f"{name}.png")), cv2.COLOR_BGR2RGB)
              for split, name in SCENES]
    out = []
    for k in range(count):
        scene = scenes[k % len(scenes)]
        h, w = scene.shape[:2]
        y, x = rng.randint(0, max(h - size, 0)), rng.randint(0, max(w - size, 0))
        window = scene[y:y + size, x:x + size]
        out.append(np.ascontiguousarray(cv2.resize(window, (size, size))))
    return out


def set_of_marks(tile: np.ndarray, seed: int) -> np.ndarray:
    """The tile with MARKS numbered black squares (as the plan stage draws them)."""
    rng = random.Random(seed)
    som = tile.copy()
    h, w = som.shape[:2]
    for number in range(1, MARKS + 1):
        x, y = rng.randint(8, w - 9), rng.randint(8, h - 9)
        cv2.rectangle(som, (x - 7, y - 7), (x + 7, y + 7), (0, 0, 0), -1)
        cv2.putText(som, str(number), (x - 4, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 0), 1)
    return som


def requests_for(tiles: list[np.ndarray], images_per_patch: int
                 ) -> tuple[list[Request], AnnotationContext]:
    """The per-patch mix and the images it names."""
    categories = list(ISAID_PALETTE)
    images: dict[str, bytes] = {}
    requests: list[Request] = []
    for k, tile in enumerate(tiles):
        tile_png = encode_png(tile)
        som_png = encode_png(set_of_marks(tile, k)) if images_per_patch == 2 else tile_png
        images[sha256(tile_png)], images[sha256(som_png)] = tile_png, som_png
        category = categories[k % len(categories)]

        def request(kind: str, prompt: str, png: bytes, n: int) -> Request:
            return Request(request_id=f"{k}-{kind}-{n}", tile_id=f"patch{k}", kind=kind,
                           prompt=prompt, prompt_version="v1", image_sha256=sha256(png),
                           object_ids=[n])

        requests.append(request("holistic", prompts.render("holistic"), tile_png, 0))
        for n in range(1, MARKS + 1):
            requests.append(request("instance", prompts.render(
                "instance", category_name=readable(category), pos="top left", mark_number=n),
                som_png, n))
        requests.append(request("cluster", prompts.render(
            "cluster", cluster_info="several", category_name=plural(category), pos="center"),
            tile_png, 0))
    return requests, AnnotationContext(tiles={}, images=images)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def peak_note(device: torch.device) -> str:
    return f"  peak GPU {peak_gib(device):.1f} GiB" if device.type == "cuda" else ""


def plain_generate(loaded: LoadedModel, requests: list[Request], context: AnnotationContext,
                   new_tokens: int) -> list[tuple[int, ...]]:
    """Plain `generate` on whole prompts, all of `requests` in one left-padded batch."""
    from PIL import Image

    processor = loaded.processor
    processor.tokenizer.padding_side = "left"
    images = [Image.open(io.BytesIO(context.image(r.image_sha256))).convert("RGB")
              for r in requests]
    inputs = processor(text=[chat_text(processor, r.prompt) for r in requests], images=images,
                       padding=True, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
    width = inputs["input_ids"].shape[1]
    return [tuple(row[width:].tolist()) for row in out]


def timed(device: torch.device, work, repeats: int = 1) -> tuple[float, object]:
    """Seconds of the fastest of `repeats` runs of `work`, and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = work()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best, result


def figure(out: dict, name: str, value, unit: str, **extra) -> None:
    """Record one measured figure in `out["figures"]` (what bench/gpu_suite.py writes)."""
    out.setdefault("figures", {})[name] = {"value": value, "unit": unit, **extra}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="model shape (default: 7b on cuda, tiny on cpu)")
    ap.add_argument("--patches", type=int, default=None, help="patches (5 requests each)")
    ap.add_argument("--patch-size", type=int, default=None,
                    help="px (default 800 at 7b, 448 small, 224 tiny)")
    ap.add_argument("--images-per-patch", type=int, choices=[1, 2], default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--plain-requests", type=int, default=10,
                    help="requests answered one at a time (the slowest way)")
    ap.add_argument("--plain-batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--backend-batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timings per way, the best kept (default 1 on cuda, 2 on cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def measure(args: argparse.Namespace, out: dict | None = None, say=print) -> dict:
    """Run the three ways on `args` (`build_parser()`'s options), print as the CLI does through
    `say`, and fill `out` as it goes: `out["context"]` (shape, device, dtype, workload) and
    `out["figures"]` ({name: {"value", "unit", ...}}), so that a caller interrupted part-way
    keeps what was measured."""
    out = {} if out is None else out
    context = out.setdefault("context", {})
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape_name = args.shape or ("7b" if gpu else "tiny")
    shape = SHAPES[shape_name]
    n_patches = args.patches or (64 if gpu else 8)
    size = args.patch_size or PATCH_SIZES[shape_name]
    repeats = args.repeats or (1 if gpu else 2)
    plain_batches = [int(b) for b in (args.plain_batches or ("8,32,64" if gpu else "5,10,20,40")
                                      ).split(",")]
    backend_batches = [int(b) for b in (args.backend_batches or
                                        ("64,128,256" if gpu else "10,20,40")).split(",")]
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads)
    context.update(shape=shape_name, device=str(device), dtype=str(dtype).replace("torch.", ""),
                   patches=n_patches, patch_px=size, images_per_patch=args.images_per_patch,
                   new_tokens=args.new_tokens, repeats=repeats)

    tokenizer = train_tokenizer(prompt_texts())
    processor = qwen25_vl_processor(tokenizer, shape["max_pixels"])
    config = qwen25_vl_config(tokenizer, text=shape["text"], vision=shape["vision"],
                              vocab_size=shape["vocab_size"])
    built, model = timed(device, lambda: random_qwen25_vl(config, args.seed, dtype=dtype,
                                                          device=str(device)))
    loaded = LoadedModel(model=model, processor=processor,
                         source=f"random-qwen2.5-vl-{shape_name}")
    # every answer args.new_tokens long; no cleaning re-asks (random answers are gibberish)
    params = BackendParams(name="transformers", model=loaded.source, max_tokens=args.new_tokens,
                           clean_retries=0,
                           transformers={"device": str(device), "min_new_tokens": args.new_tokens})
    requests, images = requests_for(patches(n_patches, size, args.seed), args.images_per_patch)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    first = TransformersBackend(params, loaded=loaded).generate(
        requests[:1], images, Sampling(max_new_tokens=1))[0].prompt_tokens
    where = torch.cuda.get_device_name() if gpu else f"{args.threads} thread(s)"
    context.update(device_name=where, parameters_m=round(params_b * 1e3, 3),
                   attention=model.config._attn_implementation, requests=len(requests),
                   prompt_tokens_holistic=first)
    figure(out, "build_s", round(built, 3), "s")
    say(f"device {device} ({where}), shape {shape_name} ({params_b:.2f}B parameters, {dtype}, "
        f"attention {model.config._attn_implementation}), built in {built:.1f} s; "
        f"transformers {transformers.__version__}, torch {torch.__version__}")
    say(f"{len(requests)} requests on {n_patches} patches of {size} px "
        f"({args.images_per_patch} image(s) per patch: 1 holistic + {MARKS} instance + 1 "
        f"cluster), {first} prompt tokens (holistic), {args.new_tokens} new tokens each, "
        "end token suppressed")

    # warm-up (kernels, allocator) on the first patch, every way
    plain_generate(loaded, requests[:1], images, 2)
    TransformersBackend(params.model_copy(update={"max_tokens": 2}), loaded=loaded).annotate(
        requests[:5], images)

    def way(name: str, rate: float, seconds: float, count: int, **extra) -> None:
        peak = peak_gib(device) if gpu else None
        figure(out, f"{name}_calls_per_s", round(rate, 4), "calls/s", requests=count,
               seconds=round(seconds, 3), **extra,
               **({"peak_gpu_gib": round(peak, 3)} if peak is not None else {}))

    def record_best() -> None:
        """The best of each way so far and the ratios, rewritten after every measurement."""
        rate, batch = best_backend[0], best_backend[1]
        if best_plain[1]:
            figure(out, "best_plain_batched_calls_per_s", round(best_plain[0], 4), "calls/s",
                   batch=best_plain[1])
        if batch:
            figure(out, "best_backend_calls_per_s", round(rate, 4), "calls/s", batch=batch,
                   target=">= 20 on one H100, 7b shape")
            figure(out, "ratio_backend_over_one_at_a_time", round(rate / max(one_rate, 1e-9), 3),
                   "x")
        if batch and best_plain[1]:
            figure(out, "ratio_backend_over_plain_batched",
                   round(rate / max(best_plain[0], 1e-9), 3), "x",
                   target=">= 3 on one H100, 7b shape")
        if gpu:
            for name, value in (("one_at_a_time", one_peak), ("plain_batched", best_plain[2]),
                                ("backend", best_backend[2])):
                if value == value:  # not NaN: measured
                    figure(out, f"peak_gpu_memory_{name}", round(value, 3), "GiB")

    best_plain = (0.0, 0, float("nan"))
    best_backend = (0.0, 0, float("nan"), None)

    # 1. plain generate, one prompt at a time
    few = requests[:args.plain_requests]
    reset_peak(device)
    seconds, single = timed(device, lambda: [plain_generate(loaded, [r], images,
                                                            args.new_tokens)[0] for r in few],
                            repeats)
    one_rate, one_peak = len(few) / seconds, peak_gib(device)
    way("one_at_a_time", one_rate, seconds, len(few))
    say(f"plain generate, one at a time : {len(few):5d} requests {seconds:8.2f} s "
        f"{one_rate:8.2f} calls/s{peak_note(device)}")

    # 2. plain batched generate, each batch size
    for batch in plain_batches:
        reset_peak(device)
        try:
            seconds, _ = timed(device, lambda: [
                plain_generate(loaded, requests[i:i + batch], images, args.new_tokens)
                for i in range(0, len(requests), batch)], repeats)
        except torch.cuda.OutOfMemoryError:
            say(f"plain batched generate, {batch:4d} : out of GPU memory")
            figure(out, f"plain_batched_b{batch}_calls_per_s", None, "calls/s",
                   error="out of GPU memory")
            continue
        rate = len(requests) / seconds
        way(f"plain_batched_b{batch}", rate, seconds, len(requests), batch=batch)
        say(f"plain batched generate, {batch:4d} : {len(requests):5d} requests {seconds:8.2f} s "
            f"{rate:8.2f} calls/s{peak_note(device)}")
        if rate > best_plain[0]:
            best_plain = (rate, batch, peak_gib(device))
        record_best()

    # 3. this backend, each batch size
    for batch in backend_batches:
        run = params.model_copy(update={"transformers": params.transformers.model_copy(
            update={"batch_size": batch})})
        backend = TransformersBackend(run, loaded=loaded)
        reset_peak(device)
        try:
            seconds, responses = timed(device, lambda: backend.annotate(requests, images),
                                       repeats)
        except torch.cuda.OutOfMemoryError:
            say(f"transformers backend, {batch:4d}   : out of GPU memory")
            figure(out, f"backend_b{batch}_calls_per_s", None, "calls/s",
                   error="out of GPU memory")
            continue
        assert len(responses) == len(requests)
        rate = len(requests) / seconds
        way(f"backend_b{batch}", rate, seconds, len(requests), batch=batch,
            image_prefixes=backend.stats.image_prefixes // repeats,
            forward_batches=backend.stats.forward_batches // repeats)
        say(f"transformers backend, {batch:4d}   : {len(requests):5d} requests {seconds:8.2f} s "
            f"{rate:8.2f} calls/s{peak_note(device)} "
            f"({backend.stats.image_prefixes // repeats} image prefixes, "
            f"{backend.stats.forward_batches // repeats} forward batches)")
        if rate > best_backend[0]:
            best_backend = (rate, batch, peak_gib(device), backend)
        record_best()

    rate, batch, peak, backend = best_backend
    say(f"best plain batched: batch {best_plain[1]} at {best_plain[0]:.2f} calls/s; "
        f"best backend: batch {batch} at {rate:.2f} calls/s")
    say(f"ratio backend / plain batched = {rate / max(best_plain[0], 1e-9):.2f}x "
        f"(target >= 3x on one H100, 7b shape)")
    say(f"ratio backend / one at a time = {rate / max(one_rate, 1e-9):.2f}x; backend "
        f"{rate:.2f} calls/s (target >= 20 on one H100, 7b shape)")
    if gpu:
        say(f"peak GPU memory: one at a time {one_peak:.1f} GiB, plain batched "
            f"{best_plain[2]:.1f} GiB, backend {peak:.1f} GiB")
    same = 0
    if backend is not None:
        answers = backend.generate(few, images, Sampling(max_new_tokens=args.new_tokens,
                                                           min_new_tokens=args.new_tokens))
        same = sum(a.token_ids == s for a, s in zip(answers, single))
    expect = ("float32: all expected" if dtype == torch.float32 else
              "bf16: other batch shapes may flip near-ties")
    figure(out, "token_identical_to_one_at_a_time", same, "answers", of=len(few), note=expect)
    say(f"token-identical to one-at-a-time generate: {same}/{len(few)} answers ({expect})")
    return out


def main(argv: list[str] | None = None) -> None:
    measure(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
