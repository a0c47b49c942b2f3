"""VeLoRA (`velora_config`) against PEFT: LoRA's forward, A's gradient from compressed activations."""

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
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

TARGETS = {"mlp": ["lin0", "lin1"], "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def seeded_pair(name: str, **extra: Any) -> MethodPair:
    return seeded_lora_pair(name, TARGETS[name], **extra)


@pytest.mark.parametrize("name", ["mlp", "llama", "gpt2"])
@pytest.mark.parametrize("velora", [{"num_groups": 5, "scale": 0.5}, {"num_groups": 4, "init_type": "random"}])
def test_velora_matches_peft(name: str, velora: dict[str, Any], tmp_path: Path):
    pair = seeded_pair(name, init_lora_weights=False, velora_config=velora)
    ours, theirs = pair.am.state_dict(), pair.pm.state_dict()
    assert set(ours) == set(theirs)
    for key, value in ours.items():  # the same init, the projection (random, or zeros until a batch) included
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    assert any(k.endswith(".lora_velora_embed.default") for k in ours)
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)
    check_train(pair)  # A's gradient is VeLoRA's approximation in both; B's and the input's are exact


def test_velora_gradient_of_a_is_not_lora_s():
    """The graph's A gradient is VeLoRA's, not the exact one (else the test above would prove nothing)."""
    case = zoo.mlp()
    grads = {}
    for velora in (None, {"num_groups": 3}):
        torch.manual_seed(0)
        am = peftc.apply(zoo.mlp().model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"],
                                           "init_lora_weights": False, "velora_config": velora},
                         example_inputs=case.inputs)
        am.train()
        am(*case.inputs).square().sum().backward()
        grads[velora is None] = dict(am.named_parameters())["base_model.model.lin0.lora_A.default.weight"].grad
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize(("extra", "match"), [
    ({"velora_config": {"num_groups": 0}}, "num_groups'\\] must be a positive integer"),
    ({"velora_config": {}, "use_dora": True}, "velora_config and use_dora cannot be combined"),
    ({"velora_config": {}, "target_modules": ["emb"]}, "velora_config for module 'emb'.*PEFT implements"),
])
def test_refused_as_peft_refuses(extra: dict[str, Any], match: str):
    case = zoo.embedding_model()
    with pytest.raises(ConfigError, match=match):
        peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["proj"], **extra},
                    example_inputs=case.inputs)


def test_mixed_batch_in_training_is_refused_and_in_eval_is_lora():
    case = zoo.mlp()
    config = {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "velora_config": {"num_groups": 3}}
    am = peftc.apply(case.model, config, adapter_name="x", example_inputs=case.inputs)
    am.add_adapter("y", config)
    randomize_adapters(am)
    (x,) = case.inputs
    names = ["x", "y", "__base__", "x"]
    with torch.no_grad():
        mixed = am(x, adapter_names=names)
        am.set_adapter("y")
        torch.testing.assert_close(mixed[1:2], am(x[1:2]))
    am.train()
    with pytest.raises(ConfigError, match="mixed batches .* velora_config"):
        am(x, adapter_names=names)


def test_batch_average_once_loads_and_runs_outside_training_and_refuses_training(tmp_path: Path):
    """A PEFT adapter with init_type='batch_average_once' is LoRA outside training (equal to PEFT's, checkpoints
    both ways, fold); training it is an error naming the option (the projection kept from the first batch is
    state a captured graph does not carry)."""
    pair = seeded_pair("mlp", init_lora_weights=False, velora_config={"init_type": "batch_average_once"})
    randomize_adapters(pair.am)
    pair.pm.load_state_dict(pair.am.state_dict())
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_fold(pair)
    pair.am.train()
    with pytest.raises(ConfigError, match="batch_average_once' is not supported by peftc"):
        pair.am(*pair.case.inputs)
