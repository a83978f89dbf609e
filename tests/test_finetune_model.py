"""The GeoPixel-style model's parts: [SEG] rows, LoRA placement, what trains, the collator's
labels and masks, the mask losses, and reading samples (export Parquet, GeoPixel list).

Models are tiny and random (`tests/tiny_models.py`), saved and loaded as a real one would be.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("segment_anything")

from tiny_models import TINY_SAM_SHAPE, save_tiny_qwen25_vl, save_tiny_sam  # noqa: E402

from finetune.data import IGNORE_INDEX, Collator, Sample, open_samples  # noqa: E402
from finetune.model import ModelSpec, load_geopixel_model, load_sam, mask_bce, mask_dice, mask_iou  # noqa: E402
from finetune.predict import decode_answer, phrases_per_seg  # noqa: E402
from pipeline.core.errors import BadParamsError, BadRecordError  # noqa: E402
from pipeline.core.params import FinetuneParams  # noqa: E402
from pipeline.geometry import masks  # noqa: E402

QUESTION = FinetuneParams().question
CAPTIONS = [
    "The view shows a <p> tennis court-1 </p> [SEG] at the top left, and "
    "<p> small vehicles </p> [SEG] parked at the right of grey paved surfaces.",
    "A <p> storage tank-1 </p> [SEG] stands at the center beside green trees.",
]


def _sample(caption: str, height: int = 48, width: int = 64, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    rles = []
    for k in range(caption.count("[SEG]")):
        mask = np.zeros((height, width), np.uint8)
        mask[4 * k:4 * k + 12, 5 * k:5 * k + 20] = 1
        rles.append(masks.encode(mask))
    return Sample(f"rec-{seed}", "train", image, caption, rles)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny")
    lm = save_tiny_qwen25_vl(folder / "lm", CAPTIONS * 20 + [QUESTION])
    sam = save_tiny_sam(folder / "sam" / "sam.pth")
    spec = ModelSpec(str(lm), "custom", str(sam), question=QUESTION)
    torch.manual_seed(0)
    model, processor = load_geopixel_model(spec, torch.device("cpu"), bf16=True)
    collator = Collator(processor, spec.seg_token, QUESTION, model.sam_image_size, 512)
    return model, processor, collator, folder


def test_seg_is_one_token_with_its_own_trainable_rows(built):
    model, processor, _, _ = built
    tokenizer = processor.tokenizer
    ids = tokenizer("court </p> [SEG] at", add_special_tokens=False)["input_ids"]
    assert ids.count(model.seg_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(model.seg_token_id) == "[SEG]"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("embed_tokens.rows") for n in names)
    assert any(n.endswith("lm_head.rows") for n in names)
    assert not any("embed_tokens.base" in n or "lm_head.base" in n for n in names)


def test_lora_sits_on_language_attention_only_and_sam_encoder_is_frozen(built):
    model, *_ = built
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all("language_model" in n and "visual" not in n for n in lora)
    assert {n.split(".")[-4] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(n.startswith("sam.mask_decoder.") for n in trainable)
    assert not any(n.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) for n in trainable)
    assert all(n.startswith(("lm.", "sam.mask_decoder.", "seg_projection.")) for n in trainable)
    hidden = model.lm.config.get_text_config().hidden_size
    first, _, last = model.seg_projection
    assert (first.in_features, first.out_features) == (hidden, hidden)
    assert (last.in_features, last.out_features) == (hidden, TINY_SAM_SHAPE["prompt_embed_dim"])


def test_labels_cover_the_answer_only_and_masks_follow_the_seg_tokens(built):
    model, processor, collator, _ = built
    batch = collator([_sample(CAPTIONS[0], seed=1), _sample(CAPTIONS[1], 40, 30, seed=2)])
    ids, labels = batch["vlm_inputs"]["input_ids"], batch["labels"]
    attention = batch["vlm_inputs"]["attention_mask"]
    for i, caption in enumerate(CAPTIONS):
        answer = labels[i][labels[i] != IGNORE_INDEX]
        text = processor.tokenizer.decode(answer)
        assert text.startswith(caption) and text.rstrip().endswith("<|im_end|>")
        assert int((ids[i] == model.seg_token_id).sum()) == caption.count("[SEG]")
        assert batch["masks"][i].shape[0] == caption.count("[SEG]")
        assert (labels[i][attention[i] == 0] == IGNORE_INDEX).all()
    assert batch["masks"][1].shape[1:] == (40, 30) and batch["tile_sizes"][1] == (40, 30)
    assert max(batch["resized_sizes"][1]) == model.sam_image_size


def test_a_cut_answer_drops_the_masks_of_the_seg_tokens_cut_off(built):
    model, processor, _, _ = built
    tokenizer = processor.tokenizer
    full = Collator(processor, "[SEG]", QUESTION, model.sam_image_size, 512)
    answer = tokenizer(full.answer_text(CAPTIONS[0]), add_special_tokens=False)["input_ids"]
    cut = answer.index(model.seg_token_id, answer.index(model.seg_token_id) + 1)  # 2nd [SEG]
    batch = Collator(processor, "[SEG]", QUESTION, model.sam_image_size, cut)(
        [_sample(CAPTIONS[0])])
    assert int((batch["vlm_inputs"]["input_ids"] == model.seg_token_id).sum()) == 1
    assert batch["masks"][0].shape[0] == 1


def _prompt_words(processor, batch, i: int) -> str:
    ids, labels = batch["vlm_inputs"]["input_ids"][i], batch["labels"][i]
    prompt = ids[(labels == IGNORE_INDEX) & (batch["vlm_inputs"]["attention_mask"][i] == 1)]
    return processor.tokenizer.decode(prompt)


def test_each_sample_is_asked_its_own_instruction_when_training(built):
    """With record_instructions the user turn is the record's instruction (the export's
    varied ones); a sample without one, and every generation prompt, get the fixed question."""
    model, processor, _, _ = built
    own = "Describe this aerial image in detail, tying each object you mention to its mask."
    samples = [_sample(CAPTIONS[1], seed=1)._replace(instruction=own), _sample(CAPTIONS[1])]
    varied = Collator(processor, "[SEG]", QUESTION, model.sam_image_size, 512,
                      record_instructions=True)
    batch = varied(samples)
    assert own in _prompt_words(processor, batch, 0)
    assert QUESTION not in _prompt_words(processor, batch, 0)
    assert QUESTION in _prompt_words(processor, batch, 1)
    for i, caption in enumerate([CAPTIONS[1]] * 2):  # the answer is labelled either way
        answer = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX]
        assert processor.tokenizer.decode(answer).startswith(caption)
    fixed = Collator(processor, "[SEG]", QUESTION, model.sam_image_size, 512)
    assert QUESTION in _prompt_words(processor, fixed(samples), 0)
    prompts = varied.prompt_batch(samples)["vlm_inputs"]["input_ids"]
    assert all(own not in processor.tokenizer.decode(row) for row in prompts)


def test_export_shards_give_each_sample_its_instruction(tmp_path):
    from pipeline.core.imaging import encode_png
    from pipeline.stages.export import EXPORT_SCHEMA

    folder = tmp_path / "parquet"
    folder.mkdir()
    png = encode_png(np.zeros((8, 8, 3), np.uint8), 1)
    rows = [{"record_id": f"r{i}", "tile_id": f"t{i}", "split": "train",
             "image": {"bytes": png, "path": f"t{i}.png"}, "width": 8, "height": 8,
             "caption": "one <p> x </p> [SEG]", "phrases": ["x"],
             "phrase_kinds": ["instance"], "phrase_categories": ["ship"],
             "masks": [masks.encode(np.ones((8, 8), np.uint8)).model_dump()],
             "object_ids": [[1]], "provenance": None, "instruction": text}
            for i, text in enumerate(["Ask one.", "Ask two."])]
    pq.write_table(pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA),
                   folder / "train-00000-of-00001.parquet")
    samples = open_samples(folder, ["train"])
    assert [samples[i].instruction for i in range(2)] == ["Ask one.", "Ask two."]
    # a shard written before instructions existed: no column, no instruction
    pq.write_table(pq.read_table(folder).drop_columns(["instruction"]),
                   folder / "train-00000-of-00001.parquet")
    assert open_samples(folder, ["train"])[0].instruction == ""


def test_a_training_step_moves_the_seg_rows_but_not_the_frozen_vocabulary(built):
    model, _, collator, _ = built
    embedding = model.lm.get_input_embeddings()
    head = model.lm.get_output_embeddings()
    before = {"embed": embedding.base.weight.clone(), "head": head.base.weight.clone(),
              "rows": embedding.rows.detach().clone(), "out": head.rows.detach().clone(),
              "encoder": model.sam.image_encoder.patch_embed.proj.weight.clone()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(collator([_sample(CAPTIONS[0])]))
    assert out.masks == 2 and all(math.isfinite(float(v)) for v in (out.ce, out.bce, out.dice))
    assert float(out.total.detach()) == pytest.approx(float(out.ce) + 2 * float(out.bce)
                                             + 0.5 * float(out.dice), rel=1e-5)
    out.total.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(embedding.base.weight, before["embed"])
    assert torch.equal(head.base.weight, before["head"])
    assert torch.equal(model.sam.image_encoder.patch_embed.proj.weight, before["encoder"])
    assert not torch.equal(embedding.rows, before["rows"])
    assert not torch.equal(head.rows, before["out"])


def test_masks_come_back_at_the_tile_size(built):
    model, _, collator, _ = built
    sample = _sample(CAPTIONS[1], 37, 91)
    img, resized = collator.sam_image(sample.image)
    embedding = model.encode_images([img])[0]
    prompts = torch.zeros((3, TINY_SAM_SHAPE["prompt_embed_dim"]))
    logits = model.decode_masks(embedding, prompts, resized, (37, 91))
    assert tuple(logits.shape) == (3, 37, 91)


def test_mask_losses_on_known_masks():
    target = torch.zeros((1, 8, 8))
    target[0, :4] = 1
    perfect = (target * 2 - 1) * 30
    assert float(mask_dice(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    assert float(mask_iou(perfect, target)) == 1.0
    assert float(mask_bce(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(mask_dice(-perfect, target)) == pytest.approx(1.0, abs=1e-4)
    assert float(mask_iou(-perfect, target)) == 0.0
    assert float(mask_bce(torch.zeros_like(target), target)) == pytest.approx(math.log(2))
    half = target.clone()
    half[0, :2] = 0  # predicted 16 of the 32 target pixels, nothing else
    assert float(mask_iou(half * 60 - 30, target)) == pytest.approx(0.5)


def test_phrases_pair_with_seg_tokens_even_without_tags():
    caption = "A <p> tennis court-1 </p> [SEG] and a lone [SEG] near <p> two ships </p>  [SEG] ."
    assert phrases_per_seg(caption) == ["tennis court-1", "", "two ships"]
    assert phrases_per_seg("no grounding here") == []


def test_decoded_answers_keep_seg_and_drop_end_markers(built):
    model, processor, _, _ = built
    tokenizer = processor.tokenizer
    ids = tokenizer("The <p> ship </p> [SEG] is white.<|im_end|>",
                    add_special_tokens=False)["input_ids"]
    assert decode_answer(tokenizer, ids, model.seg_token_id) == \
        "The <p> ship </p> [SEG] is white."


def test_samples_from_the_released_geopixel_list(repo_root):
    samples = open_samples(repo_root / "data" / "geopixeld_sample" / "GeoPixelD.json")
    sample = samples[0]
    assert len(samples) == 1 and sample.image.shape == (800, 800, 3)
    assert len(sample.masks) == sample.caption.count("[SEG]") > 0
    assert all(list(m.size) == [800, 800] for m in sample.masks)


def test_bad_shards_and_sam_files_name_the_file(tmp_path):
    from pipeline.stages.export import EXPORT_SCHEMA

    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"record_id": ["a"]}), folder / "train-00000-of-00001.parquet")
    with pytest.raises(BadRecordError, match="not an export shard") as err:
        open_samples(folder, ["train"])
    assert "train-00000-of-00001.parquet" in err.value.one_line()

    row = {"record_id": "r", "tile_id": "t", "split": "train",
           "image": {"bytes": b"", "path": "t.png"}, "width": 8, "height": 8,
           "caption": "one <p> x </p> [SEG] and [SEG]", "phrases": ["x"],
           "phrase_kinds": ["instance"], "phrase_categories": ["ship"],
           "masks": [masks.encode(np.ones((8, 8), np.uint8)).model_dump()],
           "object_ids": [[1]], "provenance": None}
    pq.write_table(pa.Table.from_pylist([row], schema=EXPORT_SCHEMA),
                   folder / "train-00000-of-00001.parquet")
    with pytest.raises(BadRecordError, match="2 \\[SEG\\] tokens but 1 masks"):
        open_samples(folder, ["train"])

    with pytest.raises(BadParamsError, match="sam_config.json") as err:
        load_sam("custom", tmp_path / "sam.pth")
    sam_path = save_tiny_sam(tmp_path / "sam" / "sam.pth")
    shape = json.loads((sam_path.parent / "sam_config.json").read_text())
    shape["encoder_embed_dim"] = 32
    (sam_path.parent / "sam_config.json").write_text(json.dumps(shape))
    with pytest.raises(BadParamsError, match="do not fit"):
        load_sam("custom", sam_path)
