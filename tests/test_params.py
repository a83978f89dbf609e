"""params.yaml and the defaults in code agree; bad values give one clear error."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core.errors import BadParamsError
from pipeline.core.params import HEADER, Params, load_params, params_hash, to_yaml


def test_params_yaml_equals_code_defaults(repo_root):
    """The committed file is exactly the generated one: every section and key present, values
    equal to the defaults in code (regenerate with `python -m pipeline.core.params > params.yaml`)."""
    text = (repo_root / "params.yaml").read_text()
    assert Params.model_validate(yaml.safe_load(text)) == Params()
    assert text == HEADER + to_yaml(Params())


@pytest.mark.parametrize("section,key,value", [
    ("prepare", "tile_size", 0),
    ("prepare", "stride", 900),          # larger than the tile leaves gaps
    ("prepare", "on_error", "ignore"),
    ("plan", "max_marks_per_tile", -1),
    ("plan", "unknown_key", 3),
])
def test_out_of_range_parameters_name_file_and_key(tmp_path, section, key, value):
    raw = Params().model_dump(mode="json")
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(BadParamsError) as info:
        load_params(path)
    line = info.value.one_line()
    assert str(path) in line and section in line and "\n" not in line


def test_params_hash_changes_with_values():
    a = Params()
    b = a.model_copy(update={"plan": a.plan.model_copy(update={"max_marks_per_tile": 3})})
    assert params_hash(a.plan) != params_hash(b.plan)
    assert params_hash(a.plan, a.compose) == params_hash(Params().plan, Params().compose)
