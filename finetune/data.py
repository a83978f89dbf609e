"""Training samples straight from our export: Parquet shards (or a GeoPixel JSON list).

A sample is one grounded record: its tile image, its caption (`<p> phrase </p> [SEG]` ...) and
one mask per [SEG], in order. Parquet shards (`build/export/parquet`, schema in
`pipeline.stages.export`) are read as they are, no conversion: captions and masks are indexed up
front, images are read by row group when a sample is asked for, so memory stays bounded by a
row group, not by the split. A GeoPixel list (`GeoPixelD.json`) is read with
`pipeline.formats.geopixel_format.read_geopixel`.

`Collator` turns samples into model inputs: the chat prompt (image + the sample's instruction,
or the fixed question) through the model's processor, the caption tokenised after it (labels
only on the answer), the tile resized for SAM, and the target masks at tile size. Generation
batches (`prompt_batch`) always ask the fixed question: evaluation asks every tile the same.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.core.errors import BadParamsError, BadRecordError, EmptyInputError
from pipeline.core.imaging import decode_image
from pipeline.core.params import PrepareParams
from pipeline.core.shards import SHARD_RE, list_shards
from pipeline.formats.geopixel_format import SEG, read_geopixel
from pipeline.geometry import masks as rle_masks
from schemas import RLE

IGNORE_INDEX = -100
EXPORT_COLUMNS = ("record_id", "split", "caption", "masks", "height", "width", "image")
# read where a shard has it (exports before instructions existed do not)
INSTRUCTION_COLUMN = "instruction"
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class Sample(NamedTuple):
    """One grounded record ready to train on: the i-th [SEG] of `caption` owns `masks[i]`."""

    record_id: str
    split: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    caption: str
    masks: Sequence[RLE]
    instruction: str = ""  # the record's human turn ("" = none: the fixed question)


class _Entry(NamedTuple):
    file: int
    group: int
    row: int
    record_id: str
    split: str
    caption: str
    masks: list[RLE]
    instruction: str


class ParquetSamples(torch.utils.data.Dataset):
    """Samples of export Parquet shards, images read lazily by row group."""

    def __init__(self, paths: Sequence[Path], max_pixels: int | None = None,
                 cached_groups: int = 2):
        self.paths = [Path(p) for p in paths]
        self.max_pixels = max_pixels or PrepareParams().max_image_pixels
        self.cached_groups = cached_groups
        self.entries: list[_Entry] = []
        for file_index, path in enumerate(self.paths):
            self.entries.extend(_index_shard(file_index, path))
        self._cache: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def _images(self, file: int, group: int) -> list[bytes]:
        key = (file, group)
        if key not in self._cache:
            table = pq.ParquetFile(self.paths[file]).read_row_group(group, columns=["image"])
            self._cache[key] = [img["bytes"] for img in table.column("image").to_pylist()]
            while len(self._cache) > self.cached_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def __getitem__(self, index: int) -> Sample:
        e = self.entries[index]
        data = self._images(e.file, e.group)[e.row]
        where = f"{self.paths[e.file]} record {e.record_id}"
        image = decode_image(data, where, self.max_pixels)
        return Sample(e.record_id, e.split, image, e.caption, e.masks, e.instruction)

    def fingerprint(self) -> str:
        """Hash of the samples' ids, captions, masks, instructions and shard sizes (images not
        re-read)."""
        h = hashlib.sha256()
        for path in self.paths:
            h.update(f"{path.name}:{path.stat().st_size}".encode())
        for e in self.entries:
            h.update(repr((e.record_id, e.split, e.caption, e.masks, e.instruction)).encode())
        return h.hexdigest()

    def __getstate__(self) -> dict:  # data loader workers start with an empty image cache
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state


def _index_shard(file_index: int, path: Path) -> list[_Entry]:
    """Captions and masks of one export shard, checked: one mask of the tile's size per [SEG]."""
    try:
        pfile = pq.ParquetFile(path)
    except (OSError, pq.lib.ArrowException) as err:
        raise BadRecordError(f"cannot read Parquet ({type(err).__name__})", path) from None
    missing = [c for c in EXPORT_COLUMNS if c not in pfile.schema_arrow.names]
    if missing:
        raise BadRecordError(f"not an export shard: no column(s) {missing}", path)
    columns = [c for c in EXPORT_COLUMNS if c != "image"]
    if INSTRUCTION_COLUMN in pfile.schema_arrow.names:
        columns.append(INSTRUCTION_COLUMN)
    entries = []
    for group in range(pfile.num_row_groups):
        rows = pfile.read_row_group(group, columns=columns).to_pylist()
        for row_index, row in enumerate(rows):
            rles = [RLE(**m) for m in row["masks"]]
            if row["caption"].count(SEG) != len(rles):
                raise BadRecordError(f"record {row['record_id']}: {row['caption'].count(SEG)} "
                                     f"[SEG] tokens but {len(rles)} masks", path)
            for rle in rles:
                if list(rle.size) != [row["height"], row["width"]]:
                    raise BadRecordError(f"record {row['record_id']}: mask of size {rle.size}, "
                                         f"tile is {[row['height'], row['width']]}", path)
            entries.append(_Entry(file_index, group, row_index, row["record_id"], row["split"],
                                  row["caption"], rles, row.get(INSTRUCTION_COLUMN) or ""))
    return entries


