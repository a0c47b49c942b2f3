"""LoRA's other variants against PEFT: lora_bias, and the inits that rewrite the base weight (PiSSA, OLoRA)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peftc.passes.lora import Lora
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import peftc
from peftc.config import load_config
from peftc.errors import CheckpointError, ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_checkpoints,
    check_eval,
    check_train,
    example,
    make_pair,
    randomize_adapters,
    saved_shapes,
)
from tests.oracle import check_fold as check_fold_vs_peft
from tests.passes.test_dora import check_fold

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),  # PEFT's check misreads lora_B.bias
    pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning"),
]

# the zoo's targets without the embedding (embed_tokens, wte), which has neither a LoRA bias nor PiSSA
LINEAR_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def fields(case_name: str, **extra: Any) -> dict[str, Any]:
    targets = LINEAR_TARGETS.get(case_name) or zoo.FACTORIES[case_name]().targets
    return {"r": 2, "lora_alpha": 6, "target_modules": targets, "init_lora_weights": False, **extra}


def pair_of(case_name: str, randomize: bool = True, **extra: Any) -> MethodPair:
    config = fields(case_name, **extra)
    return make_pair(case_name, {"peft_type": "LORA", **config}, peft.LoraConfig(**config), randomize=randomize)


# -- lora_bias -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "cnn", "llama", "gpt2"])
def test_lora_bias_matches_peft(name: str, tmp_path: Path):
    pair = pair_of(name, lora_bias=True)
    biases = [k for k, _ in pair.am.adapter_parameters() if k.endswith(".lora_B.default.bias")]
    assert len(biases) == len(pair.am.targeted_modules)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    assert any(k.endswith(".lora_B.bias") for k in load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    if name == "llama":  # Llama's linears have no bias to fold lora_B's into; PEFT cannot merge them either
        path = "model.layers.0.self_attn.q_proj"
        (ma,) = pair.am.targeted_modules[path]
        tensors = {key: t.detach() for key, (_, t) in ma.tensors.items()}
        q_proj = pair.case.model.get_submodule(path)
        with pytest.raises(ConfigError, match="without a bias"):
            Lora().fold(ma.kind, ma.config, q_proj, tensors, {"weight": q_proj.weight})
        with pytest.raises(RuntimeError, match="no bias"):
            copy.deepcopy(pair.pm).merge_and_unload()
    else:
        check_fold(pair)
    check_train(pair)


def test_lora_bias_on_an_embedding_is_an_error():
    case = zoo.embedding_model()
    with pytest.raises(ConfigError, match="lora_bias=True for module 'emb'"):
        peftc.apply(case.model, {"peft_type": "LORA", **fields("embedding_model", lora_bias=True)},
                    example_inputs=case.inputs)


# -- PiSSA / OLoRA -------------------------------------------------------------------------------

def _base_weights(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer.", ".").removeprefix(prefix): v for k, v in model.state_dict().items()
            if k.endswith(".weight") and "lora_" not in k}


@pytest.mark.parametrize(("name", "init"), [("mlp", "pissa"), ("mlp", "olora"), ("mlp", "pissa_niter_3"),
                                            ("gpt2", "pissa")])
def test_decomposing_init_keeps_the_base_output_and_matches_peft(name: str, init: str, tmp_path: Path):
    torch.manual_seed(5)  # pissa_niter draws its random projections after A and B, in both libraries
    pair = pair_of(name, randomize=False, init_lora_weights=init, lora_alpha=4)
    torch.manual_seed(5)
    ref = zoo.FACTORIES[name]()
    theirs = peft.get_peft_model(ref.model, peft.LoraConfig(**fields(name, init_lora_weights=init, lora_alpha=4)))
    case, am = pair.case, pair.am
    snapshot = {k: v.clone() for k, v in case.model.state_dict().items()}
    with torch.no_grad():
        assert_same_outputs(case.call(am), case.call(case.model), {"atol": 2e-5, "rtol": 1e-4})
    # the residual base weights are PEFT's, and the user's model is untouched
    ours_base, peft_base = _base_weights(am, "base_model.model."), _base_weights(theirs, "base_model.model.")
    for key in pair.am.targeted_modules:
        torch.testing.assert_close(ours_base[f"{key}.weight"], peft_base[f"{key}.weight"], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ours_base[f"{key}.weight"], snapshot[f"{key}.weight"])
    assert all(torch.equal(v, snapshot[k]) for k, v in case.model.state_dict().items())
    # the same random update in both: the same outputs and gradients, on the same residual base
    initial = tmp_path / "initial"
    am.save_adapter(initial)
    randomize_adapters(am)
    pair.pm.load_state_dict(am.state_dict())
    check_eval(pair)
    # folding: W_res + s·BA, equal to PEFT's merge_and_unload; checkpoints load across in both directions
    check_fold_vs_peft(pair)
    check_decomposed_checkpoints(pair, tmp_path)
    check_train(pair)
    check_conversion(pair, initial, tmp_path)


def check_decomposed_checkpoints(pair: MethodPair, tmp_path: Path) -> None:
    """A PiSSA/OLoRA adapter saved by either library loads in the other on a fresh copy of the original model,
    with the saver's outputs: both recompute the residual base from the original weights on load. (Not beside
    another adapter, as oracle.check_checkpoints also does: PEFT warns that these inits rewrite the base and
    must not be combined with other adapters.)"""
    ours, theirs = tmp_path / "peftc", tmp_path / "peft"
    pair.am.save_adapter(ours)
    pair.pm.save_pretrained(theirs)
    assert saved_shapes(ours) == saved_shapes(theirs)
    assert load_config(ours).init_lora_weights == load_config(theirs).init_lora_weights == pair.pm.peft_config[
        "default"].init_lora_weights
    tol = {"atol": 2e-5, "rtol": 1e-4}
    with torch.no_grad():
        fresh = zoo.FACTORIES[pair.case.name]()
        assert_same_outputs(pair.case.call(peft.PeftModel.from_pretrained(fresh.model, ours).eval()),
                            pair.case.call(pair.am), tol)
        fresh = zoo.FACTORIES[pair.case.name]()
        loaded = peftc.load(fresh.model, theirs, example_inputs=example(fresh))
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.pm), tol)


def check_conversion(pair: MethodPair, initial: Path, tmp_path: Path) -> None:
    """PEFT's path_initial_model_for_weight_conversion: a plain LoRA that, on the untouched base, computes
    what the adapter computes on the residual base; the same tensors and config PEFT's conversion writes."""
    ours, theirs = tmp_path / "converted", tmp_path / "converted_by_peft"
    pair.am.save_adapter(ours, path_initial_model_for_weight_conversion=str(initial))
    pair.pm.save_pretrained(theirs, path_initial_model_for_weight_conversion=str(initial))
    got, want = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], msg=lambda m, k=key: f"{k}: {m}")
    config = load_config(ours)
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 8, True)
    fresh = zoo.FACTORIES[pair.case.name]()
    loaded = peft.PeftModel.from_pretrained(fresh.model, ours).eval()
    with torch.no_grad():
        assert_same_outputs(pair.case.call(loaded), pair.case.call(pair.am), {"atol": 2e-5, "rtol": 1e-4})


