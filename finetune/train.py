"""The `finetune` stage: train the GeoPixel-style model on our export, with resumable checkpoints.

    run_finetune(params, parquet_dir, out_dir)

reads the export Parquet shards of `finetune.splits` (or a GeoPixel list .json) as they are,
trains (AdamW, warm-up then linear/cosine decay, gradient accumulation, clipping; bf16 autocast
and gradient checkpointing on CUDA, float32 on CPU) and writes `out_dir` whole at the end:

    out_dir/trainable.safetensors   LoRA + [SEG] rows + projection + mask decoder
    out_dir/adapter/                the LoRA adapter alone (peft `save_pretrained`)
    out_dir/processor/              the processor with the [SEG] token
    out_dir/geopixel.json           what rebuilds the model (`finetune.model.ModelSpec`)
    out_dir/trainer.pt              optimizer, scheduler, step, RNG states
    out_dir/log.jsonl               one line per optimizer step: lr, ce, bce, dice, total, ...
    out_dir/report.json             counts, last losses, throughput

While it runs, checkpoints (the same files) go to `finetune.work_dir/<run key>/step-NNNNNNNN/`
every `save_every` steps, written whole or not at all; the run key hashes the parameters that
shape training and the training records, so a killed run started again resumes from its last
checkpoint and reaches the same weights and losses as an uninterrupted one.

With `finetune.base_model_path` empty the stage is skipped: one line on stderr, and a
`report.json` that says so, so `dvc repro` on a machine with no model still completes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from finetune.data import Collator, open_samples, to_device
from finetune.model import (
    GeoPixelModel,
    LossWeights,
    ModelSpec,
    load_geopixel_model,
    resolve_device,
    spec_from_params,
)
from finetune.stage import run_finetune, skip_report  # noqa: F401 (the stage's entry point)
from pipeline.core.errors import BadParamsError
from pipeline.core.params import FinetuneParams, Params
from pipeline.core.shards import atomic_path, staged_folder, write_json
from pipeline.core.stage import Stage

CHECKPOINT_PREFIX = "step-"
SPEC_FILE = "geopixel.json"
WEIGHTS_FILE = "trainable.safetensors"
TRAINER_FILE = "trainer.pt"
LOG_FILE = "log.jsonl"
# fields that do not change what training computes (they are left out of the run key)
UNKEYED_FIELDS = ("num_workers", "save_every", "keep_checkpoints", "work_dir", "device")


# ---------------------------------------------------------------------------------------------
# Order of samples, learning rate


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled sample order of one epoch (a function of seed and epoch only)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(n: int, batch_size: int, seed: int, start: int, stop: int
                  ) -> Iterator[list[int]]:
    """Sample indices of micro-batches `start:stop` of the endless stream of epochs."""
    per_epoch = math.ceil(n / batch_size)
    orders: dict[int, list[int]] = {}
    for k in range(start, stop):
        epoch, j = divmod(k, per_epoch)
        if epoch not in orders:
            orders = {epoch: epoch_order(n, seed, epoch)}
        yield orders[epoch][j * batch_size:(j + 1) * batch_size]


def total_steps(n: int, ft: FinetuneParams) -> int:
    """Optimizer steps of the run: `max_steps`, else as many as `epochs` give."""
    if ft.max_steps:
        return ft.max_steps
    return math.ceil(ft.epochs * math.ceil(n / ft.batch_size) / ft.grad_accum)


def lr_factor(step: int, total: int, ft: FinetuneParams) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warm-up, then schedule."""
    if ft.warmup_steps and step < ft.warmup_steps:
        return (step + 1) / ft.warmup_steps
    if ft.lr_schedule == "constant":
        return 1.0
    span = max(1, total - ft.warmup_steps)
    progress = min(1.0, (step - ft.warmup_steps) / span)
    if ft.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


