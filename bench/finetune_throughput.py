"""Benchmark: GeoPixel-style fine-tuning and RS-GCG evaluation throughput, random weights.

Builds the model from configs (no download): a Qwen2.5-VL-shaped LM (`--shape 7b`: the
Qwen2.5-VL-7B text and vision shapes; `--shape tiny`: the tests' tiny one), LoRA r=8 on its
attention, the [SEG] projection, and a SAM (ViT-H shape, or the tests' tiny one); bf16 and
gradient checkpointing on CUDA. Every sample is the released GeoPixelD record bundled in
data/geopixeld_sample (800x800 tile, 4 [SEG] masks). In one run, side by side:
- training through `finetune.train.train` (the stage's loop): samples/s over the timed steps
  (after warm-up steps), peak GPU memory;
- the same batches through the language model alone (CE loss, no SAM branch): the ratio
  GeoPixel step / LM-only step is the cost of the mask branch;
- evaluation: `finetune.predict.generate_predictions` (greedy, at most `--max-new-tokens`; a
  random model stops wherever it happens to write an end token, so the mean answer length is
  printed beside the rate) and `evaluate_gcg` scoring: records/s of each and of both.
The tokenizer is a small BPE trained on the sample's text, so answers take more tokens than
Qwen's tokenizer would give (printed as tokens per sample).

Usage: python bench/finetune_throughput.py --device cuda --shape 7b
       python bench/finetune_throughput.py --device cpu --shape tiny
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from tiny_models import CHAT_TEMPLATE, TINY_SAM_SHAPE, tiny_qwen25_vl_config, tiny_tokenizer  # noqa: E402

from finetune.data import ListSamples, to_device  # noqa: E402
from finetune.evaluate import BagOfWordsEncoder, GTItem, PredItem, evaluate_gcg  # noqa: E402
from finetune.model import (  # noqa: E402
    IGNORE_INDEX,
    SAM_SHAPES,
    ModelSpec,
    SamShape,
    build_geopixel_model,
    build_sam,
)
from finetune.predict import generate_predictions  # noqa: E402
from finetune.train import train  # noqa: E402
from pipeline.core.params import EvaluateParams, FinetuneParams  # noqa: E402
from pipeline.formats.geopixel_format import read_geopixel  # noqa: E402
from schemas import RLE  # noqa: E402

SAMPLE_LIST = REPO / "data" / "geopixeld_sample" / "GeoPixelD.json"
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         initializer_range=0.02,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]})
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
                           window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2)


def build(shape: str, device: torch.device, corpus: list[str]):
    """(GeoPixel model, processor, spec) with random weights, built on `device`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny_tokenizer(corpus)
    config = tiny_qwen25_vl_config(tokenizer)
    if shape == "7b":
        derived = ("layer_types", "max_window_layers")  # recomputed from the layer count
        text = {**{k: v for k, v in config.text_config.to_dict().items() if k not in derived},
                **QWEN25_VL_7B_TEXT}
        vision = {**config.vision_config.to_dict(), **QWEN25_VL_7B_VISION}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                  image_token_id=config.image_token_id,
                                  video_token_id=config.video_token_id,
                                  vision_start_token_id=config.vision_start_token_id,
                                  vision_end_token_id=config.vision_end_token_id,
                                  tie_word_embeddings=False)
        image_processor = Qwen2VLImageProcessor()  # Qwen's defaults: 800x800 -> 841 tokens
        sam_shape = SAM_SHAPES["vit_h"]
    else:
        image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112)
        sam_shape = SamShape(**TINY_SAM_SHAPE)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        lm = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        sam = build_sam(sam_shape)
    lm.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    spec = ModelSpec(base_model_path=f"random:{shape}", sam_model_type="random",
                     sam_checkpoint_path="", question=FinetuneParams().question)
    model = build_geopixel_model(spec, lm, processor, sam,
                                 gradient_checkpointing=device.type == "cuda")
    model.sam.image_encoder.to(dtype)
    return model.to(device), processor, spec