def test_pissa_with_dora_starts_at_the_base_model_and_matches_peft():
    # PEFT initialises DoRA's magnitude after PiSSA, from the residual: m = ‖W_res + s·BA‖ = ‖W‖
    pair = pair_of("mlp", randomize=False, init_lora_weights="pissa", use_dora=True)
    magnitude = dict(pair.am.adapter_parameters())["base_model.model.lin0.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(magnitude, pair.case.model.lin0.weight.norm(dim=1))
    with torch.no_grad():
        assert_same_outputs(pair.case.call(pair.am), pair.case.call(pair.case.model), {"atol": 2e-5, "rtol": 1e-4})
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)


def test_embedding_gets_peft_s_default_init_under_pissa():
    # PEFT implements PiSSA/OLoRA for Linear only; its Embedding falls back to the default LoRA init
    case = zoo.embedding_model()
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields("embedding_model", init_lora_weights="pissa")},
                     example_inputs=case.inputs)
    params = dict(am.adapter_parameters())
    assert torch.count_nonzero(params["base_model.model.emb.lora_embedding_A.default"]) == 0
    assert torch.count_nonzero(params["base_model.model.emb.lora_embedding_B.default"]) > 0
    emb_base = am.state_dict()["base_model.model.emb.base_layer.weight"]
    assert torch.equal(emb_base, case.model.emb.weight)


@pytest.mark.parametrize(("name", "init", "match"), [
    ("cnn", "pissa", "not available for module 'conv0'"),
    ("gpt2", "olora", "not available for module 'transformer.h.0.attn.c_attn'"),
])
def test_decomposing_init_on_an_unsupported_layer_is_an_error(name: str, init: str, match: str):
    case = zoo.FACTORIES[name]()
    targets = {"cnn": ["conv0"], "gpt2": ["c_attn"]}[name]
    config = {"peft_type": "LORA", "r": 2, "target_modules": targets, "init_lora_weights": init}
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, config, example_inputs=None if case.transformers else case.inputs)


def test_decomposing_a_tied_weight_is_an_error():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(ConfigError, match="'lm_head': its weight is tied"):
        peftc.apply(model, {"peft_type": "LORA", "r": 2, "target_modules": ["lm_head"], "init_lora_weights": "pissa"})


@pytest.mark.parametrize(("extra", "match"), [
    ({"lora_bias": True, "use_dora": True}, "lora_bias=True cannot be combined with use_dora"),
    ({"lora_bias": True, "init_lora_weights": "pissa"}, "lora_bias=True needs init_lora_weights True or False"),
    ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights='pissa_niter_x' is not an init"),
])
def test_config_rejects_what_peft_rejects_or_peftc_lacks(extra: dict[str, Any], match: str):
    with pytest.raises(ConfigError, match=match):
        load_config({"peft_type": "LORA", "target_modules": ["q"], **extra})


def test_conversion_of_a_dora_adapter_is_an_error(tmp_path: Path):
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", **fields("mlp", use_dora=True)}, example_inputs=case.inputs)
    am.save_adapter(tmp_path / "initial")
    with pytest.raises(CheckpointError, match="only plain LoRA"):
        am.save_adapter(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
