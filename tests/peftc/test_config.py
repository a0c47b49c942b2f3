"""Configs: PEFT's fields and defaults; unknown or unsupported fields are errors, never ignored."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from peftc.config import LoraConfig, load_config
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
    with pytest.raises(ConfigError, match="layer_replication"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "layer_replication": [[0, 1]]})
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_config({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "loftq"})


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
