"""CorDA (`init_lora_weights="corda"`, peftc.preprocess_corda) against PEFT's preprocess_corda + get_peft_model on the
same model, data and seed: A, B and the residual base weights, outputs, gradients, fold, checkpoints both ways,
and PEFT's cache and covariance files read across."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

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
    randomize_adapters,
)
from tests.passes.test_lora_extras import check_conversion

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:CorDA changes the base weights:UserWarning"),
    # the converted adapter's config (init_lora_weights=True) keeps corda_config, in both libraries
    pytest.mark.filterwarnings("ignore:`corda_config` specified but will be ignored:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "gpt2": ["c_attn", "c_fc", "wte"], "llama": ["q_proj", "v_proj", "down_proj"]}
TOL = {"atol": 2e-5, "rtol": 1e-4}


def fields(name: str, **corda: Any) -> dict[str, Any]:
    extra = corda.pop("lora", {})
    return {"r": 2, "lora_alpha": 4, "target_modules": TARGETS[name], "init_lora_weights": "corda",
            "corda_config": {"corda_method": "ipm", **corda}, **extra}


def peft_config(config: dict[str, Any]) -> peft.LoraConfig:
    return peft.LoraConfig(**{**copy.deepcopy(config), "corda_config": CordaConfig(**config["corda_config"])})


def run_model(case: zoo.Case, model: nn.Module) -> Callable[[], None]:
    """The calibration data: one sample per call (PEFT's CorDA squeezes a batch of one), or 2-D batches."""
    def run() -> None:
        if case.transformers:
            for row in zoo._ids(batch=4, seq=9, seed=3):
                model(input_ids=row[None])
        else:
            for i in range(3):
                model(torch.randn(5, 12, generator=torch.Generator().manual_seed(i)))
    return run


def corda_pair(name: str, **corda: Any) -> MethodPair:
    """Both libraries preprocess their copy of zoo model `name` on the same data, then adapt it from the same seed."""
    config = fields(name, **corda)
    case, ref = zoo.FACTORIES[name](), zoo.FACTORIES[name]()
    peftc.preprocess_corda(case.model, {"peft_type": "LORA", **config}, run_model=run_model(case, case.model))
    torch.manual_seed(7)  # the embedding's B (the default init under CorDA, as in PEFT) is drawn
    am = peftc.apply(case.model, {"peft_type": "LORA", **config}, example_inputs=example(case))
    peft_preprocess_corda(ref.model, peft_config(config), run_model=run_model(ref, ref.model))
    torch.manual_seed(7)
    pm = peft.get_peft_model(ref.model, peft_config(config))
    return MethodPair(case, ref, am, pm)


def assert_same_state(am: peftc.AdaptedModel, pm: peft.PeftModel) -> None:
    """Every tensor, the residual base weights (`...base_layer.weight`) among them, equal to PEFT's."""
    ours, theirs = am.state_dict(), pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, set[str]], bool]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: set(vars(m)) for n, m in model.named_modules()}, model.training)


@pytest.mark.parametrize(("name", "method"), [("mlp", "ipm"), ("mlp", "kpm"), ("gpt2", "ipm"), ("llama", "kpm")])
def test_corda_matches_peft(name: str, method: str, tmp_path: Path):
    case = zoo.FACTORIES[name]()
    before = snapshot(case.model)
    pair = corda_pair(name, corda_method=method)
    case, am = pair.case, pair.am
    assert_same_state(am, pair.pm)
    state = am.state_dict()
    residual = next(v for k, v in state.items()  # a Linear's or Conv1D's: not an embedding's
                    if k.endswith(".base_layer.weight") and k.replace("base_layer", "lora_A.default") in state)
    # the user's model is untouched: weights, attributes (PEFT attaches its eigens there), training mode
    after = snapshot(case.model)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    assert not any(torch.equal(residual, v) for v in after[0].values())
    with torch.no_grad():  # W_res + s·B·A = W: the adapted model starts at the base model
        assert_same_outputs(case.call(am), case.call(case.model), TOL)
    initial = tmp_path / "initial"
    am.save_adapter(initial)
    randomize_adapters(am)
    pair.pm.load_state_dict(am.state_dict())
    check_eval(pair)
    check_fold(pair)
    check_corda_checkpoints(pair, tmp_path)
    check_train(pair)
    if name != "gpt2":  # PEFT's conversion drops an embedding's adapter (its keys lack "lora_A"); peftc keeps it
        check_conversion(pair, initial, tmp_path)


