"""PEFT's `bias` ("all" / "<method>_only"), the same for every method whose config has it: the base biases
train (a copy in peftc; the user's model is untouched) and are saved under their base keys."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftc
from peftc.errors import ConfigError
from peftc.method import METHODS
from tests import zoo
from tests.oracle import MethodPair, assert_same_outputs, check_eval, check_fold, check_train, make_pair

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:peft")]

METHODS_WITH_BIAS = ["OFT", "BOFT", "HRA", "VERA"]


def config_of(peft_type: str, bias: str) -> dict:
    return {**METHODS[peft_type].example_config, "target_modules": ["lin0"], "bias": bias}


@pytest.mark.parametrize("bias", ["all", "only"])
@pytest.mark.parametrize("peft_type", METHODS_WITH_BIAS)
def test_trained_biases_match_peft(peft_type: str, bias: str, tmp_path: Path):
    bias = bias if bias == "all" else f"{peft_type.lower()}_only"
    config = config_of(peft_type, bias)
    fields = {k: v for k, v in config.items() if k != "peft_type"}
    pair = make_pair("mlp", config, peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**fields))
    with torch.no_grad():  # a trained bias, so the checks below see it
        for name, p in pair.am.adapter_parameters():
            if name.endswith(".bias"):
                p.add_(0.5)
        pair.pm.load_state_dict(pair.am.state_dict())
    trained = sorted(n for n, _ in pair.am.adapter_parameters() if n.endswith(".bias"))
    want = ["base_model.model.lin0.base_layer.bias"] + (["base_model.model.lin1.bias"] if bias == "all" else [])
    assert trained == want
    check_eval(pair)
    check_checkpoints_both_ways(pair, tmp_path)
    assert set(want) <= set(load_file(tmp_path / "peftc" / "adapter_model.safetensors"))
    check_train(pair)  # the same trainable set as PEFT's, the same gradients
    check_fold(pair)
    user = zoo.mlp().model  # the user's model (the same seed) is never written to
    torch.testing.assert_close(pair.case.model.lin0.bias, user.lin0.bias, rtol=0, atol=0)


def check_checkpoints_both_ways(pair: MethodPair, tmp_path: Path) -> None:
    """oracle.check_checkpoints loads PEFT's save as a second adapter, which one adapter training biases
    forbids (in PEFT too): load each save into a fresh model instead."""
    pair.am.save_adapter(tmp_path / "peftc")
    pair.pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pair.case.call(pair.am)
        in_peft = peft.PeftModel.from_pretrained(zoo.mlp().model, tmp_path / "peftc").eval()
        assert_same_outputs(pair.case.call(in_peft), want)
        fresh = zoo.mlp()
        in_peftc = peftc.load(fresh.model, tmp_path / "peft", example_inputs=fresh.inputs).eval()
        assert_same_outputs(pair.case.call(in_peftc), want)


def test_bias_rules():
    case = zoo.mlp()
    with pytest.raises(ConfigError, match="bias='some'"):
        peftc.load_config(config_of("OFT", "some"))
    am = peftc.apply(case.model, config_of("HRA", "all"), example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="only one adapter may have bias"):
        am.add_adapter("other", config_of("HRA", "hra_only"))
    am.add_adapter("other", config_of("HRA", "none"))
    am.set_adapter("other")
    assert not any(n.endswith(".bias") for n, _ in am.adapter_parameters())
    assert not am.get_parameter("base_model.model.lin1.bias").requires_grad
    am.set_adapter("default")
    assert am.get_parameter("base_model.model.lin1.bias").requires_grad
    am.delete_adapter("default")
    assert not any(p.requires_grad for n, p in am.named_parameters() if n.endswith(".bias"))
