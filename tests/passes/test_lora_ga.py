"""LoRA-GA (`init_lora_weights="lora_ga"`, peftc.preprocess_loraga) against PEFT's preprocess_loraga + get_peft_model
on the same model, train step and seed: A, B and the residual base weights for every direction and scale, outputs,
gradients, fold, checkpoints both ways, and PEFT's gradient cache file read across."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from peft import preprocess_loraga as peft_preprocess_loraga
from peft.tuners.lora.config import LoraGAConfig

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_eval,
    check_fold,
    check_train,
    example,
    loss_of,
    randomize_adapters,
    train_inputs,
)
from tests.passes.test_lora_corda import assert_same_state, snapshot
from tests.passes.test_lora_extras import check_conversion

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    # PyTorch's, for the backward hook that counts passes through a layer whose input needs no grad (as in PEFT)
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "gpt2": ["c_attn", "c_fc", "wte"], "llama": ["q_proj", "v_proj", "down_proj"],
           "cnn": ["conv0", "head"]}
TOL = {"atol": 2e-5, "rtol": 1e-4}


def fields(name: str, **ga: Any) -> dict[str, Any]:
    return {"r": 2, "lora_alpha": 4, "target_modules": TARGETS[name], "init_lora_weights": "lora_ga",
            "lora_ga_config": ga}


def peft_config(config: dict[str, Any]) -> peft.LoraConfig:
    config = {k: v for k, v in copy.deepcopy(config).items() if k != "peft_type"}
    return peft.LoraConfig(**{**config, "lora_ga_config": LoraGAConfig(**config["lora_ga_config"])})


def train_step(case: zoo.Case, model: nn.Module) -> Callable[[], None]:
    """Two forward/backward passes (the gradient is their mean), dropout drawn from the same seed in both."""
    def step() -> None:
        torch.manual_seed(3)
        for _ in range(2):
            loss_of(case, case.call(model, train_inputs(case))).backward()
    return step


def ga_pair(name: str, **ga: Any) -> MethodPair:
    """Both libraries estimate the gradients on their copy of zoo model `name`, then adapt it from the same seed
    (torch.svd_lowrank and the "random" direction draw from it)."""
    config = {"peft_type": "LORA", **fields(name, **ga)}
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    peftc.preprocess_loraga(case.model, config, train_step(case, case.model))
    torch.manual_seed(7)
    am = peftc.apply(case.model, config, example_inputs=example(case))
    peft_preprocess_loraga(ref.model, peft_config(config), train_step(ref, ref.model))
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(config))
    return MethodPair(case, ref, am, pm)


@pytest.mark.parametrize(("name", "ga"), [
    ("mlp", {}), ("mlp", {"direction": "ArBr", "scale": "gd_scale"}),
    ("mlp", {"direction": "random", "scale": "weight_svd"}), ("mlp", {"direction": "A2rBr", "stable_gamma": 4}),
    ("gpt2", {"direction": "A2rBr"}), ("llama", {"scale": "unit"}),
    ("cnn", {}),  # the conv layer gets PEFT's default init, the Linear head LoRA-GA's
])
def test_init_matches_peft_and_starts_at_the_base_model(name: str, ga: dict[str, Any]):
    case = zoo.FACTORIES[name]()
    before = snapshot(case.model)
    requires_grad = {n: p.requires_grad for n, p in case.model.named_parameters()}
    pair = ga_pair(name, **ga)
    assert_same_state(pair.am, pair.pm)
    after = snapshot(pair.case.model)
    assert after[1] == before[1] and after[2] == before[2]
    assert {n: p.requires_grad for n, p in pair.case.model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in pair.case.model.parameters())
    if name != "cnn":  # (the train step moves BatchNorm's statistics, in both libraries)
        assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    with torch.no_grad():  # W_res + s·B·A = W
        assert_same_outputs(pair.case.call(pair.am), pair.case.call(pair.case.model), TOL)


def test_init_over_a_bf16_base_matches_peft():
    """PEFT rounds A and B to the base dtype and subtracts the rounded product from the weight: so does peftc."""
    config = {"peft_type": "LORA", **fields("mlp")}
    case, ref = zoo.mlp(), zoo.mlp()
    case.model.to(torch.bfloat16)
    ref.model.to(torch.bfloat16)
    x = case.inputs[0].to(torch.bfloat16)

    def step(model: nn.Module) -> Callable[[], None]:
        return lambda: model(x).float().pow(2).mean().backward()

    torch.manual_seed(3)
    peftc.preprocess_loraga(case.model, config, step(case.model))
    torch.manual_seed(7)
    am = peftc.apply(case.model, config, example_inputs=(x,))
    torch.manual_seed(3)
    peft_preprocess_loraga(ref.model, peft_config(config), step(ref.model))
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(config))
    assert_same_state(am, pm)
    a = dict(am.adapter_parameters())["base_model.model.lin0.lora_A.default.weight"]
    assert a.dtype == torch.float32 and torch.equal(a, a.to(torch.bfloat16).float())


@pytest.mark.parametrize("name", ["mlp", "gpt2", "llama"])
def test_adapter_matches_peft(name: str, tmp_path: Path):
    pair = ga_pair(name)
    initial = tmp_path / "initial"
    pair.am.save_adapter(initial)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_fold(pair)
    check_ga_checkpoints(pair, tmp_path)
    check_train(pair)
    if name != "gpt2":  # PEFT's conversion drops an embedding's adapter (its keys lack "lora_A"); peftc keeps it
        check_conversion(pair, initial, tmp_path)


def check_ga_checkpoints(pair: MethodPair, tmp_path: Path) -> None:
    """A LoRA-GA adapter saved by either library loads in the other on a fresh copy of the original model whose
    gradients were estimated the same way: both recompute the residual as at the start of training, with
    torch.svd_lowrank's random draws, so from the same seed. Loaded without gradients, both take the model's
    weights as the residual base (PEFT's fallback; peftc warns)."""
    ours, theirs = tmp_path / "peftc", tmp_path / "peft"
    pair.am.save_adapter(ours)
    pair.pm.save_pretrained(theirs)
    name = pair.case.name
    with torch.no_grad():
        fresh = zoo.FACTORIES[name]()
        peft_preprocess_loraga(fresh.model, peft.LoraConfig.from_pretrained(ours), train_step(fresh, fresh.model))
        torch.manual_seed(7)
        loaded = peft.PeftModel.from_pretrained(fresh.model, ours).eval()
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.am), TOL)
        fresh = zoo.FACTORIES[name]()
        peftc.preprocess_loraga(fresh.model, theirs, train_step(fresh, fresh.model))
        torch.manual_seed(7)
        loaded = peftc.load(fresh.model, theirs, example_inputs=example(fresh))
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.pm), TOL)
        # onto the residual base model (PEFT's `unload()` of the trained model), with no gradients
        residual = copy.deepcopy(pair.pm).unload()
        with pytest.warns(UserWarning, match="no gradient for module .*default LoRA init"):
            loaded = peftc.load(copy.deepcopy(residual), theirs, example_inputs=example(pair.case))
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.pm), TOL)
        assert_same_outputs(pair.case.call(peft.PeftModel.from_pretrained(residual, theirs)),
                            pair.case.call(pair.pm), TOL)