class ListSamples(torch.utils.data.Dataset):
    """Samples held in memory as (record, PNG bytes): what a GeoPixel list reads into."""

    def __init__(self, items: Sequence[tuple[Any, bytes]], max_pixels: int | None = None):
        self.items = list(items)
        self.max_pixels = max_pixels or PrepareParams().max_image_pixels

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Hash of the records and their images."""
        h = hashlib.sha256()
        for record, png in self.items:
            h.update(record.model_dump_json().encode())
            h.update(hashlib.sha256(png).digest())
        return h.hexdigest()

    def __getitem__(self, index: int) -> Sample:
        record, png = self.items[index]
        image = decode_image(png, record.record_id, self.max_pixels)
        return Sample(record.record_id, record.split, image, record.caption,
                      [p.mask for p in record.phrases])


def open_samples(source: Path, splits: Sequence[str] | None = None,
                 max_pixels: int | None = None) -> torch.utils.data.Dataset:
    """Samples of `splits` from an export Parquet folder, or from a GeoPixel list (.json)."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        pairs = read_geopixel(source, source.parent)
        items = [(r, t.image_png) for r, t in pairs if not splits or r.split in splits]
        if not items:
            raise EmptyInputError(f"no samples of split(s) {list(splits or [])} in the list",
                                  source)
        return ListSamples(items, max_pixels)
    if not source.is_dir():
        raise EmptyInputError("neither an export Parquet folder nor a GeoPixel list (.json)",
                              source)
    shards = [p for p in list_shards(source)
              if not splits or SHARD_RE.match(p.name).group("split") in splits]
    if not shards:
        raise EmptyInputError(f"no Parquet shards of split(s) {list(splits or [])}", source)
    samples = ParquetSamples(shards, max_pixels)
    if not len(samples):
        raise EmptyInputError(f"the shards of split(s) {list(splits or [])} hold no records",
                              source)
    return samples


# ---------------------------------------------------------------------------------------------
# Collation


