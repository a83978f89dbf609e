"""The transformers backend on a tiny random Qwen2.5-VL (tests/tiny_vlm.py), loaded from a
folder through the backend's own loading code.

Requests are the real plan of the bundled iSAID val scenes (P0003, P0004): tiles and
set-of-marks images cut and drawn by the prepare and plan stages. A random model answers
gibberish, so what is checked is the machinery: prefix-shared batched generation gives the very
tokens of plain one-prompt-at-a-time `generate`, the stage answers every request, and set-up
mistakes stop with one line. A second tiny model rewired to say one clean sentence
(`tiny_vlm.answer_always`) checks the accepted path and the response cache.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_vlm import save_tiny_qwen25_vl  # noqa: E402

from annotators.base import AnnotationContext, get_backend  # noqa: E402
from annotators.transformers_backend import NAME, Sampling, TransformersBackend, chat_text  # noqa: E402
from pipeline.core.errors import BadParamsError  # noqa: E402
from pipeline.core.imaging import encode_png, sha256  # noqa: E402
from pipeline.core.params import BackendParams, Params  # noqa: E402
from pipeline.core.shards import list_shards, read_records  # noqa: E402
from pipeline.stages.annotate import run_annotate  # noqa: E402
from pipeline.stages.plan import run_plan  # noqa: E402
from pipeline.stages.prepare import run_prepare  # noqa: E402
from schemas import (  # noqa: E402
    PASSES,  # noqa: E402
    Request,
    Response,
    Tile,
    TilePlan,
)

ISAID = Path(__file__).resolve().parents[1] / "data" / "isaid"
MAX_TOKENS = 24
# The tiny model's end-token row is made 1.25 x this token's, so that answers end at varied
# lengths (some stop, some run to MAX_TOKENS) and finished rows leave the batch mid-way.
END_LIKE = "en"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen25_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl",
                               end_token_like=END_LIKE)


def pipeline_params(tmp: Path, model: Path, **transformers) -> Params:
    return Params.model_validate({
        "data": {"root": str(ISAID)},
        "runner": {"local_scheduler": "synchronous", "workers": 1},
        "annotate": {
            "backend": {"name": "transformers", "model": str(model), "max_tokens": MAX_TOKENS,
                        "clean_retries": 1,
                        "transformers": {"device": "cpu", "batch_size": 8, **transformers}},
            "cache": {"path": str(tmp / "cache" / "responses.sqlite")},
            # a random-initialised model writes gibberish that cleaning refuses: counted, not fatal
            "max_failed_share": 1.0}})


@pytest.fixture(scope="module")
def val_plan(tmp_path_factory, model_dir) -> Path:
    """tiles/ and plan/ of the bundled val scenes, made by the prepare and plan stages."""
    root = tmp_path_factory.mktemp("build")
    params = pipeline_params(root, model_dir)
    run_prepare(params, root / "tiles", splits=["val"])
    run_plan(params, root / "tiles", root / "plan")
    return root


def realistic_mix(root: Path) -> tuple[list[Request], AnnotationContext]:
    """Two patches, each with 1 holistic + 3 instance + 1 cluster request: holistic and
    cluster on the tile, instance on its set-of-marks image."""
    requests = {kind: [r for s in list_shards(root / "plan" / "requests" / kind)
                       for r in read_records(s, Request)] for kind in PASSES}
    plans = [p for s in list_shards(root / "plan" / "tiles") for p in read_records(s, TilePlan)]
    chosen = [p for p in plans if len(p.marks) >= 3 and p.clusters][:2]
    assert len(chosen) == 2
    mix: list[Request] = []
    for plan in chosen:
        of_tile = {k: [r for r in requests[k] if r.tile_id == plan.tile_id] for k in PASSES}
        mix += of_tile["holistic"][:1] + of_tile["instance"][:3] + of_tile["cluster"][:1]
    tiles = {t.tile_id: t for s in list_shards(root / "tiles") for t in read_records(s, Tile)}
    context = AnnotationContext(tiles={p.tile_id: tiles[p.tile_id] for p in chosen},
                                images={p.som_sha256: p.som_png for p in chosen})
    assert len(mix) == 10 and len({r.image_sha256 for r in mix}) == 4
    return mix, context


def full_prompt(backend: TransformersBackend, request: Request, context: AnnotationContext):
    """The processor on the whole prompt and its image, as a plain `generate` call takes it."""
    processor = backend.loaded.processor
    if not request.image_sha256:
        return processor(text=[chat_text(processor, request.prompt, with_image=False)],
                         return_tensors="pt")
    image = Image.open(io.BytesIO(context.image(request.image_sha256))).convert("RGB")
    return processor(text=[chat_text(processor, request.prompt)], images=[image],
                     return_tensors="pt")


def plain_generate(backend: TransformersBackend, request: Request, context: AnnotationContext,
                   **generate_kwargs) -> tuple[int, ...]:
    """The reference: `model.generate` on one whole prompt."""
    inputs = full_prompt(backend, request, context)
    out = backend.loaded.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                        **generate_kwargs)
    return tuple(out[0, inputs["input_ids"].shape[1]:].tolist())


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_prefix_sharing_gives_the_tokens_of_plain_generate(val_plan, model_dir, penalty):
    params = pipeline_params(val_plan, model_dir, repetition_penalty=penalty)
    backend = get_backend(params.annotate.backend)
    assert isinstance(backend, TransformersBackend)
    mix, context = realistic_mix(val_plan)

    answers = backend.generate(mix, context)

    # each image's prefix computed once for its prompts; both patches in one forward batch
    assert backend.stats.image_prefixes == 4
    assert backend.stats.forward_batches == 2  # 10 prompts, batch_size 8, images kept whole
    kwargs = {"repetition_penalty": penalty} if penalty else {}
    expected = [plain_generate(backend, r, context, **kwargs) for r in mix]
    assert [a.token_ids for a in answers] == expected
    if penalty is None:
        # the mix exercises rows that stop early (and leave the batch) beside rows that don't
        lengths = {len(a.token_ids) for a in answers}
        assert {a.finish_reason for a in answers} == {"stop", "length"} and len(lengths) >= 3
    assert [a.prompt_tokens for a in answers] == [
        full_prompt(backend, r, context)["input_ids"].shape[1] for r in mix]


def test_images_of_other_sizes_and_groups_split_across_batches(model_dir, tmp_path):
    """Prefixes of different lengths go to different forward batches; an image with more
    prompts than a batch holds is split (its prefix computed once per batch it is in); a
    request without an image is answered from its text."""
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 255, shape, dtype=np.uint8))
            for shape in [(224, 224, 3), (100, 150, 3)]]
    texts = ["Describe the image in four short sentences.",
             "List down all the attributes of the plane at the top.",
             "Give a brief description of several ships at the left.",
             "Describe the harbor in one short sentence.",
             "List the ships in the image."]
    requests = [Request(request_id=str(k), tile_id="t", kind="instance", prompt=text,
                        prompt_version="v1", image_sha256=sha256(pngs[k // 3]), object_ids=[k])
                for k, text in enumerate(texts)]
    requests.append(requests[0].model_copy(update={"request_id": "text", "image_sha256": ""}))
    missing = requests[0].model_copy(update={"request_id": "gone", "image_sha256": "0" * 64})
    context = AnnotationContext(tiles={}, images={sha256(p): p for p in pngs})
    backend = TransformersBackend(
        pipeline_params(tmp_path, model_dir, batch_size=2).annotate.backend)

    answers = backend.generate(requests, context)

    # text only (1 prompt), then the smaller image (2), then the larger (3 = 2 + 1)
    assert backend.stats.forward_batches == 4 and backend.stats.image_prefixes == 3
    assert [a.token_ids for a in answers] == [plain_generate(backend, r, context)
                                              for r in requests]
    assert [a.prompt_tokens for a in answers] == [
        full_prompt(backend, r, context)["input_ids"].shape[1] for r in requests]
    gone = backend.annotate([missing], context)[0]
    assert (gone.status, gone.attempts, gone.backend) == ("failed", 0, NAME)
    assert gone.error.startswith("image: no image with sha256")


def test_sampling_is_seeded(val_plan, model_dir):
    backend = TransformersBackend(pipeline_params(val_plan, model_dir).annotate.backend)
    mix, context = realistic_mix(val_plan)
    sampled = Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    first = [a.token_ids for a in backend.generate(mix[:5], context, sampled)]
    again = [a.token_ids for a in backend.generate(mix[:5], context, sampled)]
    greedy = [a.token_ids for a in backend.generate(mix[:5], context,
                                                   Sampling(max_new_tokens=8))]
    assert first == again and first != greedy


def test_annotate_stage_answers_every_request(val_plan, model_dir, tmp_path):
    params = pipeline_params(tmp_path, model_dir)
    for kind in PASSES:
        out = tmp_path / "responses" / kind
        report = run_annotate(params, kind, val_plan / "tiles", val_plan / "plan", out)
        for shard in list_shards(val_plan / "plan" / "requests" / kind):
            requests = read_records(shard, Request)
            responses = read_records(out / shard.name, Response)
            assert [r.request_id for r in responses] == [r.request_id for r in requests]
            for response in responses:
                assert response.backend == NAME and response.model == "tiny-qwen2.5-vl"
                assert response.cost_usd == 0.0 and response.usage.prompt_tokens > 0
                # gibberish from a random model: refused by cleaning, asked twice, recorded
                if response.status == "failed":
                    assert response.error.startswith("output cleaning refused 2 answers")
                    assert response.attempts == 2
        assert report["requests"] == report["ok"] + report["failed"] > 0
        stats = report["backend_stats"]
        assert stats["prompts"] >= report["requests"]
        assert stats["image_prefixes"] < stats["prompts"] or kind == "holistic"


def test_clean_answers_are_kept_and_a_rerun_takes_them_from_the_cache(val_plan, tmp_path):
    answer = "A large plane in the given aerial image."
    model = save_tiny_qwen25_vl(tmp_path / "parrot", answer=answer)
    params = pipeline_params(tmp_path, model)
    runs = []
    for run in ("first", "rerun"):
        out = tmp_path / run
        runs.append(run_annotate(params, "instance", val_plan / "tiles", val_plan / "plan", out))
        responses = [r for s in list_shards(out) for r in read_records(s, Response)]
        assert {(r.status, r.text) for r in responses} == {("ok", answer)}
        assert all(r.cached == (run == "rerun") for r in responses)
    first, rerun = (r["backend_stats"] for r in runs)
    assert first["answered"] == runs[0]["requests"] and first["prompts"] == runs[0]["requests"]
    assert rerun["cache_hits"] == runs[1]["requests"] and rerun["prompts"] == 0
    # the LLM composer's request: text only, its paragraph passed on as written
    compose = Request(request_id="c", tile_id="t", kind="compose", prompt="Write {1}.",
                      prompt_version="v1", image_sha256="", object_ids=[])
    backend = TransformersBackend(params.annotate.backend)
    done = backend.annotate([compose], AnnotationContext(tiles={}))[0]
    assert (done.status, done.text, done.kind) == ("ok", answer, "compose")


@pytest.mark.parametrize("where", ["missing", "empty", "broken"])
def test_a_bad_model_folder_stops_with_one_line(tmp_path, where):
    folder = tmp_path / "models" / "Qwen2.5-VL-7B-Instruct"
    if where != "missing":
        folder.mkdir(parents=True)
    if where == "broken":
        (folder / "config.json").write_text('{"model_type": "qwen2_5_vl"')
    params = BackendParams(name="transformers", model="template-v1",
                           transformers={"model_path": str(folder), "device": "cpu"})
    with pytest.raises(BadParamsError) as caught:
        # missing and empty folders stop at set-up, a broken one when it is loaded
        _ = get_backend(params).loaded
    line = caught.value.one_line()
    assert str(folder) in line and "\n" not in line
    assert line.startswith("bad parameters: annotate.backend.transformers.model_path: ")
    if where != "broken":  # the stage stops before any work, with the same error
        stage = Params.model_validate({"annotate": {"backend": params.model_dump()}})
        with pytest.raises(BadParamsError, match="model_path"):
            run_annotate(stage, "holistic", tmp_path / "tiles", tmp_path / "plan",
                         tmp_path / "out")