def check_corda_checkpoints(pair: MethodPair, tmp_path: Path) -> None:
    """A CorDA adapter saved by either library loads in the other on a fresh copy of the original model that was
    preprocessed on the same data (both recompute the residual from it, as at the start of training); without
    that, both refuse to load it."""
    ours, theirs = tmp_path / "peftc", tmp_path / "peft"
    pair.am.save_adapter(ours)
    pair.pm.save_pretrained(theirs)
    with torch.no_grad():
        fresh = zoo.FACTORIES[pair.case.name]()
        saved = peft.LoraConfig.from_pretrained(ours)
        peft_preprocess_corda(fresh.model, saved, run_model=run_model(fresh, fresh.model))
        loaded = peft.PeftModel.from_pretrained(fresh.model, ours).eval()
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.am), TOL)
        fresh = zoo.FACTORIES[pair.case.name]()
        peftc.preprocess_corda(fresh.model, theirs, run_model=run_model(fresh, fresh.model))
        loaded = peftc.load(fresh.model, theirs, example_inputs=example(fresh))
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.pm), TOL)
        fresh = zoo.FACTORIES[pair.case.name]()
        with pytest.raises(ConfigError, match="no CorDA statistics for module .*preprocess_corda"):
            peftc.load(fresh.model, theirs, example_inputs=example(fresh))
        with pytest.raises(ValueError, match="run `preprocess_corda` first"):
            peft.PeftModel.from_pretrained(fresh.model, theirs)


def test_cache_and_covariance_files_are_read_across(tmp_path: Path):
    """peftc's cache_file and covariance_file are PEFT's: each library builds the same adapter from the other's."""
    cache, covariance, cache_r3 = tmp_path / "c" / "cache.pt", tmp_path / "cov.pt", tmp_path / "cache_r3.pt"
    config = {"peft_type": "LORA", **fields("mlp", cache_file=str(cache), covariance_file=str(covariance))}
    case, ref = zoo.mlp(), zoo.mlp()
    peftc.preprocess_corda(case.model, config, run_model=run_model(case, case.model))
    assert cache.exists() and covariance.exists()
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    peft_preprocess_corda(ref.model, peft_config(config))  # from peftc's cache alone: nothing is run
    assert_same_state(am, peft.get_peft_model(ref.model, peft_config(config)))
    # a covariance file serves another rank; PEFT builds a cache from peftc's covariances, peftc reads that cache
    other = {**config, "r": 3, "corda_config": {**config["corda_config"], "cache_file": str(cache_r3)}}
    ref = zoo.mlp()
    peft_preprocess_corda(ref.model, peft_config(other))
    pm = peft.get_peft_model(ref.model, peft_config(other))
    case = zoo.mlp()
    peftc.preprocess_corda(case.model, other)
    assert_same_state(peftc.apply(case.model, other, example_inputs=case.inputs), pm)
    # without files or run_model, nothing to compute from
    fresh = {**config, "corda_config": {"corda_method": "ipm"}}
    with pytest.raises(ConfigError, match="run_model must be given"):
        peftc.preprocess_corda(zoo.mlp().model, fresh)


