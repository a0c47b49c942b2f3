"""LoRA's data-free inits that are not decompositions: orthogonal and MiCA, against PEFT on the same seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    MethodPair,
    check_checkpoints,
    check_eval,
    check_fold,
    check_train,
    randomize_adapters,
    seeded_lora_pair,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "gpt2": ["c_attn", "c_fc", "wte"], "llama": ["q_proj", "v_proj", "embed_tokens"]}


def seeded_pair(name: str, **extra: Any) -> MethodPair:
    return seeded_lora_pair(name, TARGETS[name], **extra)


def assert_same_init(pair: MethodPair) -> None:
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_init_matches_peft_and_keeps_the_base_output(name: str, init: str, tmp_path: Path):
    pair = seeded_pair(name, init_lora_weights=init)
    assert_same_init(pair)
    with torch.no_grad():  # B·A = 0 at the start
        zoo_out = pair.case.call(pair.case.model)
        got = pair.case.call(pair.am)
        for k, t in (got.items() if isinstance(got, dict) else [("out", got)]):
            want = zoo_out[k] if isinstance(zoo_out, dict) else zoo_out
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)
    check_train(pair)  # under MiCA, B gets no gradient and is not among the trained parameters: as in PEFT


def test_mica_freezes_b_only():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "init_lora_weights": "MiCA"},
                     example_inputs=case.inputs)
    params = dict(am.named_parameters())
    assert params["base_model.model.lin0.lora_A.default.weight"].requires_grad
    assert not params["base_model.model.lin0.lora_B.default.weight"].requires_grad
    assert set(dict(am.adapter_parameters())) == {"base_model.model.lin0.lora_A.default.weight"}
    am.set_adapter("default")
    assert not params["base_model.model.lin0.lora_B.default.weight"].requires_grad


@pytest.mark.parametrize(("extra", "match"), [
    ({"init_lora_weights": "orthogonal", "r": 3}, "needs an even rank"),
    ({"init_lora_weights": "orthogonal", "target_modules": ["conv0"]}, "orthogonal.*PEFT implements it for"),
    ({"init_lora_weights": "mica", "target_modules": ["conv0"]}, "mica.*PEFT implements it for"),
    ({"init_lora_weights": "mica", "r": 6}, "r=6 .*only 5"),
    ({"init_lora_weights": "mica", "use_dora": True}, "use_dora and init_lora_weights='mica' cannot be combined"),
])
def test_refused_as_peft_refuses(extra: dict[str, Any], match: str):
    case = zoo.cnn()
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["head"], **extra},
                    example_inputs=case.inputs)