def lm_only_seconds(model, batches, device: torch.device, bf16: bool) -> float:
    """Median seconds of a forward + backward of the language model alone (CE loss)."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=bf16 and device.type == "cuda")
    times = []
    for batch in batches:
        batch = to_device(batch, device)
        sync(device)
        start = time.perf_counter()
        with autocast:
            logits = model.lm_outputs(batch["vlm_inputs"]).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX)
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:] if len(times) > 2 else times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def figure(out: dict, name: str, value, unit: str, **extra) -> None:
    """Record one measured figure in `out["figures"]` (what bench/gpu_suite.py writes)."""
    out.setdefault("figures", {})[name] = {"value": value, "unit": unit, **extra}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--eval-records", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on the cpu (default: at most 4)")
    return parser


class Setup:
    """The model built from `args` and the workload both measurements use: the bundled
    GeoPixelD record (800x800 tile, its [SEG] masks) repeated as often as needed."""

    def __init__(self, args: argparse.Namespace, say=print):
        self.args, self.device = args, torch.device(args.device)
        if self.device.type == "cpu":
            torch.set_num_threads(args.threads or max(1, min(4, torch.get_num_threads())))
        pairs = read_geopixel(SAMPLE_LIST, SAMPLE_LIST.parent)
        self.record, self.tile = pairs[0]
        corpus = [self.record.caption, FinetuneParams().question]
        started = time.perf_counter()
        self.model, self.processor, self.spec = build(args.shape, self.device, corpus)
        sync(self.device)
        self.build_s = time.perf_counter() - started
        micro = args.batch_size * args.grad_accum
        self.samples = ListSamples([(self.record, self.tile.image_png)] * max(
            micro * (args.warmup_steps + args.steps), args.eval_records))
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in self.model.parameters())
        say(f"device {self.device} ({self.device_name()}), shape {args.shape}, "
            f"torch {torch.__version__}")
        say(f"model: {self.total / 1e6:.1f} M parameters, {self.trainable / 1e6:.2f} M trained "
            f"(LoRA r=8, [SEG] rows, projection, mask decoder); built in {self.build_s:.1f} s")

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def context(self) -> dict:
        gpu = self.device.type == "cuda"
        height, width = self.tile.height, self.tile.width
        return {"shape": self.args.shape, "device": str(self.device),
                "device_name": self.device_name(), "dtype": "bfloat16" if gpu else "float32",
                "tile_px": f"{width}x{height}", "seg_masks": len(self.record.phrases),
                "sam_image_size": self.model.sam_image_size,
                "parameters_m": round(self.total / 1e6, 2),
                "trained_parameters_m": round(self.trainable / 1e6, 3),
                "gradient_checkpointing": gpu}


def measure_training(setup: Setup, out: dict | None = None, say=print) -> dict:
    """Training samples/s through `finetune.train.train`, peak memory, and the LM-only step
    beside the GeoPixel step; fills `out["context"]` and `out["figures"]` as it goes."""
    from finetune.data import Collator

    out = {} if out is None else out
    args, device, model = setup.args, setup.device, setup.model
    context = out.setdefault("context", {})
    context.update(setup.context(), batch_size=args.batch_size, grad_accum=args.grad_accum,
                   warmup_steps=args.warmup_steps, timed_steps=args.steps)
    figure(out, "build_s", round(setup.build_s, 3), "s")
    work = Path(tempfile.mkdtemp(prefix="geopixeld-bench-"))
    ft = FinetuneParams(base_model_path=setup.spec.base_model_path,
                        max_steps=args.warmup_steps + args.steps,
                        batch_size=args.batch_size, grad_accum=args.grad_accum,
                        warmup_steps=0, lr_schedule="constant", device=args.device,
                        num_workers=2 if device.type == "cuda" else 0,
                        save_every=10 ** 6, work_dir=str(work))
    steps: list[dict] = []
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        summary = train(model, setup.processor, setup.spec, setup.samples, ft, work, device,
                        on_step=steps.append)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = steps[args.warmup_steps:] or steps
    train_s = sum(s["seconds"] for s in timed)
    train_sps = sum(s["samples"] for s in timed) / train_s
    step_s = statistics.median(s["seconds"] for s in timed) / args.grad_accum
    train_peak = peak_gib(device)
    figure(out, "train_samples_per_s", round(train_sps, 4), "samples/s", steps=len(timed),
           seconds=round(train_s, 3), last_loss=round(summary["last"]["total"], 4))
    figure(out, "geopixel_micro_batch_s", round(step_s, 4), "s", of="median timed step")
    if train_peak is not None:
        figure(out, "peak_gpu_memory_train", round(train_peak, 3), "GiB")

    collator = Collator(setup.processor, setup.spec.seg_token, setup.spec.question,
                        model.sam_image_size, setup.spec.max_answer_tokens)
    batches = [collator([setup.samples[i] for i in range(args.batch_size)])
               for _ in range(min(args.steps, 4) + 1)]
    tokens = int(batches[0]["vlm_inputs"]["attention_mask"][0].sum())
    answer_tokens = int((batches[0]["labels"][0] != IGNORE_INDEX).sum())
    context.update(tokens=tokens, answer_tokens=answer_tokens)
    say(f"sample: {context['tile_px']} tile, {tokens} tokens ({answer_tokens} answer tokens), "
        f"{len(setup.record.phrases)} [SEG] masks; batch {args.batch_size} x accum "
        f"{args.grad_accum}, bf16 {device.type == 'cuda'}, gradient checkpointing "
        f"{device.type == 'cuda'}")
    say(f"train: {train_sps:.3f} samples/s over {len(timed)} timed steps "
        f"(loss {summary['last']['total']:.3f})"
        + (f", peak memory {train_peak:.2f} GiB" if train_peak is not None else ""))
    lm_s = lm_only_seconds(model, batches, device, ft.bf16)
    figure(out, "lm_only_step_s", round(lm_s, 4), "s", of="median forward+backward, CE only")
    figure(out, "ratio_geopixel_over_lm_only", round(step_s / lm_s, 3), "x",
           of="mask branch + SAM encoder cost")
    say(f"  GeoPixel micro-batch {step_s:.3f} s vs LM-only forward+backward {lm_s:.3f} s: "
        f"ratio {step_s / lm_s:.2f} (mask branch + SAM encoder cost)")
    model.zero_grad(set_to_none=True)
    return out


def measure_evaluation(setup: Setup, out: dict | None = None, say=print) -> dict:
    """RS-GCG evaluation throughput: `generate_predictions` and `evaluate_gcg` scoring,
    records/s of each and of both; fills `out["context"]` and `out["figures"]` as it goes."""
    out = {} if out is None else out
    args, device, model, processor = setup.args, setup.device, setup.model, setup.processor
    record = setup.record
    context = out.setdefault("context", {})
    context.update(setup.context(), eval_records=args.eval_records,
                   eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    model.eval()
    ev = EvaluateParams(batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                        max_records=args.eval_records, device=args.device, captions=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    predictions = generate_predictions(model, processor, setup.spec, setup.samples, ev, device)
    sync(device)
    predict_s = time.perf_counter() - t0
    eval_peak = peak_gib(device)
    n_eval = len(predictions)
    lengths = [len(processor.tokenizer(p["caption"], add_special_tokens=False)["input_ids"])
               for p in predictions]
    answer_len = statistics.mean(lengths)
    figure(out, "predict_records_per_s", round(n_eval / predict_s, 4), "records/s",
           records=n_eval, seconds=round(predict_s, 3))
    figure(out, "predict_answer_tokens_per_s", round(sum(lengths) / predict_s, 2), "tokens/s",
           of="answer tokens (re-tokenised captions) / predict seconds")
    figure(out, "mean_answer_tokens", round(answer_len, 1), "tokens",
           of=f"random weights: at most {args.max_new_tokens}")
    truth = [GTItem(f"{record.record_id}-{k}", record.caption,
                    [(p.text, p.mask) for p in record.phrases])
             for k in range(n_eval)]
    preds = [PredItem(f"{record.record_id}-{k}", p["caption"], p["phrases"],
                      [RLE(**m) for m in p["pred_masks"]])
             for k, p in enumerate(predictions)]
    t0 = time.perf_counter()
    evaluate_gcg(truth, preds, BagOfWordsEncoder(), captions=False)
    score_s = time.perf_counter() - t0
    figure(out, "score_records_per_s", round(n_eval / score_s, 2), "records/s",
           of="evaluate_gcg, bag-of-words phrase encoder, no CIDEr/METEOR")
    figure(out, "evaluate_records_per_s", round(n_eval / (predict_s + score_s), 4),
           "records/s", of="predict + score")
    if eval_peak is not None:
        figure(out, "peak_gpu_memory_evaluate", round(eval_peak, 3), "GiB")
    say(f"evaluate: predict {n_eval / predict_s:.3f} records/s "
        f"(answers {answer_len:.0f} tokens on average, {args.max_new_tokens} max, "
        f"batch {args.eval_batch_size}), "
        f"score {n_eval / score_s:.1f} records/s, both {n_eval / (predict_s + score_s):.3f} "
        f"records/s" + (f", peak memory {eval_peak:.2f} GiB" if eval_peak is not None else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    setup = Setup(build_parser().parse_args(argv))
    measure_training(setup)
    measure_evaluation(setup)


if __name__ == "__main__":
    main()
