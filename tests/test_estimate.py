"""Know the bill before paying it: image-token rules against the documented figures, the
per-call arithmetic, the totals (sync and Batch, scaled to a dataset not built), the plan
report's estimate block and `geopixeld estimate`."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from test_priors import square, synthetic_tile
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import estimate as est
from pipeline.core.params import Params, RunnerParams
from pipeline.core.shards import write_records
from pipeline.stages.plan import plan_tile, run_plan
from schemas import Request, Tile

HOLISTIC = "Describe the image in four short sentences."  # 43 characters: 11 tokens at ~4


@pytest.fixture(autouse=True)
def _no_tiktoken(monkeypatch):
    """Every test counts text at ~4 characters a token unless it installs a tiktoken."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)


# ---- image tokens: OpenAI's documented examples ---------------------------------------------

def test_gpt4o_tile_rule_gives_the_documented_figures():
    assert est.openai_tile_tokens(1024, 1024, "high") == 765   # 768x768: 4 tiles
    assert est.openai_tile_tokens(2048, 4096, "high") == 1105  # 768x1536: 6 tiles
    assert est.openai_tile_tokens(2048, 4096, "low") == 85
    assert est.openai_tile_tokens(4096, 8192, "low") == 85
    assert est.openai_tile_tokens(512, 512, "high") == 85 + 170   # never scaled up
    assert est.openai_tile_tokens(800, 800, "high") == 765        # a GeoPixelD patch
    rule = est.image_rule("gpt-4o")
    assert rule.family == "openai" and not rule.assumed
    assert rule.tokens(1024, 1024, "auto") == rule.tokens(1024, 1024, "high") == 765
    assert rule.tokens(1024, 1024, "low") == 85
    assert est.image_rule("gpt-4o-2024-08-06").tokens(2048, 4096, "high") == 1105


def test_gpt4o_mini_bills_the_same_tiles_at_its_documented_multiplier():
    rule = est.image_rule("gpt-4o-mini-2024-07-18")
    assert rule.tokens(1024, 1024, "high") == 2833 + 4 * 5667 == 25501
    assert rule.tokens(2048, 4096, "high") == 2833 + 6 * 5667
    assert rule.tokens(2048, 4096, "low") == 2833
    assert "2833" in rule.description and "5667" in rule.description


def test_patch_rule_of_gpt41_mini():
    assert est.openai_patch_tokens(1024, 1024) == 1024          # 32 x 32 patches
    assert est.openai_patch_tokens(1800, 2400) == 1452          # scaled to 1056x1408
    assert est.image_rule("gpt-4.1-mini").tokens(1024, 1024, "high") == 1659  # x 1.62
    assert est.image_rule("gpt-4.1-nano").tokens(1024, 1024, "high") == 2520  # x 2.46


def test_qwen_rule_one_token_per_28px_area():
    assert est.smart_resize(800, 800) == (812, 812)
    assert est.qwen_image_tokens(800, 800) == 29 * 29
    assert est.qwen_image_tokens(1000, 500) == 36 * 18
    assert est.qwen_image_tokens(800, 800, max_pixels=28 * 28 * 256) == 16 * 16
    rule = est.image_rule("Qwen/Qwen2.5-VL-7B-Instruct")
    assert rule.family == "qwen" and not rule.assumed
    assert rule.tokens(800, 800, "low") == 841  # detail means nothing to it
    local = est.image_rule("/models/my-finetune", backend="transformers", max_pixels=200_704)
    assert local.family == "qwen" and local.assumed and local.tokens(800, 800, "high") == 256


def test_qwen_resize_is_transformers_own():
    vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for h, w in [(800, 800), (801, 333), (56, 56), (30, 4000), (4000, 4000), (9000, 7000)]:
        for most in (est.QWEN_MAX_PIXELS, 28 * 28 * 1280):
            assert est.smart_resize(h, w, max_pixels=most) == tuple(
                vl.smart_resize(h, w, 28, est.QWEN_MIN_PIXELS, most)), (h, w, most)