def test_hooked_model_gives_the_covariances():
    config = {"peft_type": "LORA", **fields("mlp")}
    case, hooked, ref = zoo.mlp(), zoo.mlp(), zoo.mlp()
    with torch.no_grad():
        hooked.model.lin0.weight.mul_(2.0)  # other inputs reach lin1 from the hooked model
    peftc.preprocess_corda(case.model, config, run_model=run_model(hooked, hooked.model), hooked_model=hooked.model)
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    peft_preprocess_corda(ref.model, peft_config(config), run_model=run_model(hooked, hooked.model),
                          hooked_model=hooked.model)
    assert_same_state(am, peft.get_peft_model(ref.model, peft_config(config)))
    plain = zoo.mlp()
    peftc.preprocess_corda(plain.model, config, run_model=run_model(plain, plain.model))
    other = peftc.apply(plain.model, config, example_inputs=plain.inputs).state_dict()
    assert not torch.allclose(other["base_model.model.lin1.lora_A.default.weight"],
                              am.state_dict()["base_model.model.lin1.lora_A.default.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_use_float16_for_covariance_keeps_the_input_dtype_as_peft(dtype: torch.dtype):
    """PEFT's flag skips the fp32 upcast of each input before its covariance: on a bf16 model it changes the init."""
    states = {}
    for flag in (False, True):
        config = {"peft_type": "LORA", **fields("mlp", use_float16_for_covariance=flag)}
        case, ref = zoo.mlp(), zoo.mlp()
        case.model.to(dtype)
        ref.model.to(dtype)
        inputs = (case.inputs[0].to(dtype),)

        def run(model: nn.Module) -> Callable[[], None]:
            return lambda: [model(torch.randn(5, 12, generator=torch.Generator().manual_seed(i)).to(dtype))
                            for i in range(3)]

        peftc.preprocess_corda(case.model, config, run_model=run(case.model))
        am = peftc.apply(case.model, config, example_inputs=inputs)
        peft_preprocess_corda(ref.model, peft_config(config), run_model=run(ref.model))
        assert_same_state(am, peft.get_peft_model(ref.model, peft_config(config)))
        states[flag] = am.state_dict()["base_model.model.lin0.lora_A.default.weight"]
    assert not torch.equal(states[False], states[True])


def test_verbose_shows_progress_and_prune_temporary_fields_has_nothing_to_prune(capsys: pytest.CaptureFixture):
    """peftc puts nothing on the user's modules (PEFT's temporary fields), whatever prune_temporary_fields says;
    verbose shows PEFT's progress bar."""
    case = zoo.mlp()
    attributes = {n: set(vars(m)) for n, m in case.model.named_modules()}
    config = {"peft_type": "LORA", **fields("mlp", verbose=True, prune_temporary_fields=False)}
    peftc.preprocess_corda(case.model, config, run_model=run_model(case, case.model))
    assert "Collecting eigens" in capsys.readouterr().err
    assert {n: set(vars(m)) for n, m in case.model.named_modules()} == attributes
    am = peftc.apply(case.model, config, example_inputs=case.inputs)
    plain = corda_pair("mlp")
    for key, value in plain.am.state_dict().items():
        torch.testing.assert_close(am.state_dict()[key], value, rtol=0, atol=0)


def test_the_statistics_are_taken_by_apply():
    """As PEFT deletes its eigens at init: a second adapter needs another preprocess_corda. (PEFT's own config
    object is taken too, as peftc.apply takes it.)"""
    case = zoo.mlp()
    config = {"peft_type": "LORA", **fields("mlp")}
    peftc.preprocess_corda(case.model, peft_config(config), run_model=run_model(case, case.model))
    peftc.apply(case.model, peft_config(config), example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="no CorDA statistics for module 'lin0'"):
        peftc.apply(case.model, config, example_inputs=case.inputs)


def test_dora_starts_from_the_residual_as_peft():
    """PEFT initialises DoRA's magnitude after CorDA, from the residual base: m = ‖W_res + s·B·A‖ = ‖W‖."""
    pair = corda_pair("mlp", lora={"use_dora": True})
    assert_same_state(pair.am, pair.pm)
    magnitude = dict(pair.am.adapter_parameters())["base_model.model.lin0.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(magnitude, pair.case.model.lin0.weight.norm(dim=1))
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)


def test_hotswap_keeps_the_residual_base(tmp_path: Path):
    """Hot-swapping another CorDA adapter's weights in needs no statistics: the residual base stays, as in PEFT."""
    pair = corda_pair("mlp")
    am = pair.am
    randomize_adapters(am, seed=1)
    am.save_adapter(tmp_path / "other")
    with torch.no_grad():
        want = pair.case.call(am)
    randomize_adapters(am, seed=2)
    am.hotswap_adapter(tmp_path / "other")
    with torch.no_grad():
        assert_same_outputs(pair.case.call(am), want, {"atol": 0, "rtol": 0})


def test_embedding_gets_peft_s_default_init():
    pair = corda_pair("gpt2")
    params = dict(pair.am.adapter_parameters())
    assert torch.count_nonzero(params["base_model.model.transformer.wte.lora_embedding_A.default"]) == 0
    assert torch.equal(pair.am.state_dict()["base_model.model.transformer.wte.base_layer.weight"],
                       pair.case.model.transformer.wte.weight)


def test_refused_with_a_clear_error():
    case = zoo.mlp()
    config = {"peft_type": "LORA", **fields("mlp")}
    with pytest.raises(ConfigError, match="no CorDA statistics for module 'lin0'.*preprocess_corda"):
        peftc.apply(case.model, config, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="r=9 for module 'lin1': CorDA takes r components of the weight, which "
                                          "has only 8"):
        peftc.preprocess_corda(case.model, {**config, "r": 9}, run_model=run_model(case, case.model))
    with pytest.raises(ConfigError, match="corda_method'\\] must be 'ipm' or 'kpm'"):
        peftc.preprocess_corda(case.model, {**config, "corda_config": {"corda_method": "xpm"}})
    with pytest.raises(ConfigError, match="cannot be combined with layer_replication"):
        peftc.preprocess_corda(case.model, {**config, "layer_replication": [[0, 1]]})
    with pytest.raises(ConfigError, match="needs a LoRA config with init_lora_weights='corda'"):
        peftc.preprocess_corda(case.model, {"peft_type": "LORA", "target_modules": ["lin0"]})
    gpt2 = zoo.gpt2()
    batched = lambda: gpt2.model(input_ids=zoo._ids(batch=2))  # noqa: E731
    with pytest.raises(ConfigError, match="module 'transformer.h.0.attn.c_attn' got an input of shape \\(2, 9, 32\\)"):
        peftc.preprocess_corda(gpt2.model, {"peft_type": "LORA", **fields("gpt2")}, run_model=batched)
    cnn = zoo.cnn()
    conv = {"peft_type": "LORA", **fields("mlp"), "target_modules": ["conv0", "head"]}
    peftc.preprocess_corda(cnn.model, conv, run_model=lambda: cnn.model(*cnn.inputs))
    with pytest.raises(ConfigError, match="'corda' is not available for module 'conv0'"):
        peftc.apply(cnn.model, conv, example_inputs=cnn.inputs)
