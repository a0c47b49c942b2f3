"""HRA against PEFT: outputs, gradients, checkpoints, the inserted nodes, and folding."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

import peftc
from peftc.capture import STATE, USER
from peftc.errors import ConfigError
from peftc.graph import ADAPTER, adapter_nodes
from tests import zoo
from tests.passes.test_oft import check_against_peft, check_bf16, check_two_adapters

aten = torch.ops.aten

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*symmetric:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*0/1 specialized:UserWarning"),
]

# (zoo model, target_modules or None for the case's own, config, checks beyond eval and folding): one
# transformers model, with every check (each costs a capture); Householder products and Gram-Schmidt;
# the default (identity) init and the random one; odd r, where PEFT's init is random too
CASES = {
    "llama-r4": ("llama", ["q_proj", "v_proj", "down_proj"], {"r": 4}, ("checkpoints", "train")),
    "mlp-r3-gs": ("mlp", None, {"r": 3, "apply_GS": True}, ("checkpoints", "train")),
    "cnn-r2": ("cnn", ["conv1", "head"], {"r": 2}, ("checkpoints", "train")),
    "cnn-r4-gs-random": ("cnn", None, {"r": 4, "apply_GS": True, "init_weights": False}, ("checkpoints", "train")),
}


def hra_dict(targets: list[str], **extra) -> dict:
    return {"peft_type": "HRA", "target_modules": targets, **extra}


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_peft(case_id: str, tmp_path: Path):
    name, targets, extra, checks = CASES[case_id]
    targets = targets or zoo.FACTORIES[name]().targets
    check_against_peft(name, hra_dict(targets, **extra), peft.HRAConfig(target_modules=targets, **extra), checks,
                       tmp_path)



@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv1", "head"])])
def test_two_adapters_stack_and_mix_like_peft(name: str, targets: list[str]):
    check_two_adapters(name, hra_dict(targets, r=2), peft.HRAConfig(target_modules=targets, r=2))



@pytest.mark.parametrize("name, targets", [("mlp", ["lin0", "lin1"]), ("cnn", ["conv1", "head"])])
def test_bf16_base_matches_peft(name: str, targets: list[str]):
    check_bf16(name, hra_dict(targets, r=2), peft.HRAConfig(target_modules=targets, r=2))

def _graph(**extra) -> torch.fx.Graph:
    case = zoo.mlp()
    return peftc.apply(case.model, hra_dict(["lin0"], **extra), example_inputs=case.inputs).graphs[0].gm.graph


def test_linear_runs_with_the_weight_reflected_once_per_vector():
    graph = _graph(r=4)
    state = {n.meta[STATE]: n for n in graph.find_nodes(op="placeholder") if STATE in n.meta}
    weight, bias = state["base_model.model.lin0.base_layer.weight"], state["base_model.model.lin0.base_layer.bias"]
    (new,) = [n for n in graph.nodes if n.target == aten.linear.default and n.args[2] is bias and n.users]
    assert new.meta[ADAPTER] == ("lin0", "default", "HRA")  # the only live lin0 linear is the re-emitted one
    assert USER in new.args[0].meta  # the model's input, unchanged
    assert new.args[1].target == aten.view_as.default and new.args[1].args[1] is weight
    reflections = [n for n in adapter_nodes(graph) if n.target == aten.addr.default]
    assert len(reflections) == 4 and reflections[0].args[0].args[0] is weight  # the first reflects W itself
    assert reflections[-1].args[2].args[0].args[0] is state["base_model.model.lin0.hra_u.default"]


def test_gram_schmidt_reflects_once_through_the_orthonormal_basis():
    ops = [n.target for n in adapter_nodes(_graph(r=3, apply_GS=True))]
    assert ops.count(aten.addmm.default) == 1 and aten.addr.default not in ops
    assert ops.count(aten.dot.default) == 3  # projections: 1 for u_2, 2 for u_3


def test_default_init_is_the_identity():
    case = zoo.mlp()
    am = peftc.apply(case.model, hra_dict(["lin0", "lin1"]), example_inputs=case.inputs).eval()
    torch.testing.assert_close(am(*case.inputs), case.model(*case.inputs), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"bias": "some"}, "bias='some' must be 'none', 'all' or '<method>_only'"),
    ({"init_weights": "gaussian"}, "init_weights must be True or False"),
])
def test_bad_configs(extra: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        peftc.apply(zoo.mlp().model, hra_dict(["lin0"], **extra), example_inputs=zoo.mlp().inputs)
