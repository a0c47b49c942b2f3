"""Target selection: PEFT's semantics, checked against PEFT's own matcher on the same names."""

from __future__ import annotations

import peft
import pytest
from peft.tuners.tuners_utils import check_target_module_exists

import peftc
from peftc.config import LoraConfig
from peftc.errors import TargetError
from peftc.targets import expand_all_linear, is_target, pattern_value, select_targets
from tests import zoo

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj"]},
    {"target_modules": ["layers.0.mlp.up_proj", "lm_head"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": r"model\.layers\.1\..*"},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1.*"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["nonexistent", "layers"]},
]


@pytest.fixture(scope="module")
def llama_names():
    return [name for name, _ in zoo.llama().model.named_modules() if name]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: str(f)[:60])
def test_matches_like_peft(fields, llama_names):
    ours = LoraConfig(**fields)
    theirs = peft.LoraConfig(**fields)
    for name in llama_names:
        assert bool(is_target(ours, name)) == bool(check_target_module_exists(theirs, name)), name


def test_all_linear_excludes_the_output_head_like_peft():
    case = zoo.llama()
    names = expand_all_linear(case.model)
    assert "lm_head" not in names and "model.layers.0.self_attn.q_proj" in names
    pm = peft.get_peft_model(zoo.llama().model, peft.LoraConfig(target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert set(names) == peft_targets


def test_all_linear_includes_gpt2_conv1d():
    names = expand_all_linear(zoo.gpt2().model)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names


def test_pattern_value_takes_the_first_matching_suffix():
    patterns = {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 8}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 2) == 4
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 2) == 8
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 2) == 2
    assert pattern_value({"proj": 3}, "model.layers.0.self_attn.q_proj", 2) == 2  # whole segments only


def test_zero_matches_lists_the_closest_module_names():
    case = zoo.llama()
    with pytest.raises(TargetError) as e:
        select_targets(LoraConfig(target_modules=["q_prj"]), case.model)
    assert "q_prj" in str(e.value) and "q_proj" in str(e.value)


def test_zero_matches_after_exclusion_says_so():
    case = zoo.llama()
    with pytest.raises(TargetError, match="exclude_modules"):
        select_targets(LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), case.model)


def test_matching_an_unsupported_module_names_it_and_its_type():
    case = zoo.llama()
    with pytest.raises(TargetError, match=r"model\.layers\.0\.input_layernorm.*LlamaRMSNorm"):
        peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["input_layernorm"]})


def test_rank_larger_than_the_layer_is_accepted_as_in_peft():
    """lin1 is 24 -> 8; PEFT accepts r=9 there (outputs against PEFT: tests/passes/test_lora.py)."""
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 9, "target_modules": ["lin1"]}, example_inputs=case.inputs)
    params = dict(am.named_parameters())
    assert params["base_model.model.lin1.lora_A.default.weight"].shape == (9, 24)
    assert params["base_model.model.lin1.lora_B.default.weight"].shape == (8, 9)


def test_rank_and_alpha_patterns_set_per_module_shapes_and_scales():
    case = zoo.llama()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"v_proj": 4}, "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 16}}
    am = peftc.apply(case.model, config)
    sd = dict(am.named_parameters())
    buffers = dict(am.named_buffers())
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape[0] == 2
    assert sd["base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight"].shape[0] == 4
    assert buffers["base_model.model.model.layers.0.self_attn.q_proj.lora_scaling.default"].item() == 2.0
    assert buffers["base_model.model.model.layers.1.self_attn.q_proj.lora_scaling.default"].item() == 8.0
    assert buffers["base_model.model.model.layers.0.self_attn.v_proj.lora_scaling.default"].item() == 1.0