def test_unknown_model_is_counted_with_gpt4o_rule_and_flagged():
    rule = est.image_rule("llava-hf/llava-1.5-7b-hf")
    assert rule.assumed and rule.tokens(800, 800, "high") == 765 and "unknown" in rule.description


# ---- text tokens ------------------------------------------------------------------------------

def test_text_tokens_without_tiktoken_are_four_characters_each():
    counter = est.text_counter("gpt-4o", "openai")
    assert counter.count(HOLISTIC) == 11 and "tiktoken not installed" in counter.method
    assert "4 characters" in est.text_counter("Qwen2.5-VL", "qwen").method


def test_text_tokens_use_tiktoken_when_it_loads(monkeypatch):
    fake = types.ModuleType("tiktoken")
    encoding = types.SimpleNamespace(name="o200k_base", encode=lambda text: text.split())
    fake.encoding_for_model = lambda model: encoding
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    counter = est.text_counter("gpt-4o", "openai")
    assert counter.method == "tiktoken o200k_base" and counter.count(HOLISTIC) == 7

    def offline(model):
        raise ConnectionError("no network")

    fake.encoding_for_model = offline
    fake.get_encoding = offline
    assert "could not load" in est.text_counter("gpt-4o", "openai").method


# ---- one call and the totals ------------------------------------------------------------------

def _request(tile: str, kind: str, prompt: str, image: str = "sha", ids=(), **extra) -> Request:
    return Request(request_id=f"{tile}-{kind}-{len(ids)}-{prompt[:8]}", tile_id=tile, kind=kind,
                   prompt=prompt, prompt_version="v1", image_sha256=image,
                   object_ids=list(ids), **extra)


def _planned() -> est.Planned:
    """Two 800x800 tiles: A with two marks and one cluster, B without objects."""
    a_marks = [_request("A", "instance", "x" * 40, ids=[1]), _request("A", "instance", "y" * 40,
                                                                      ids=[2])]
    requests = [_request("A", "holistic", HOLISTIC), *a_marks,
                _request("A", "instance_batch", "z" * 80, ids=[1, 2],
                         bundles=[r.request_id for r in a_marks]),
                _request("A", "cluster", "c" * 100, ids=[3, 4, 5]),
                _request("B", "holistic", HOLISTIC)]
    return est.Planned(requests, {"A": (800, 800), "B": (800, 800)}, frozenset({"A"}))


def _params(**backend) -> Params:
    return Params.model_validate({"annotate": {"backend": backend}})


def test_call_tokens_are_prompt_overhead_image_and_bounded_answers():
    setup = est.Setup.of(_params(name="openai", model="gpt-4o").annotate.backend)
    t = est.call_tokens(est.Call("holistic", "holistic", HOLISTIC, 800, 800), setup)
    assert (t.text, t.image, t.output_max, t.output_expected) == (11 + 6, 765, 128, 100)
    t = est.call_tokens(est.Call("instance", "instance_batch", "z" * 80, 800, 800, 5), setup)
    assert (t.text, t.output_max, t.output_expected) == (20 + 6, 1024, 8 + 5 * 40)
    short = est.Setup.of(_params(name="openai", model="gpt-4o", max_tokens=20).annotate.backend)
    t = est.call_tokens(est.Call("holistic", "holistic", HOLISTIC, 800, 800), short)
    assert t.output_max == t.output_expected == 20  # expected never above max_tokens


def test_openai_estimate_per_mark_sync_and_batch():
    block = est.estimate(_params(name="openai", model="gpt-4o"), _planned())
    assert block["instance_calls"] == "batched_marks"
    # the backend answers batches: the batch replaces the two per-mark requests it bundles
    assert block["passes"]["instance"]["calls"] == 1
    assert block["requests"] == {"holistic": 2, "instance": 2, "cluster": 1}
    total = block["total"]
    assert total["calls"] == 4 and total["calls_per_tile"] == 2.0
    text = 2 * (11 + 6) + (20 + 6) + (25 + 6)
    assert total["input_tokens"] == {"text": text, "image": 4 * 765, "total": text + 4 * 765}
    assert total["output_tokens"] == {"max": 128 * 3 + 1024, "expected": 100 * 2 + 88 + 30}
    sync = (text + 4 * 765) * 2.5 / 1e6 + (200 + 88 + 30) * 10 / 1e6
    assert total["cost_usd"]["sync"]["expected"] == pytest.approx(sync, abs=1e-4)
    assert total["cost_usd"]["batch"]["expected"] == pytest.approx(sync / 2, abs=1e-4)
    assert block["price"]["source"] == "params annotate.backend.openai.prices"
    assert block["image_tokens"]["per_image"] == {"800x800": 765}
    assert "tiktoken not installed" in block["text_tokens"]
    assert "typical answer length" in block["output_expected_basis"]
    assert "batched-marks" in " ".join(block["notes"])


