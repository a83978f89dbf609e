"""Grounded-description instructions: a versioned list in prompts/instructions, one instruction
per exported record chosen by its id (the same on every run and machine), or one fixed for all
by `export.instruction`; the former key `export.geopixel_question` still reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

import prompts
from pipeline.core.errors import BadParamsError
from pipeline.core.params import ExportParams, parse_params


def test_list_is_versioned_and_holds_plain_instructions():
    assert "v1" in prompts.instruction_versions()
    texts = prompts.instructions("v1")
    assert 10 <= len(texts) <= 20 and len(set(texts)) == len(texts)
    for text in texts:
        assert "[SEG]" not in text and "<" not in text and ">" not in text
        assert "segment" in text.lower() or "mask" in text.lower()
    assert prompts.numbered_instruction(3).id == "v1/03"
    assert prompts.numbered_instruction(3).text == texts[2]


def test_same_record_same_instruction_on_every_run():
    # pinned: sha256 of the record id, never Python's salted hash()
    assert prompts.pick_instruction("val/P0003_0_800_0_800").id == "v1/02"
    assert prompts.pick_instruction("train/P0005_0_800_0_800").id == "v1/16"
    script = ("import prompts; print(prompts.pick_instruction('val/P0003_0_800_0_800').id, "
              "prompts.pick_instruction('some/other').text)")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": seed}, check=True).stdout
            for seed in ("1", "2")}
    expected = prompts.pick_instruction("some/other").text
    assert runs == {f"v1/02 {expected}\n"}


def test_records_spread_over_the_list():
    ids = [f"train/P{i:04d}_0_800_0_800" for i in range(200)]
    used = {prompts.pick_instruction(r).id for r in ids}
    assert len(used) > len(prompts.instructions()) / 2
    # the parameter's default is the varied choice
    assert {ExportParams().instruction_for(r).id for r in ids} == used


def test_fixed_instruction_by_number_or_text():
    ids = [f"r{i}" for i in range(50)]
    numbered = ExportParams(instruction=4)
    assert {numbered.instruction_for(r) for r in ids} == {prompts.numbered_instruction(4)}
    text = parse_params({"export": {"instruction": "Describe the scene, masks included."}})
    assert {text.export.instruction_for(r) for r in ids} == {
        prompts.Instruction("custom", "Describe the scene, masks included.")}


def test_former_question_key_still_fixes_the_question():
    question = "Could you describe this photo with masks?"
    params = parse_params({"export": {"geopixel_question": question}})
    assert params.export.instruction == question
    assert params.export.instruction_for("any").text == question


@pytest.mark.parametrize("raw, key, words", [
    ({"instruction": 99}, "export.instruction", "1 to 16"),
    ({"instruction": 0}, "export.instruction", "count from 1"),
    ({"instruction": True}, "export.instruction", "neither"),
    ({"instruction": "Describe <p> it </p> [SEG]"}, "export.instruction", "tag-like"),
    ({"geopixel_question": "Describe [SEG]"}, "export.geopixel_question", "tag-like"),
    ({"instruction_list": "v9"}, "export.instruction_list", "not an instruction list"),
    ({"instruction": "A", "geopixel_question": "B"}, "export.geopixel_question", "one of the two"),
])
def test_bad_instruction_settings_are_refused(raw, key, words):
    with pytest.raises(BadParamsError) as err:
        parse_params({"export": raw})
    line = err.value.one_line()
    assert key in line and words in line


def test_instruction_is_a_generation_setting():
    assert ExportParams().digest() != ExportParams(instruction=2).digest()
    assert not ExportParams.is_run_setting("instruction")
    assert not ExportParams.is_run_setting("instruction_list")
