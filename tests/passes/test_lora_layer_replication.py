"""LoRA's `layer_replication` against PEFT: decoder layers repeated with shared base weights, one adapter each."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch

import peftc
from peftc.errors import ConfigError
from tests import zoo
from tests.oracle import check_checkpoints, check_eval, check_train, make_pair

pytestmark = [pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning")]

CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False,
          "layer_replication": [[0, 2], [1, 2]]}


def test_replicated_layers_match_peft(tmp_path: Path):
    pair = make_pair("llama", {"peft_type": "LORA", **CONFIG}, peft.LoraConfig(**copy.deepcopy(CONFIG)))
    sd = pair.am.state_dict()
    # three layers: the third shares layer 1's base weights and has an adapter of its own
    assert sd["base_model.model.model.layers.2.self_attn.q_proj.base_layer.weight"].data_ptr() == \
        sd["base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"].data_ptr()
    assert not torch.equal(sd["base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight"],
                           sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"])
    assert len(pair.case.model.model.layers) == 2  # the user's model is not changed
    assert pair.case.model.config.num_hidden_layers == 2
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    check_train(pair)
    with pytest.raises(ConfigError, match="cannot merge LoRA layers when base model layers are replicated"):
        pair.am.fold()
    # PEFT means to refuse too (`_check_merge_allowed`), but its check reads the adapters' dict, not a config,
    # and lets it through: the replicas' deltas then pile up in their one shared weight, a wrong model
    with torch.no_grad():
        want = pair.case.call(pair.pm)
        merged = copy.deepcopy(pair.pm).merge_and_unload()
        assert not torch.allclose(pair.case.call(merged).logits, want.logits, atol=1e-3)


def test_layer_replication_is_checked():
    case = zoo.mlp()
    with pytest.raises(ConfigError, match="layer_replication must be a list of"):
        peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["lin0"], "layer_replication": [[2, 1]]},
                    example_inputs=case.inputs)
    with pytest.raises(ConfigError, match="no decoder layer list found"):
        peftc.apply(case.model, {"peft_type": "LORA", "target_modules": ["lin0"], "layer_replication": [[0, 1]]},
                    example_inputs=case.inputs)
    llama = zoo.llama()
    am = peftc.apply(llama.model, {"peft_type": "LORA", "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="an adapter with another layout cannot be added"):
        am.add_adapter("more", {"peft_type": "LORA", "target_modules": ["q_proj"], "layer_replication": [[0, 2]]})