def test_backend_that_answers_one_mark_at_a_time_is_counted_per_mark():
    block = est.estimate(_params(name="transformers", model="Qwen/Qwen2.5-VL-7B-Instruct"),
                         _planned())
    assert block["instance_calls"] == "per_mark" and block["passes"]["instance"]["calls"] == 2
    assert block["total"]["input_tokens"]["image"] == 5 * 841
    assert block["total"]["cost_usd"] == {"sync": {"expected": 0.0, "max": 0.0}}
    assert "local model" in block["price"]["source"]


def test_template_backend_costs_nothing_and_says_so():
    block = est.estimate(Params(), _planned())
    assert block["backend"] == "template"
    assert block["total"]["cost_usd"]["sync"] == {"expected": 0.0, "max": 0.0}
    assert "input_tokens" not in block["total"]
    assert block["notes"] == ["the template backend is offline: no model calls, it costs $0"]
    assert "$0" in est.format_estimate(block)


def test_scaled_to_a_dataset_not_built_uses_the_tiles_with_objects():
    block = est.estimate(_params(name="openai", model="gpt-4o-mini"), _planned(),
                         scale_to=16_795, tile_size=1024)
    assert block["tiles"] == 16_795 and block["scaled"]["from_tiles"] == 1
    assert block["passes"]["holistic"]["calls"] == 16_795
    assert block["passes"]["cluster"]["calls"] == 16_795
    assert block["total"]["calls_per_tile"] == 3.0
    assert block["image_tokens"]["per_image"] == {"1024x1024": 25501}
    assert block["total"]["input_tokens"]["image"] == 3 * 16_795 * 25501
    cost = block["total"]["cost_usd"]
    assert cost["batch"]["max"] == pytest.approx(cost["sync"]["max"] / 2, abs=1e-3)


def test_unpriced_model_asks_for_a_price_and_the_command_line_gives_it():
    params = _params(name="openai", model="my-vllm-model")
    block = est.estimate(params, _planned())
    assert block["total"]["cost_usd"] is None and block["price"] is None
    assert "--price-input" in " ".join(block["notes"])
    assert "no price" in est.format_estimate(block)
    block = est.estimate(params, _planned(), price=(1.0, 2.0))
    assert block["price"]["source"] == "--price-input/--price-output"
    assert block["total"]["cost_usd"]["sync"]["max"] > 0


def test_list_price_is_a_named_fallback():
    params = Params.model_validate({"annotate": {"backend": {
        "name": "openai", "model": "gpt-4.1", "openai": {"prices": {}}}}})
    price = est.resolve_price(params.annotate.backend)
    assert (price.input_per_mtok, price.output_per_mtok) == est.LIST_PRICES["gpt-4.1"]
    assert "list price" in price.source and est.LIST_PRICES_AS_OF in price.source


def test_llm_composer_calls_are_counted_as_their_own_pass():
    params = Params.model_validate({"annotate": {"backend": {"name": "openai",
                                                             "model": "gpt-4o"}},
                                    "compose": {"composer": "llm"}})
    block = est.estimate(params, _planned())
    assert block["passes"]["compose"]["calls"] == 1   # tile A: 2 marks + 1 cluster
    assert block["passes"]["compose"]["input_tokens"]["image"] == 0  # text only
    assert block["total"]["calls"] == 5