# ---------------------------------------------------------------------------------------------
# Checkpoints


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(folder: Path, model: GeoPixelModel, processor: Any, spec: ModelSpec,
                    optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
                    device: torch.device, extra: dict | None = None) -> Path:
    """Write a checkpoint folder whole or not at all (weights, adapter, processor, trainer)."""
    from safetensors.torch import save_file

    with staged_folder(Path(folder), stage="finetune-checkpoint") as staging:
        save_file({k: v.contiguous().cpu() for k, v in model.trainable_state().items()},
                  str(staging / WEIGHTS_FILE))
        model.lm.save_pretrained(str(staging / "adapter"))
        processor.save_pretrained(str(staging / "processor"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "rng": rng_state(device)}, staging / TRAINER_FILE)
        write_json(staging / SPEC_FILE, {**spec.to_json(), "step": step, **(extra or {})})
    return Path(folder)


def load_trained_weights(model: GeoPixelModel, folder: Path, device: torch.device) -> None:
    """Load a checkpoint's trained tensors into a model built from the same spec."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise BadParamsError("not a GeoPixel checkpoint (no trainable.safetensors)", folder)
    model.load_trainable_state(load_file(str(path), device=str(device)), path)


def latest_checkpoint(work: Path) -> Path | None:
    """The checkpoint of the highest step in a run folder (checkpoints are written whole)."""
    found = sorted(p for p in Path(work).glob(f"{CHECKPOINT_PREFIX}*")
                   if p.is_dir() and (p / TRAINER_FILE).is_file())
    return found[-1] if found else None


def _prune(work: Path, keep: int) -> None:
    found = sorted(p for p in work.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def run_key(ft: FinetuneParams, samples: Any) -> str:
    """Hash of the parameters that shape training and of the training records."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in ft.model_dump(mode="json").items()
                         if k not in UNKEYED_FIELDS}, sort_keys=True).encode())
    h.update(samples.fingerprint().encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Training


def _log_lines(path: Path, upto: int) -> list[str]:
    """Log lines of steps <= `upto` (what a resumed run keeps of the log)."""
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= upto]


