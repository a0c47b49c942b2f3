"""Configs: PEFT's fields and defaults; unknown or unsupported fields are errors, never ignored."""

from __future__ import annotations

import dataclasses
import json
import typing

import peft
import pytest

from peftc.config import LoraConfig, load_config, registered_configs
from peftc.errors import ConfigError


def test_fields_and_defaults_are_peft_s():
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert ours == theirs
    defaults = LoraConfig(target_modules=["q"]).to_dict()
    peft_defaults = peft.LoraConfig(target_modules=["q"]).to_dict()
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "init_lora_weights", "use_rslora", "rank_pattern",
                "fan_in_fan_out", "layers_to_transform", "use_dora", "lora_bias"):
        assert defaults[key] == peft_defaults[key], key


def test_accepts_dict_path_folder_and_peft_object(tmp_path):
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    for source in (data, tmp_path / "adapter_config.json", tmp_path, str(tmp_path),
                   peft.LoraConfig(r=4, target_modules=["q_proj"])):
        config = load_config(source)
        assert isinstance(config, LoraConfig) and config.r == 4 and config.target_modules == ["q_proj"]


def test_a_config_peft_wrote_loads(tmp_path):
    peft.LoraConfig(r=4, target_modules=["q_proj"], lora_alpha=8).save_pretrained(tmp_path)
    config = load_config(tmp_path)
    assert config.lora_alpha == 8


def test_unknown_field_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'lora_alpah' \(did you mean 'lora_alpha'\?\)"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "lora_alpah": 16})


def test_unsupported_field_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="megatron_config.*Megatron"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "megatron_config": {"tp": 2}})
    with pytest.raises(ConfigError, match="init_lora_weights='bogus' is not an init"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "bogus"})


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "r": 0})
    with pytest.raises(ConfigError, match="peft_type 'NOPE'"):
        load_config({"peft_type": "NOPE"})
    with pytest.raises(ConfigError, match="missing field 'peft_type'"):
        load_config({"r": 4})
    bad = tmp_path / "adapter_config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(bad)


def test_round_trips_through_json():
    config = LoraConfig(r=4, target_modules={"v_proj", "q_proj"}, rank_pattern={"q_proj": 2})
    again = load_config(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("fields, message", [
    ({"lora_alpha": None}, "lora_alpha must be a number, got None"),
    ({"lora_alpha": "16"}, "lora_alpha must be a number, got '16'"),
    ({"lora_alpha": True}, "lora_alpha must be a number, got True"),
    ({"alpha_pattern": {"q": None}}, "alpha_pattern['q'] must be a number, got None"),
    ({"rank_pattern": {"q": 2.5}}, "rank_pattern['q'] must be an integer, got 2.5"),
    ({"target_modules": 5}, "target_modules must be a list of strings, a string or None, got 5"),
    ({"target_modules": [5]}, "target_modules[0] must be a string, got 5"),
    ({"target_modules": "["}, "target_modules='[' is not a valid regular expression (unterminated character set"),
    ({"exclude_modules": "q(", "target_modules": ["q"]}, "exclude_modules='q(' is not a valid regular expression"),
    ({"rank_pattern": {"q[": 2}}, "rank_pattern key 'q[' is not a valid regular expression"),
    ({"use_dora": "yes"}, "use_dora must be True or False, got 'yes'"),
    ({"r": 8.0}, "r must be an integer, got 8.0"),
    ({"layers_to_transform": [0, "1"], "layers_pattern": "layer"},
     "layers_to_transform[1] must be an integer, got '1'"),
    ({"init_lora_weights": None}, "init_lora_weights must be True, False or a string, got None"),
])
def test_values_of_the_wrong_type_name_the_field_and_the_file(fields, message, tmp_path):
    """A wrong type is a ConfigError naming the file and the field (and the entry of a list or dict), not a
    TypeError or re.error from deep inside, and never taken for another value ("yes" as True)."""
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], **fields}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}")


# the fields each method requires, so that every other field can be tested alone
_REQUIRED = {"IA3": {"feedforward_modules": ["q"]}}


@pytest.mark.parametrize("peft_type", sorted(registered_configs()))
def test_every_field_of_every_method_is_type_checked(peft_type):
    """One mechanism for every field of every method's config: each declared type (not Any) is checked."""
    cls = registered_configs()[peft_type]
    hints = typing.get_type_hints(cls)
    # (peft_type picks the class: a wrong one is "not supported", tested above)
    checked = [f.name for f in dataclasses.fields(cls) if hints[f.name] is not typing.Any and f.name != "peft_type"]
    assert {"target_modules", "task_type", "inference_mode"} <= set(checked)
    for name in checked:
        fields = {"target_modules": ["q"], **_REQUIRED.get(peft_type, {}), name: object()}
        with pytest.raises(ConfigError, match=rf"^config: {name} must be .*, got <object object"):
            load_config({"peft_type": peft_type, **fields})
