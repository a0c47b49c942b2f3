"""LoRA's variants that reshape the factors, against PEFT: KaSA (`kasa_config`) and BD-LoRA (`use_bdlora`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peftc.passes.lora_factors import DIAG

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import (
    TOL,
    MethodPair,
    check_checkpoints,
    check_eval,
    check_fold,
    check_train,
    randomize_adapters,
    seeded_lora_pair,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"]}
BD = {"mlp": {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2},
      "llama": {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj"],
                "nblocks": 2}}


def variant(name: str, which: str) -> dict[str, Any]:
    return {"kasa_config": {"beta": 0.01, "gamma": 0.1}} if which == "kasa" else {"use_bdlora": BD[name]}


def seeded_pair(name: str, **extra: Any) -> MethodPair:
    return seeded_lora_pair(name, TARGETS[name], **extra)


@pytest.mark.parametrize("name", ["mlp", "llama"])
@pytest.mark.parametrize("which", ["kasa", "bdlora"])
@pytest.mark.parametrize("init", [True, False])
def test_variant_matches_peft(name: str, which: str, init: bool, tmp_path: Path):
    pair = seeded_pair(name, init_lora_weights=init, **variant(name, which))
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():  # the same init, and under KaSA the same truncated base weights
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    if which == "kasa":
        assert any(k.endswith(".lora_diag.default") for k in ours)
        w = pair.case.model.lin0.weight if name == "mlp" else pair.case.model.model.layers[0].self_attn.q_proj.weight
        key = next(k for k in ours if k.endswith("0.base_layer.weight") or k.endswith("q_proj.base_layer.weight"))
        assert not torch.allclose(ours[key], w)  # truncated, while the user's weight is left as it was
    else:
        shapes = {k: tuple(v.shape) for k, v in ours.items() if ".lora_" in k}
        assert any(s[1] * 2 in (12, 24, 32, 48) and "lora_A" in k for k, s in shapes.items())  # A's blocks
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)
    check_train(pair)


@pytest.mark.parametrize("which", ["kasa", "bdlora"])
def test_mixed_batch_equals_each_sample_alone(which: str):
    case = zoo.mlp()
    config = {"peft_type": "LORA", "r": 4, "target_modules": TARGETS["mlp"], **variant("mlp", which)}
    am = peftc.apply(case.model, config, adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", config)
    for seed, adapter in enumerate(("x", "y")):
        am.set_adapter(adapter)
        randomize_adapters(am, seed=seed)
    (x,) = case.inputs
    names = ["x", "__base__", "y", "x"]
    with torch.no_grad():
        mixed = am(x, adapter_names=names)
        with am.disable_adapter():
            torch.testing.assert_close(mixed[1:2], am(x[1:2]), **TOL)
        for adapter in ("x", "y"):
            rows = [i for i, n in enumerate(names) if n == adapter]
            am.set_adapter(adapter)
            torch.testing.assert_close(mixed[rows], am(x[rows]), **TOL)


def test_kasa_is_refused_beside_a_plain_adapter():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"]}, example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="kasa_config cannot be loaded beside one without"):
        am.add_adapter("k", {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "kasa_config": {}})


@pytest.mark.parametrize(("extra", "match"), [
    ({"kasa_config": {}, "use_dora": True}, "kasa_config and use_dora cannot be combined"),
    ({"use_bdlora": BD["mlp"], "kasa_config": {}}, "kasa_config and use_bdlora cannot be combined"),
    ({"kasa_config": {"beta": -1}}, r"kasa_config\['beta'\] must be a non-negative"),
    ({"kasa_config": {"alpha": 1}}, r"kasa_config: unknown field\(s\) \['alpha'\]"),
    ({"kasa_config": {}, "init_lora_weights": "pissa"}, "kasa_config needs init_lora_weights"),
    ({"kasa_config": {}, "r": 8}, "r=8 for module 'lin1'.*needs at least one"),
    ({"use_bdlora": {"target_modules_bd_a": ["lin0"]}}, "'lin1' matches neither"),
    ({"use_bdlora": {"target_modules_bd_a": ["lin"], "target_modules_bd_b": ["lin1"]}}, "'lin1' matches both"),
    ({"use_bdlora": {"target_modules_bd_a": ["lin"], "nblocks": 5}}, "not divisible into nblocks=5"),
    ({"use_bdlora": {"target_modules_bd_a": ["lin"], "nblocks": 0}}, "must be a positive integer"),
])
def test_refused_as_peft_refuses(extra: dict[str, Any], match: str):
    case = zoo.mlp()
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "target_modules": ["lin0", "lin1"], **extra},
                    example_inputs=case.inputs)


def test_non_strict_bdlora_leaves_unmatched_modules_plain():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 4, "target_modules": ["lin0", "lin1"],
                                  "use_bdlora": {"target_modules_bd_a": ["lin1"], "nblocks": 4, "match_strict": False}},
                     example_inputs=case.inputs)
    sd = am.state_dict()
    assert tuple(sd["base_model.model.lin1.lora_A.default.weight"].shape) == (4, 6)  # 24 inputs in 4 blocks
    assert tuple(sd["base_model.model.lin0.lora_A.default.weight"].shape) == (4, 12)
    assert DIAG not in dict(am.targeted_modules["lin0"][0].tensors)


def test_weighted_combination_of_a_kasa_adapter_is_refused():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "kasa_config": {}},
                     example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="has kasa_config set; its update is not B·A"):
        am.add_weighted_adapter(["default"], [1.0], "sum")