def train(model: GeoPixelModel, processor: Any, spec: ModelSpec, samples: Any,
          ft: FinetuneParams, work: Path, device: torch.device,
          stop_after: int | None = None,
          on_step: Callable[[dict], None] | None = None) -> dict:
    """Train from the latest checkpoint in `work` (or from scratch) to the last step.

    `stop_after` ends the run after that step with a checkpoint, as a time-limited job
    would be stopped; starting again resumes there. Returns the run's summary.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    total = total_steps(n, ft)
    collator = Collator(processor, spec.seg_token, spec.question, model.sam_image_size,
                        spec.max_answer_tokens, record_instructions=ft.record_instructions)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=ft.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: lr_factor(s, total, ft))
    step = 0
    resumed = latest_checkpoint(work)
    if resumed is not None:
        load_trained_weights(model, resumed, device)
        state = torch.load(resumed / TRAINER_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        set_rng_state(state["rng"], device)
    log_path = work / LOG_FILE
    kept = _log_lines(log_path, step)
    with atomic_path(log_path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))

    last = min(total, stop_after) if stop_after is not None else total
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=ft.bf16 and device.type == "cuda")
    loader = torch.utils.data.DataLoader(
        samples, collate_fn=collator, num_workers=ft.num_workers if device.type == "cuda" else 0,
        batch_sampler=list(micro_batches(n, ft.batch_size, ft.seed, step * ft.grad_accum,
                                         last * ft.grad_accum)),
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(ft.seed))  # leaves the global RNG (dropout) be
    batches = iter(loader)
    model.train()
    started, seen, record = time.perf_counter(), 0, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with log_path.open("a") as log:
        while step < last:
            t0 = time.perf_counter()
            sums = {"total": 0.0, "ce": 0.0, "bce": 0.0, "dice": 0.0, "mask_iou": 0.0}
            masks = samples_in_step = 0
            for _ in range(ft.grad_accum):
                batch = to_device(next(batches), device)
                with autocast:
                    out = model(batch)
                (out.total / ft.grad_accum).backward()
                for key in sums:
                    sums[key] += float(getattr(out, key).detach()) / ft.grad_accum
                masks += out.masks
                samples_in_step += len(batch["record_ids"])
            if ft.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, ft.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += samples_in_step
            record = {"step": step, "epoch": round(step * ft.grad_accum * ft.batch_size / n, 4),
                      "lr": lr, **{k: round(v, 8) for k, v in sums.items()}, "masks": masks,
                      "samples": samples_in_step,
                      "seconds": round(time.perf_counter() - t0, 4)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if on_step is not None:
                on_step(record)
            if step % ft.save_every == 0 or step == last:
                save_checkpoint(work / f"{CHECKPOINT_PREFIX}{step:08d}", model, processor,
                                spec, optimizer, scheduler, step, device,
                                {"total_steps": total})
                _prune(work, ft.keep_checkpoints)
    elapsed = time.perf_counter() - started
    summary = {"steps": step, "total_steps": total, "complete": step >= total,
               "resumed_from_step": int(resumed.name[len(CHECKPOINT_PREFIX):]) if resumed
               else None, "samples_seen": seen, "train_records": n,
               "seconds": round(elapsed, 3),
               "samples_per_s": round(seen / elapsed, 4) if elapsed and seen else None,
               "last": record}
    if device.type == "cuda":
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return summary


def train_from_params(params: Params, parquet_dir: Path, out_dir: Path,
                      stop_after: int | None = None, scheduler: str | None = None) -> dict:
    """The finetune stage once a base model is set (`finetune.stage.run_finetune` decides).
    Training runs as one task of the run's dask cluster when there is one (a GPU worker:
    `runner.model_resources`), else here; the checkpoint is then copied into `out_dir`."""
    ft = params.finetune
    out_dir = Path(out_dir)
    if not ft.sam_checkpoint_path.strip():
        raise BadParamsError("finetune.sam_checkpoint_path is empty: GeoPixel's mask decoder "
                             "starts from SAM weights (e.g. sam_vit_h_4b8939.pth)")
    stage = Stage("finetune", params, scheduler, holds_model=True)
    shipped = params
    if stage.address:  # a worker elsewhere writes the run's checkpoints where this one reads
        shipped = params.model_copy(update={"finetune": ft.model_copy(
            update={"work_dir": str(Path(ft.work_dir).resolve())})})
    key, device, summary = stage.call(train_run, shipped, Path(parquet_dir), stop_after)
    work = Path(ft.work_dir) / key
    report = {"skipped": False, "run_key": key, "device": device, **summary}
    if not summary["complete"]:
        print(f"finetune stopped at step {summary['steps']} of {summary['total_steps']}; "
              f"run it again to resume from {work}", file=sys.stderr)
        return report
    final = latest_checkpoint(work)
    with stage.output(out_dir, inputs=[parquet_dir, work]) as out:
        for item in final.iterdir():
            target = out.folder / item.name
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
        shutil.copy2(work / LOG_FILE, out.folder / LOG_FILE)
        out.report = report
    return report


def train_run(params: Params, parquet_dir: Path, stop_after: int | None = None
              ) -> tuple[str, str, dict]:
    """Train (or resume) the run of `params` on the export in `parquet_dir`, checkpoints in
    `finetune.work_dir/<run key>`: (run key, device, the run's summary)."""
    ft = params.finetune
    samples = open_samples(Path(parquet_dir), ft.splits)
    device = resolve_device(ft.device)
    torch.manual_seed(ft.seed)
    random.seed(ft.seed)
    np.random.seed(ft.seed)
    spec = spec_from_params(ft)
    model, processor = load_geopixel_model(
        spec, device, ft.bf16, LossWeights(ft.ce_weight, ft.bce_weight, ft.dice_weight),
        ft.gradient_checkpointing)
    key = run_key(ft, samples)
    summary = train(model, processor, spec, samples, ft, Path(ft.work_dir) / key, device,
                    stop_after=stop_after)
    return key, str(device), summary


def read_log(log_path: Path) -> list[dict]:
    """The per-step records of a training log (log.jsonl)."""
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
