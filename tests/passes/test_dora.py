"""DoRA (use_dora=True) against PEFT on the same weights: outputs, gradients, checkpoints, fold."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from peftc.passes.lora import Lora
from safetensors.torch import load_file

import peftc
from peftc.graph import adapter_nodes
from tests import zoo
from tests.oracle import (
    MethodPair,
    assert_same_outputs,
    check_checkpoints,
    check_eval,
    check_train,
    make_pair,
    randomize_adapters,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

aten = torch.ops.aten
# every layer kind DoRA has: Linear (all), Conv1D + Embedding (gpt2), Embedding (llama, bert, embedding), Conv2d (cnn)
CASES = ["llama", "gpt2", "bert", "mlp", "cnn", "embedding_model"]


def dora_pair(case_name: str, training: bool = False, **extra: Any) -> MethodPair:
    fields = {"r": 2, "lora_alpha": 6, "target_modules": zoo.FACTORIES[case_name]().targets,
              "init_lora_weights": False, "use_dora": True, **extra}
    return make_pair(case_name, {"peft_type": "LORA", **fields}, peft.LoraConfig(**fields), training=training)


def fold_into_copy(pair: MethodPair) -> nn.Module:
    """A copy of the user's model whose adapted modules hold `Lora().fold`'s merged tensors."""
    model = copy.deepcopy(pair.case.model)
    state = pair.am.state_dict()
    with torch.no_grad():
        for path, (ma,) in pair.am.targeted_modules.items():
            module = model.get_submodule(path)
            base = {leaf: state[f"base_model.model.{path}.base_layer.{leaf}"]
                    for leaf in ("weight", "bias") if getattr(module, leaf, None) is not None}
            adapter = {key: t.detach() for key, (_, t) in ma.tensors.items()}
            for leaf, merged in Lora().fold(ma.kind, ma.config, module, adapter, base).items():
                # a new Parameter, so a tied use elsewhere (GPT-2's lm_head) keeps the base weight, as in `am`
                setattr(module, leaf, nn.Parameter(merged))
    return model


def check_fold(pair: MethodPair) -> None:
    """Folded weights compute the adapted model's outputs, and equal PEFT's merge_and_unload."""
    folded = fold_into_copy(pair)
    with torch.no_grad():
        assert_same_outputs(pair.case.call(folded), pair.case.call(pair.am))
    merged = copy.deepcopy(pair.pm).merge_and_unload()
    for path in pair.am.targeted_modules:
        ours, theirs = folded.get_submodule(path), merged.get_submodule(path)
        for leaf in ("weight", "bias"):
            if getattr(ours, leaf, None) is not None:
                torch.testing.assert_close(getattr(ours, leaf), getattr(theirs, leaf), atol=1e-6, rtol=1e-5,
                                           msg=lambda m, n=f"{path}.{leaf}": f"{n}: {m}")


@pytest.mark.parametrize("name", CASES)
def test_dora_matches_peft(name: str, tmp_path: Path):
    # lora_dropout > 0: in training PEFT's DoRA recomputes the base term as W·dropout(x)
    pair = dora_pair(name, lora_dropout=0.3)
    check_eval(pair)
    check_checkpoints(pair, tmp_path)
    # PEFT's saved key for the magnitude has neither the adapter name nor the live ".weight"
    keys = load_file(tmp_path / "peftc" / "adapter_model.safetensors")
    magnitudes = [k for k in keys if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)
    check_fold(pair)
    check_train(pair)  # last: it moves BatchNorm statistics, which fold and checkpoints compare from the start
    graph = next(g for g in pair.am.graphs if g.training).gm.graph
    drops = [n for n in adapter_nodes(graph) if n.target == aten.dropout.default]
    assert drops and all(len(d.users) == 2 for d in drops)  # read by lora_A and by the base op run again


def test_magnitude_starts_at_the_weight_norm():
    case = zoo.mlp()
    am = peftc.apply(case.model, {"peft_type": "LORA", "r": 2, "target_modules": ["lin0"], "use_dora": True},
                     example_inputs=case.inputs)
    m = dict(am.named_parameters())["base_model.model.lin0.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(m, case.model.lin0.weight.norm(dim=1))
    with torch.no_grad():  # B = 0: the adapted model starts at the base model
        torch.testing.assert_close(am(*case.inputs), case.model(*case.inputs))


def test_norm_is_detached_magnitude_gets_gradients():
    pair = dora_pair("mlp", training=True)
    graph = pair.am.graph_for(*pair.case.inputs).gm.graph
    norms = [n for n in adapter_nodes(graph) if n.target == aten.linalg_vector_norm.default]
    assert len(norms) == 2 and all(next(iter(n.users)).target == aten.detach.default for n in norms)


def test_dora_over_a_bf16_base_runs_in_fp32_and_matches_peft():
    case, ref = zoo.mlp(), zoo.mlp()
    x = case.inputs[0].bfloat16()
    fields = {"r": 2, "lora_alpha": 6, "target_modules": ["lin0", "lin1"], "init_lora_weights": False, "use_dora": True}
    am = peftc.apply(case.model.bfloat16(), {"peft_type": "LORA", **fields}, example_inputs=(x,))
    randomize_adapters(am)
    pm = peft.get_peft_model(ref.model.bfloat16(), peft.LoraConfig(**fields))
    pm.load_state_dict(am.state_dict())
    assert all(p.dtype == torch.float32 for _, p in am.adapter_parameters())
    with torch.no_grad():
        got = am(x)
        assert got.dtype == torch.bfloat16
        # about one bf16 step: PEFT rounds the sum once, peftc rounds the update then adds (as its LoRA does)
        torch.testing.assert_close(got, pm(x), atol=1e-2, rtol=2e-2)