def _pad(rows: Sequence[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        if left:
            out[i, width - r.shape[0]:] = r
        else:
            out[i, :r.shape[0]] = r
    return out


class Collator:
    """Samples -> model inputs (picklable, so data loader workers can run it)."""

    def __init__(self, processor: Any, seg_token: str, question: str, sam_image_size: int,
                 max_answer_tokens: int, record_instructions: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.seg_token = seg_token
        self.seg_id = self.tokenizer.convert_tokens_to_ids(seg_token)
        if self.seg_id is None or self.seg_id == self.tokenizer.unk_token_id:
            raise BadParamsError(f"the tokenizer has no {seg_token!r} token (add it first)")
        self.question = question
        self.record_instructions = record_instructions
        self.sam_image_size = sam_image_size
        self.max_answer_tokens = max_answer_tokens
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self._prompts: dict[str, str] = {}

    def _render(self, question: str, caption: str | None) -> str:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        if caption is not None:
            messages.append({"role": "assistant",
                             "content": [{"type": "text", "text": caption}]})
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=caption is None)

    def question_of(self, sample: Sample) -> str:
        """What the user turn asks of `sample`: its own instruction (with
        `record_instructions`, where it has one), else the fixed question."""
        return (sample.instruction if self.record_instructions and sample.instruction
                else self.question)

    def prompt_text(self, question: str | None = None) -> str:
        """The rendered prompt, up to the assistant's turn (the fixed question by default)."""
        question = self.question if question is None else question
        if question not in self._prompts:
            self._prompts[question] = self._render(question, None)
        return self._prompts[question]

    def answer_text(self, caption: str, question: str | None = None) -> str:
        """The caption as the chat template closes the assistant's turn (end marker included)."""
        question = self.question if question is None else question
        prompt, full = self.prompt_text(question), self._render(question, caption)
        if not full.startswith(prompt) or caption not in full:
            raise BadParamsError("the processor's chat template does not render the answer "
                                 "right after the generation prompt")
        return full[len(prompt):]

    def prompt_inputs(self, image: np.ndarray,
                      question: str | None = None) -> dict[str, torch.Tensor]:
        """The processor's tensors for the prompt (image + question) of one sample."""
        return dict(self.processor(text=[self.prompt_text(question)], images=[image],
                                   return_tensors="pt"))

    def sam_image(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tile resized so its long side is SAM's img_size (3 x h x w uint8), and (h, w)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        resized = ResizeLongestSide(self.sam_image_size).apply_image(image)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
        return tensor, (int(resized.shape[0]), int(resized.shape[1]))

    def _sequences(self, prompts: list[dict], answers: list[torch.Tensor] | None,
                   left: bool) -> dict[str, torch.Tensor]:
        """Prompt (+ answer) tokens of each sample, padded; image tensors concatenated."""
        batch: dict[str, torch.Tensor] = {}
        keys = [k for k in prompts[0] if k in SEQUENCE_KEYS]
        for key in keys:
            rows = []
            for i, p in enumerate(prompts):
                row = p[key][0]
                if answers is not None:
                    n = answers[i].shape[0]
                    extra = {"input_ids": answers[i],
                             "attention_mask": torch.ones(n, dtype=row.dtype)}.get(
                                 key, torch.zeros(n, dtype=row.dtype))
                    row = torch.cat([row, extra.to(row.dtype)])
                rows.append(row)
            batch[key] = _pad(rows, self.pad_id if key == "input_ids" else 0, left)
        for key in prompts[0]:
            if key not in SEQUENCE_KEYS:
                batch[key] = torch.cat([p[key] for p in prompts])
        return batch

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """A training batch: inputs, labels (answer tokens only), SAM images, target masks."""
        prompts, answers, labels, targets = [], [], [], []
        sam_images, resized, tiles = [], [], []
        for s in samples:
            question = self.question_of(s)
            prompt = self.prompt_inputs(s.image, question)
            ids = self.tokenizer(self.answer_text(s.caption, question), add_special_tokens=False,
                                 return_tensors="pt")["input_ids"][0][:self.max_answer_tokens]
            kept = int((ids == self.seg_id).sum())
            n_prompt = prompt["input_ids"].shape[1]
            prompts.append(prompt)
            answers.append(ids)
            labels.append(torch.cat([torch.full((n_prompt,), IGNORE_INDEX), ids]))
            height, width = s.image.shape[:2]
            stack = [rle_masks.decode(m) for m in s.masks[:kept]]
            targets.append(torch.from_numpy(np.stack(stack)) if stack
                           else torch.zeros((0, height, width), dtype=torch.uint8))
            img, size = self.sam_image(s.image)
            sam_images.append(img)
            resized.append(size)
            tiles.append((height, width))
        vlm_inputs = self._sequences(prompts, answers, left=False)
        return {"vlm_inputs": vlm_inputs, "labels": _pad(labels, IGNORE_INDEX, left=False),
                "sam_images": sam_images, "resized_sizes": resized, "tile_sizes": tiles,
                "masks": targets, "record_ids": [s.record_id for s in samples]}

    def prompt_batch(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """A generation batch: prompts only, left-padded; SAM images and tile sizes."""
        prompts, sam_images, resized, tiles = [], [], [], []
        for s in samples:
            prompts.append(self.prompt_inputs(s.image))
            img, size = self.sam_image(s.image)
            sam_images.append(img)
            resized.append(size)
            tiles.append(tuple(s.image.shape[:2]))
        return {"vlm_inputs": self._sequences(prompts, None, left=True),
                "sam_images": sam_images, "resized_sizes": resized, "tile_sizes": tiles,
                "record_ids": [s.record_id for s in samples]}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor (also inside lists and dicts) on `device`."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value
    return {k: move(v) for k, v in batch.items()}