def test_cache_file_is_read_across(tmp_path: Path):
    """peftc's cache_file holds PEFT's gradients under PEFT's keys: each library adapts from the other's, and no
    train step runs."""
    cache, theirs = tmp_path / "g" / "grads.pt", tmp_path / "peft_grads.pt"
    config = {"peft_type": "LORA", **fields("mlp")}
    case, ref = zoo.mlp(), zoo.mlp()
    peftc.preprocess_loraga(case.model, config, train_step(case, case.model), cache_file=str(cache))
    assert cache.exists()
    torch.manual_seed(7)
    am = peftc.apply(case.model, config, example_inputs=case.inputs)

    def fail() -> None:
        raise AssertionError("train_step ran although the cache exists")

    peft_preprocess_loraga(ref.model, peft_config(config), fail, cache_file=str(cache))
    torch.manual_seed(7)
    assert_same_state(am, peft.get_peft_model(ref.model, peft_config(config)))
    ref, case = zoo.mlp(), zoo.mlp()
    peft_preprocess_loraga(ref.model, peft_config(config), train_step(ref, ref.model), cache_file=str(theirs))
    peftc.preprocess_loraga(case.model, config, fail, cache_file=str(theirs))
    torch.manual_seed(7)
    assert_same_state(peftc.apply(case.model, config, example_inputs=case.inputs), am)


def test_the_model_s_grads_and_mode_are_kept():
    """PEFT clears the targeted weights' .grad and leaves requires_grad as it was; peftc also keeps an earlier
    .grad, out of the estimate."""
    case, ref = zoo.mlp(), zoo.mlp()
    config = {"peft_type": "LORA", **fields("mlp")}
    case.model.lin0.weight.grad = torch.ones_like(case.model.lin0.weight)
    case.model.train()
    peftc.preprocess_loraga(case.model, config, train_step(case, case.model))
    assert torch.equal(case.model.lin0.weight.grad, torch.ones_like(case.model.lin0.weight))
    assert case.model.training
    case.model.eval()
    case.model.lin0.weight.grad = None
    torch.manual_seed(7)
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    peft_preprocess_loraga(ref.model, peft_config(config), train_step(ref, ref.model))
    torch.manual_seed(7)
    assert_same_state(am, peft.get_peft_model(ref.model, peft_config(config)))


def test_refused_with_a_clear_error():
    case = zoo.mlp()
    config = {"peft_type": "LORA", **fields("mlp")}
    with pytest.raises(ConfigError, match="r=5 for module 'lin1'.*takes 10 components of the gradient, which has "
                                          "only 8"):
        peftc.preprocess_loraga(case.model, {**config, "r": 5}, train_step(case, case.model))
        peftc.apply(case.model, {**config, "r": 5}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="needs a LoRA config with init_lora_weights='lora_ga' and lora_ga_config"):
        peftc.preprocess_loraga(case.model, {**config, "lora_ga_config": None}, train_step(case, case.model))
    with pytest.raises(ConfigError, match="module\\(s\\) \\['lin1'\\] got no gradient"):
        peftc.preprocess_loraga(case.model, config, lambda: case.model.lin0(case.inputs[0]).sum().backward())
    with pytest.raises(ConfigError, match="lora_ga_config\\['direction'\\] must be"):
        peftc.preprocess_loraga(case.model, {**config, "lora_ga_config": {"direction": "BrAr"}}, lambda: None)
    with pytest.raises(ConfigError, match="lora_ga_config\\['scale'\\] must be"):
        peftc.preprocess_loraga(case.model, {**config, "lora_ga_config": {"scale": "big"}}, lambda: None)
    with pytest.raises(ConfigError, match="stable_gamma'\\] must be a positive number"):
        peftc.preprocess_loraga(case.model, {**config, "lora_ga_config": {"stable_gamma": 0}}, lambda: None)
    fresh = zoo.mlp()
    with pytest.warns(UserWarning, match="no gradient for module 'lin0'"):  # PEFT's fallback, warned
        am = peftc.apply(fresh.model, config, example_inputs=fresh.inputs)
    assert torch.count_nonzero(dict(am.adapter_parameters())["base_model.model.lin0.lora_B.default.weight"]) == 0