def test_backend_capability_table_matches_the_annotators():
    import importlib

    from annotators.base import REGISTRY

    for name, target in REGISTRY.items():
        module, cls = target.split(":")
        try:
            backend = getattr(importlib.import_module(module), cls)
        except ImportError:  # a backend whose extra is not installed
            continue
        assert est.ANSWERS_INSTANCE_BATCH[name] == backend.answers_instance_batch, name


# ---- the plan report and the command ----------------------------------------------------------

@pytest.fixture()
def plan_dir(tmp_path) -> Path:
    tiles = [synthetic_tile([square(100, 100, 10), square(400, 400, 10)], "ship",
                            tile_id="S_0_800_0_800"),
             synthetic_tile([], [], tile_id="E_0_800_0_800")]
    write_records(tmp_path / "tiles" / "val-00000-of-00001.parquet", tiles, Tile)
    params = Params(annotate=_params(name="openai", model="gpt-4o").annotate,
                    runner=RunnerParams(local_scheduler="synchronous"))
    report = run_plan(params, tmp_path / "tiles", tmp_path / "plan")
    block = report["estimate"]
    assert block["backend"] == "openai" and block["tiles"] == 2
    assert block["passes"]["holistic"]["calls"] == 2 and block["passes"]["instance"]["calls"] == 2
    assert block["total"]["cost_usd"]["batch"]["expected"] > 0
    saved = json.loads((tmp_path / "plan" / "report.json").read_text())
    assert saved["estimate"] == block
    # the same figures as planning in memory
    requests = [r for t in tiles for r in plan_tile(t, params.plan)[1]]
    planned = est.Planned(requests, {t.tile_id: (800, 800) for t in tiles},
                          frozenset({"S_0_800_0_800"}))
    assert est.estimate(params, planned) == block
    return tmp_path / "plan"


def test_plan_report_of_the_template_backend_costs_nothing(tmp_path):
    write_records(tmp_path / "tiles" / "val-00000-of-00001.parquet",
                  [synthetic_tile([square(100, 100, 10)], "ship")], Tile)
    report = run_plan(Params(runner=RunnerParams(local_scheduler="synchronous")),
                      tmp_path / "tiles", tmp_path / "plan")
    assert report["estimate"]["total"]["cost_usd"]["sync"]["expected"] == 0.0


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_estimate_command_reads_a_plan_and_scales_it(plan_dir, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("annotate: {backend: {name: openai, model: gpt-4o}}\n")
    result = _invoke(["estimate", "--plan", str(plan_dir), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "estimate for openai gpt-4o" in result.output and "cost, Batch" in result.output
    result = _invoke(["estimate", "--plan", str(plan_dir), "--params", str(params),
                      "--tiles", "16795", "--tile-size", "800", "--model", "gpt-4o-mini",
                      "--json"])
    block = json.loads(result.output)
    assert block["model"] == "gpt-4o-mini" and block["tiles"] == 16795
    assert block["image_tokens"]["per_image"] == {"800x800": 25501}
    assert block["passes"]["holistic"]["calls"] == 16795   # one tile with objects, scaled
    result = _invoke(["estimate", "--plan", str(plan_dir), "--params", str(params),
                      "--model", "my-model", "--price-input", "1", "--price-output", "4",
                      "--json"])
    assert json.loads(result.output)["price"]["source"] == "--price-input/--price-output"


def test_estimate_command_refuses_half_a_price(plan_dir):
    from pipeline.core.errors import BadParamsError

    with pytest.raises(BadParamsError, match="go together"):
        _invoke(["estimate", "--plan", str(plan_dir), "--price-input", "1"])


def test_estimate_command_plans_the_samples_in_memory(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)  # data.root: data/isaid
    params = tmp_path / "p.yaml"
    params.write_text("annotate: {backend: {name: openai, model: gpt-4o}}\n")
    result = _invoke(["estimate", "--split", "val", "--params", str(params), "--json"])
    block = json.loads(result.output)
    assert block["planned_tiles"] == 10 and "in memory" in block["planned_from"]
    assert block["passes"]["holistic"]["calls"] == 10
    assert block["total"]["cost_usd"]["sync"]["expected"] > 0
